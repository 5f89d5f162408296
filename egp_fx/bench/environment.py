"""What benchmark numbers depend on: versions, CPU, GPU, threads, date, load."""
from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch


def environment(threads: int | None = None) -> dict:
    """Versions, CPU, GPU, threads, date and the load average at the time of the call."""
    import onnx
    import onnxruntime as ort

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
           "ort_providers": ort.get_available_providers(), "cpu_model": _cpu_model(),
           "logical_cpus": os.cpu_count(), "threads": threads if threads is not None else
           "default", "torch_threads": torch.get_num_threads(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()]}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
