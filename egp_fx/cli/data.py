"""Calibration data for the egp-fx command line.

`--data` names one of
- a folder of images: class sub-folders (torchvision ImageFolder layout, labels from the folder
  names) or a flat folder of image files (no labels). Each image is resized (shorter side),
  centre-cropped to --input-size and normalised with the ImageNet mean/std (0.5/0.5 for one
  channel);
- a tensor file: .npy, .npz (the array named by --data-key, else one called x / images / inputs
  / data, else the only array), or .pt/.pth (read with torch.load(weights_only=True): a tensor,
  a (inputs, labels) pair or a dict of tensors). uint8 data is scaled to [0, 1]; N x H x W data
  gets a channel axis; labels come from y / labels / targets when present;
- `digits`: the 8x8 handwritten digits shipped with egp_fx (egp_fx/data/digits.npz), as the
  prune package prepares them (3 x 32 x 32, normalised; --input-size H changes the size);
- `random`: Gaussian noise of --input-size. Statistics from noise say little about real data:
  use it to try the tool, not to compress a model you will deploy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from egp_fx.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_INPUT_KEYS = ("x", "images", "inputs", "data", "X", "input")
_LABEL_KEYS = ("y", "labels", "targets", "label", "Y")
NOISE_WARNING = ("calibrating on Gaussian noise (--data random): the statistics, and so what "
                 "compress removes, are not meaningful for real inputs; use real data")


@dataclass
class CalibrationData:
    loader: DataLoader
    example: torch.Tensor               # one batch
    labelled: bool
    description: str
    warnings: list[str] = field(default_factory=list)


def parse_input_size(text: str | None) -> tuple[int, ...] | None:
    """'224' -> (3, 224, 224); '32x32' or '32,32' -> (3, 32, 32); '1x28x28' -> (1, 28, 28)."""
    if text is None:
        return None
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or len(dims) > 4:
        raise DataError(f"--input-size {text!r}: write H, HxW or CxHxW with positive integers")
    if len(dims) == 1:
        return (3, dims[0], dims[0])
    return (3, *dims) if len(dims) == 2 else dims


class _Images(Dataset):
    """Image files (with labels from class folders when present), transformed to tensors."""

    def __init__(self, files: list[Path], labels: list[int] | None, size: tuple[int, ...]):
        from torchvision import transforms
        channels, height, width = size
        mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if channels == 3 else \
            ([0.5] * channels, [0.5] * channels)
        self.mode = "RGB" if channels == 3 else "L"
        self.files, self.labels = files, labels
        self.transform = transforms.Compose([
            transforms.Resize(min(height, width)), transforms.CenterCrop((height, width)),
            transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as img:
                x = self.transform(img.convert(self.mode))
        except Exception as err:  # PIL raises many types for unreadable files
            raise DataError(f"cannot read image {self.files[i]}: {type(err).__name__}: {err}; "
                            "remove or fix the file") from err
        return (x, self.labels[i]) if self.labels is not None else x


def _image_folder(root: Path, size: tuple[int, ...] | None) -> tuple[Dataset, bool, str]:
    if size is None:
        raise DataError(f"--data {root}: images need --input-size (e.g. 224 or 3x224x224)")
    if len(size) != 3 or size[0] not in (1, 3):
        raise DataError(f"--input-size {size}: images need C x H x W with C = 1 or 3")
    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES  # noqa: E731
    classes = sorted(d for d in root.iterdir() if d.is_dir() and any(map(is_image, d.rglob("*"))))
    if classes:
        files, labels = [], []
        for label, d in enumerate(classes):
            found = sorted(p for p in d.rglob("*") if is_image(p))
            files += found
            labels += [label] * len(found)
        return _Images(files, labels, size), True, f"{len(files)} images in {len(classes)} classes"
    files = sorted(p for p in root.iterdir() if is_image(p))
    if not files:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_SUFFIXES)}, "
                        "directly or in class sub-folders)")
    return _Images(files, None, size), False, f"{len(files)} images"


def _pick(arrays: dict, key: str | None, keys: tuple[str, ...], what: str, source: str):
    if key is not None:
        if key not in arrays:
            raise DataError(f"{source}: no array {key!r} (it holds {sorted(arrays)})")
        return arrays[key]
    for k in keys:
        if k in arrays:
            return arrays[k]
    if what == "inputs":
        big = [k for k, v in arrays.items() if getattr(v, "ndim", 0) >= 2]
        if len(big) == 1:
            return arrays[big[0]]
        raise DataError(f"{source}: cannot tell which array holds the inputs (it holds "
                        f"{sorted(arrays)}); pass --data-key NAME")
    return None


def _read_tensors(path: Path, key: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False)), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, torch.Tensor):
                return obj, None
            if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], torch.Tensor):
                return obj[0], obj[1] if len(obj) > 1 and isinstance(obj[1], torch.Tensor) else None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: holds a {type(obj).__name__}; expected a tensor, a "
                                "(inputs, labels) pair or a dict of tensors")
            arrays = obj
    except DataError:
        raise
    except Exception as err:  # numpy/torch raise many types for bad files
        raise DataError(f"cannot read {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    x = _pick(arrays, key, _INPUT_KEYS, "inputs", str(path))
    y = _pick(arrays, None, _LABEL_KEYS, "labels", str(path))
    as_tensor = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))  # noqa: E731
    return as_tensor(x), (as_tensor(y) if y is not None else None)


def _shape_inputs(x: torch.Tensor, size: tuple[int, ...] | None, source: str) -> torch.Tensor:
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        x = x.float()
    x = x.float()
    if x.dim() == 3 and (size is None or len(size) == 3):
        x = x.unsqueeze(1)                                   # N x H x W -> N x 1 x H x W
    if size is not None and tuple(x.shape[1:]) != tuple(size):
        if x.shape[1:].numel() == int(np.prod(size)):
            x = x.reshape(len(x), *size)
        elif x.dim() == 4 and x.shape[1] == 1 and size[0] == 3 and tuple(x.shape[2:]) == tuple(size[1:]):
            x = x.expand(-1, 3, -1, -1)
        else:
            raise DataError(f"{source}: samples have shape {list(x.shape[1:])}, but --input-size "
                            f"says {list(size)}; fix one of them")
    if not bool(torch.isfinite(x).all()):
        raise DataError(f"{source}: holds NaN or Inf values; clean the data")
    return x


def _tensor_dataset(path: Path, size, key: str | None) -> tuple[Dataset, bool, str]:
    x, y = _read_tensors(path, key)
    if x.dim() < 2 or len(x) == 0:
        raise DataError(f"{path}: expected a batch of samples (N x ...), got shape {list(x.shape)}")
    x = _shape_inputs(x, size, str(path))
    if y is not None and len(y) == len(x):
        return TensorDataset(x, y.long()), True, f"{len(x)} samples of {list(x.shape[1:])} from {path.name}"
    return TensorDataset(x), False, f"{len(x)} samples of {list(x.shape[1:])} from {path.name}"


def _digits(size: tuple[int, ...] | None) -> tuple[Dataset, bool, str]:
    try:
        from egp_fx.pruning.datasets import DIGITS_PATH, load_digits_data
    except ImportError as err:
        raise DataError("the built-in dataset 'digits' needs egp_fx.prune, which is not "
                        "available in this install") from err
    if not Path(DIGITS_PATH).is_file():
        raise DataError(f"the built-in dataset 'digits' is missing ({DIGITS_PATH}); reinstall egp_fx")
    side = size[-1] if size is not None else 32
    if size is not None and (len(size) != 3 or size[0] != 3 or size[1] != size[2]):
        raise DataError(f"digits are 3 x H x H images; --input-size {list(size)} does not fit")
    data = load_digits_data(size=side)
    return data.train, True, f"digits ({len(data.train)} training images, 3x{side}x{side})"


def _random(size, count: int, seed: int) -> tuple[Dataset, bool, str]:
    if size is None:
        raise DataError("--data random needs --input-size (e.g. 3x224x224): the model does not "
                        "declare one")
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, *size, generator=gen)), False, \
        f"{count} Gaussian samples of {list(size)}"


class _Inputs:
    """Iterates a DataLoader for at most `limit` batches (len() included, for progress bars)."""

    def __init__(self, loader: DataLoader, limit: int | None):
        self.loader, self.limit = loader, limit

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.limit) if self.limit is not None else n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.limit is not None and i >= self.limit:
                return
            yield batch


def calibration_data(spec: str, *, input_size: tuple[int, ...] | None, batch_size: int = 16,
                     num_batches: int | None = 4, data_key: str | None = None,
                     seed: int = 0, shard: str | None = None) -> CalibrationData:
    """Open `spec` (see the module docstring) as a loader of at most `num_batches` batches.

    `shard` (under torchrun, egp_fx.distributed.launch): "batches" gives this rank whole
    batches in turn, "samples" its part of every batch (batch_size must divide by the number
    of processes). The example is the first batch of the unsharded data on every rank."""
    if batch_size <= 0 or (num_batches is not None and num_batches <= 0):
        raise DataError("--batch-size and --num-batches must be positive")
    warnings = []
    path = Path(spec)
    if spec == "random" and not path.exists():
        dataset, labelled, desc = _random(input_size, batch_size * (num_batches or 1), seed)
        warnings.append(NOISE_WARNING)
    elif spec == "digits" and not path.exists():
        dataset, labelled, desc = _digits(input_size)
    elif path.is_dir():
        dataset, labelled, desc = _image_folder(path, input_size)
    elif path.is_file():
        if path.suffix.lower() not in (".npy", ".npz", ".pt", ".pth"):
            raise DataError(f"--data {spec}: unsupported file type {path.suffix!r}; give a folder "
                            "of images, a .npy/.npz/.pt file, 'digits' or 'random'")
        dataset, labelled, desc = _tensor_dataset(path, input_size, data_key)
    else:
        raise DataError(f"--data {spec}: no such file or folder, and not a built-in dataset "
                        "('digits', 'random')")
    whole = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    loader = _Inputs(whole, num_batches)
    first = next(iter(loader))
    if shard is not None:
        from egp_fx.distributed import launch  # noqa: PLC0415

        loader = _Inputs(launch.shard_batches(dataset, batch_size, num_batches), None) \
            if shard == "batches" else _Inputs(launch.shard_samples(dataset, batch_size),
                                                num_batches)
    example = first[0] if isinstance(first, (tuple, list)) else first
    return CalibrationData(loader, example, labelled, desc, warnings)
