"""Write egp_fx/data/digits.npz from scikit-learn's 8x8 handwritten digits (run once; needs sklearn).

The file holds the 1,797 real images as uint8 (pixel values 0..16), their labels, and a fixed
train/validation split (1,437 / 360, stratified by class, numpy RandomState(0)), so that the
package can use the data at run time without scikit-learn and every run sees the same split.

    .venv/bin/python benchmarks/make_digits.py
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "egp_fx" / "data" / "digits.npz"
VAL_PER_CLASS = 36   # 10 classes x 36 = 360 validation images, 1,437 left for training


def stratified_split(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """uint8 array: 0 = train, 1 = validation; `per_class` validation images of each class."""
    rng = np.random.RandomState(seed)
    split = np.zeros(len(labels), dtype=np.uint8)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        split[rng.permutation(idx)[:per_class]] = 1
    return split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    digits = load_digits()
    images = digits.images.astype(np.uint8)            # (1797, 8, 8), values 0..16
    labels = digits.target.astype(np.uint8)
    split = stratified_split(labels, VAL_PER_CLASS, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, images=images, labels=labels, split=split)
    print(f"wrote {args.out}: {len(images)} images, {int((split == 0).sum())} train / "
          f"{int(split.sum())} val, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
