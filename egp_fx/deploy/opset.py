"""Which ONNX opset to write: the highest that onnx, onnxruntime and the exporter all support."""
from __future__ import annotations

import functools

from egp_fx.errors import ExportError


@functools.lru_cache(maxsize=None)
def ort_max_opset() -> int:
    """The highest opset onnxruntime accepts (probed with a one-node model: it refuses opsets it
    does not know)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    options = ort.SessionOptions()
    options.log_severity_level = 4  # probes that fail are expected: keep ORT quiet
    value = helper.make_tensor_value_info
    for version in range(onnx.defs.onnx_opset_version(), 6, -1):
        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [value("x", TensorProto.FLOAT, [1])],
                                  [value("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)],
                                  ir_version=8)
        try:
            ort.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001  (ORT raises a generic Fail for an unknown opset)
            continue
        return version
    raise ExportError("onnxruntime accepts no ONNX opset >= 7; is it installed correctly?")


def default_opset(exporter: str) -> int:
    """Highest opset supported by onnx, onnxruntime and torch's `exporter`."""
    import onnx
    from torch.onnx import _constants

    if exporter == "torchscript":
        torch_max = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17)
    else:
        torch_max = getattr(_constants, "ONNX_MAX_OPSET", 18)
    return min(onnx.defs.onnx_opset_version(), ort_max_opset(), torch_max)
