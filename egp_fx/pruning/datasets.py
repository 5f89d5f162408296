"""The real offline dataset of the EGP experiment: scikit-learn's 8x8 handwritten digits.

egp_fx/data/digits.npz (written once by benchmarks/make_digits.py) holds the 1,797 images as
uint8 pixel values 0..16, the labels 0..9 and a fixed stratified split (1,437 train / 360
validation). At load time each image becomes a CIFAR-shaped tensor:

    x = (bilinear_upsample(img / 16, 8x8 -> 32x32), repeated over 3 channels - mean) / std

with mean and std the pixel mean and standard deviation of the upsampled training split (one
scalar each, the same for the three channels). Nothing here needs scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

DIGITS_PATH = Path(__file__).resolve().parents[1] / "data" / "digits.npz"
NUM_CLASSES = 10
IMAGE_SIZE = 32


@dataclass(frozen=True)
class DigitsData:
    train: TensorDataset
    val: TensorDataset
    mean: float
    std: float


def _to_images(raw: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(raw.astype(np.float32) / 16.0).unsqueeze(1)          # (N, 1, 8, 8)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1).contiguous()


def load_digits_data(path: str | Path = DIGITS_PATH, *, size: int = IMAGE_SIZE) -> DigitsData:
    """The fixed train/validation datasets of (image [3, size, size] float32, label int64)."""
    with np.load(path) as npz:
        images, labels, split = npz["images"], npz["labels"], npz["split"]
    x = _to_images(images, size)
    y = torch.from_numpy(labels.astype(np.int64))
    is_val = torch.from_numpy(split.astype(bool))
    mean = float(x[~is_val].mean())
    std = float(x[~is_val].std())
    x = (x - mean) / std
    return DigitsData(TensorDataset(x[~is_val], y[~is_val]), TensorDataset(x[is_val], y[is_val]),
                      mean, std)


def digits_loaders(batch_size: int = 128, *, seed: int = 0, train_limit: int | None = None,
                   val_limit: int | None = None, path: str | Path = DIGITS_PATH
                   ) -> tuple[DataLoader, DataLoader]:
    """(train loader, shuffled with a seeded generator; validation loader, in order).

    `train_limit`/`val_limit` keep only the first N images of a split (for quick tests).
    """
    data = load_digits_data(path)
    train, val = data.train, data.val
    if train_limit is not None:
        train = Subset(train, range(min(train_limit, len(train))))
    if val_limit is not None:
        val = Subset(val, range(min(val_limit, len(val))))
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=batch_size, shuffle=False))
