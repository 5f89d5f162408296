"""Training augmentation for prune(): random translation (crop of a padded image) and horizontal flip.

The EGP reference trains CIFAR-10 with RandomCrop(32, padding=4) and RandomHorizontalFlip, and
takes its entropy statistics over the same augmenting training loader. Here the augmentation
works on batches of (N, C, H, W) tensors, as prune() sees them (already normalised):

    x_pad = pad(x, p)                            p = `pad` pixels on every side
    y[n]  = x_pad[n, :, dy_n : dy_n + H, dx_n : dx_n + W],   dy_n, dx_n uniform in {0, ..., 2p}
    y[n]  = flip_W(y[n])  with probability 1/2   (when `flip`)

so every sample moves by up to p pixels in each direction. The border is `fill` when given, and
otherwise repeats the edge pixels ("replicate"): prune() does not know which value is black in
normalised data (the reference pads black pixels before normalising). Presets:

    crop-flip   pad 4, flip       (the reference's CIFAR-10 augmentation)
    shift       pad 2, no flip    (digits: up to half a source pixel of the 8x8 images upsampled
                                   to 32x32; a flipped digit is another symbol)

The random draws come from a generator seeded with `seed`, so a run is reproducible; each pass
over the loader continues the same stream.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from egp_fx.errors import PruneError
from egp_fx.ir.batches import batch_input


@dataclass(frozen=True)
class Augment:
    """Random translation by up to `pad` pixels and (when `flip`) a random horizontal flip."""

    pad: int = 4
    flip: bool = True
    fill: float | None = None       # border value; None repeats the edge pixels
    seed: int = 0

    def __post_init__(self):
        if self.pad < 0:
            raise PruneError(f"Augment: pad must be >= 0, got {self.pad}")


PRESETS = {"crop-flip": Augment(pad=4, flip=True), "shift": Augment(pad=2, flip=False)}


def augment_preset(name: str | None, seed: int = 0) -> Augment | None:
    """The named preset ("crop-flip", "shift") with `seed`; None or "none" gives None."""
    if name is None or name == "none":
        return None
    if name not in PRESETS:
        raise PruneError(f"unknown augmentation {name!r}; choose one of {['none', *PRESETS]}")
    base = PRESETS[name]
    return Augment(base.pad, base.flip, base.fill, seed)


def augment_batch(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """One augmented copy of an image batch (N, C, H, W); `x` is not modified."""
    if x.dim() != 4 or not x.is_floating_point():
        raise PruneError(f"augmentation works on float image batches (N, C, H, W); got a "
                         f"{x.dtype} tensor of shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    out = x
    if aug.pad > 0:
        p = aug.pad
        padded = (F.pad(x, (p, p, p, p), mode="constant", value=float(aug.fill))
                  if aug.fill is not None else F.pad(x, (p, p, p, p), mode="replicate"))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]      # (N, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]      # (N, 1, W)
        idx = torch.arange(n, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2).contiguous()
    if aug.flip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def _replace_input(batch, x: torch.Tensor, input_key: str | None):
    if isinstance(batch, torch.Tensor):
        return x
    if isinstance(batch, Mapping):
        return {**batch, input_key: _replace_input(batch[input_key], x, None)}
    return type(batch)([_replace_input(batch[0], x, input_key), *batch[1:]]) \
        if isinstance(batch, list) else (_replace_input(batch[0], x, input_key), *batch[1:])


class AugmentedLoader:
    """Iterates `loader` and replaces each batch's input by an augmented copy (labels kept)."""

    def __init__(self, loader: Iterable, augment: Augment, input_key: str | None = None):
        self.loader, self.augment, self.input_key = loader, augment, input_key
        self.generator = torch.Generator().manual_seed(augment.seed)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            x = augment_batch(batch_input(batch, self.input_key), self.augment, self.generator)
            yield _replace_input(batch, x, self.input_key)
