"""What prune() records per iteration, and how a run is stored in out_dir.

    out_dir/log.json              {"method", "ratio", "finetune", "prunable_layers", "pruned_layers",
                                   "augment", "records": [...], "reinit": {...} or absent}
    out_dir/iter_{i}.safetensors  the model's state_dict after iteration i (plain weights, zeros
                                  where pruned: the masks are the zeros)
    out_dir/reinit.safetensors    the re-initialisation ablation's model (reinit_ablation=True)

Iteration 0 is the model as given (no checkpoint: the caller holds it). A run resumes from the
last record whose checkpoint exists; the ablation is reused when it was made from that record.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from egp_fx.deploy.saving import save_weights
from egp_fx.errors import PruneError

LOG_NAME = "log.json"
REINIT_NAME = "reinit.safetensors"
RESUME_KEYS = ("method", "ratio", "prunable_layers", "pruned_layers", "augment")


@dataclass
class IterationRecord:
    iteration: int
    method: str
    accuracy: float | None                 # validation top-1 (None without val_loader or with
                                           # another loss or metric: see `metric`)
    sparsity: float                        # zero fraction of the prunable weights
    sparsity_all: float                    # zero fraction of all conv/linear weights
    nonzero_params: int                    # over all parameters
    params: int
    budget: int                            # weights pruned this iteration
    pruned: dict[str, int]                 # per prunable layer
    emptied: list[str]                     # layers whose last weights went this iteration
    excluded: dict[str, str]               # layer -> why it was not in the pool
    layers: list[dict]                     # per prunable layer: weights, nonzero, entropy
    activations: list[dict]                # per activation call: entropies, dead/linear, state
    zero_entropy_layers: int               # activation calls with EGP entropy 0
    off_layers: int                        # ... with all channels dead (always OFF)
    on_layers: int                         # ... with all channels linear (always ON)
    activation_layers: int                 # all activation calls (17 in ResNet-18)
    compress: dict | None = None           # what egp_fx.compress removes (None: not measured)
    train: list[dict] = field(default_factory=list)   # fine-tuning history
    seconds: float = 0.0
    frozen: list[str] = field(default_factory=list)   # re-initialisation ablation: frozen layers
    metric: float | None = None            # validation metric_fn (top-1 accuracy by default)
    val_loss: float | None = None          # validation loss_fn

    @property
    def empty_layers(self) -> list[str]:
        """The prunable layers with no weight left (emptied in this round or before)."""
        return [lay["module"] for lay in self.layers if lay["nonzero"] == 0]


@dataclass
class PruneResult:
    """The pruned model (plain weights, zeros where pruned) and the per-iteration log."""

    model: nn.Module
    log: list[IterationRecord]
    out_dir: Path | None = None
    reinit: IterationRecord | None = None          # the re-initialisation ablation (method "...-reinit")
    reinit_model: nn.Module | None = None

    @property
    def final(self) -> IterationRecord:
        return self.log[-1]


def checkpoint_path(out_dir: Path, iteration: int) -> Path:
    return out_dir / f"iter_{iteration}.safetensors"


def save_checkpoint(model: nn.Module, path: Path) -> None:
    save_weights(model, path)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    return load_file(str(path), device=str(device))


def load_checkpoint(model: nn.Module, path: Path) -> None:
    device = next(model.parameters(), torch.empty(0)).device
    try:
        model.load_state_dict(read_checkpoint(path, device))
    except RuntimeError as err:
        raise PruneError(f"checkpoint {path} does not fit the model: {err}") from err


def write_log(out_dir: Path, header: dict, records: list[IterationRecord],
              reinit: IterationRecord | None = None) -> None:
    doc = {**header, "records": [asdict(r) for r in records]}
    if reinit is not None:
        doc["reinit"] = asdict(reinit)
    tmp = out_dir / (LOG_NAME + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, out_dir / LOG_NAME)


def read_finished(out_dir: Path, header: dict) -> list[IterationRecord]:
    """The records of a previous run in out_dir up to the last one with a checkpoint."""
    path = out_dir / LOG_NAME
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    for key in RESUME_KEYS:
        if doc.get(key) != header.get(key):
            raise PruneError(f"cannot resume from {path}: its {key} is {doc.get(key)!r}, this run's "
                             f"is {header.get(key)!r}; use another out_dir")
    records = []
    for d in doc["records"]:
        i = d["iteration"]
        if i > 0 and not checkpoint_path(out_dir, i).exists():
            break
        records.append(IterationRecord(**d))
    return records


def read_reinit(out_dir: Path, iteration: int) -> IterationRecord | None:
    """The ablation stored in out_dir when it was made from `iteration` and its checkpoint exists."""
    path = out_dir / LOG_NAME
    if not path.exists() or not (out_dir / REINIT_NAME).exists():
        return None
    d = json.loads(path.read_text()).get("reinit")
    return IterationRecord(**d) if d and d["iteration"] == iteration else None
