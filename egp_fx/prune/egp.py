"""The EGP prune loop (EGP.md, "EGP pruning step"), and IMP with the same loop.

    model_0 = a deep copy of the caller's model; stats_0 = calibrate(model_0)
    for i = 1..iterations:
        EGP: n_l = allocate(H_l from stats_{i-1}, |w_l|, nonzero_l)   (allocation.py)
             zero the n_l smallest |w| of each layer l
        IMP: zero the smallest-|w| half of all prunable weights, globally   (imp.py)
        fine-tune with the masks kept (train.py)
        stats_i = calibrate(model_i) (eval mode, train loader)  ->  entropies, OFF/ON layers
        record accuracy, sparsity, what egp_fx.compress removes; checkpoint; log

The statistics are taken after fine-tuning, so the ones recorded for iteration i are the ones
that steer the pruning of iteration i+1.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import calibrate
from ..data import batch_label
from ..table import layer_stats
from ..tracing import trace
from .allocation import allocate
from .errors import PruneError
from .imp import global_magnitude_prune
from .layers import (PrunableLayer, count_nonzero, find_prunable, masks_from_zeros, prune_smallest,
                     weight_of, weighted_modules)
from .runlog import (LOG_NAME, IterationRecord, PruneResult, checkpoint_path, load_checkpoint,
                     read_finished, save_checkpoint, write_log)
from .train import FinetuneConfig, evaluate, finetune as run_finetune, model_device

log = logging.getLogger(__name__)
METHODS = ("egp", "imp")


def _check_labels(loader: Iterable, config: FinetuneConfig) -> None:
    for batch in loader:
        if batch_label(batch, config.label_key) is None:
            raise PruneError("the training loader yields no labels: prune() fine-tunes, so it needs "
                             "(input, label) batches (or dicts with label_key=)")
        return
    raise PruneError("the training loader yielded no batches")


def _layer_entropy(gm: fx.GraphModule, layers: list[PrunableLayer]) -> dict[str, float]:
    rows = {r.node: r for r in layer_stats(gm)}
    return {lay.module: sum(rows[a].egp_entropy for a in lay.activations) / len(lay.activations)
            for lay in layers}


def _prune_egp(model: nn.Module, layers: list[PrunableLayer], gm: fx.GraphModule,
               masks: dict[str, torch.Tensor], ratio: float) -> dict:
    entropy = _layer_entropy(gm, layers)
    remaining = {n: int(m.sum()) for n, m in masks.items()}
    mean_abs = {n: float(weight_of(model, n).detach()[masks[n]].abs().double().mean())
                if remaining[n] else 0.0 for n in masks}
    alloc = allocate(entropy, mean_abs, remaining, ratio)
    for name, n in alloc.prune.items():
        masks[name] = prune_smallest(weight_of(model, name), masks[name], n)
    return {"budget": alloc.budget, "pruned": alloc.prune, "emptied": alloc.emptied,
            "excluded": alloc.excluded}


def _prune_imp(model: nn.Module, masks: dict[str, torch.Tensor], ratio: float) -> dict:
    before = {n: int(m.sum()) for n, m in masks.items()}
    pruned = global_magnitude_prune(model, masks, ratio)
    emptied = [n for n, k in pruned.items() if k and k == before[n]]
    return {"budget": sum(pruned.values()), "pruned": pruned, "emptied": emptied, "excluded": {}}


def _totals(t) -> dict:
    if is_dataclass(t):
        return asdict(t)
    if hasattr(t, "_asdict"):
        return dict(t._asdict())
    return {k: getattr(t, k) for k in ("params", "flops", "weighted_depth", "nonlinear_depth")
            if hasattr(t, k)}


def _compress_summary(model: nn.Module, loader: Iterable, gm: fx.GraphModule, options: dict
                      ) -> dict | None:
    """What egp_fx.compress removes from `model` (reusing the statistics in `gm`); None when
    compress is not available."""
    try:
        from ..compress import compress  # noqa: PLC0415
    except ImportError:
        return None
    try:
        kwargs = {"progress": False, "calibrated": gm, **options}
        report = compress(model, loader, **kwargs).meta["egp_report"]
        before, after = _totals(report.before), _totals(report.after)
    except Exception as err:  # reason: a failing measurement must not end a long pruning run
        log.warning("compress failed on the pruned model: %s: %s", type(err).__name__, err)
        return {"error": f"{type(err).__name__}: {err}"}
    removed = None
    if "weighted_depth" in before and "weighted_depth" in after:
        removed = before["weighted_depth"] - after["weighted_depth"]
    return {"before": before, "after": after, "removed_weighted_layers": removed}


def _record(i: int, method: str, model: nn.Module, gm: fx.GraphModule, layers: list[PrunableLayer],
            step: dict, accuracy: float | None) -> IterationRecord:
    names = [lay.module for lay in layers]
    nz, tot = count_nonzero(model, names)
    nz_all, tot_all = count_nonzero(model, weighted_modules(model))
    params = sum(p.numel() for p in model.parameters())
    nonzero_params = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    rows = layer_stats(gm)
    feeder = {a: lay.module for lay in layers for a in lay.activations}
    acts = [{"node": r.node, "module": feeder.get(r.node), "channels": r.channels,
             "dead": len(r.dead), "linear": len(r.linear), "egp_entropy": r.egp_entropy,
             "easier_entropy": r.easier_entropy, "state": r.state} for r in rows]
    entropy = _layer_entropy(gm, layers)
    per_layer = [{"module": n, "weights": weight_of(model, n).numel(),
                  "nonzero": int(torch.count_nonzero(weight_of(model, n))), "entropy": entropy[n]}
                 for n in names]
    return IterationRecord(
        iteration=i, method=method, accuracy=accuracy, sparsity=1 - nz / tot,
        sparsity_all=1 - nz_all / tot_all, nonzero_params=nonzero_params, params=params,
        budget=step.get("budget", 0), pruned=step.get("pruned", {}), emptied=step.get("emptied", []),
        excluded=step.get("excluded", {}), layers=per_layer, activations=acts,
        zero_entropy_layers=sum(r.egp_entropy == 0 for r in rows),
        off_layers=sum(r.state == "dead" for r in rows),
        on_layers=sum(len(r.linear) == r.channels for r in rows), activation_layers=len(rows))


def _open_run(out: Path, header: dict, model: nn.Module, resume: bool) -> list[IterationRecord]:
    """The finished records in `out` (loading the last checkpoint into `model`) or [] for a new run."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (out / LOG_NAME).exists():
            raise PruneError(f"{out} already holds a run ({LOG_NAME}): pass resume=True or another out_dir")
        return []
    records = read_finished(out, header)
    if records and records[-1].iteration > 0:
        load_checkpoint(model, checkpoint_path(out, records[-1].iteration))
        log.info("resuming %s after iteration %d from %s", header["method"], records[-1].iteration, out)
    return records


def prune(model: nn.Module, train_loader: Iterable, *, method: str = "egp", iterations: int = 5,
          finetune: FinetuneConfig = FinetuneConfig(), val_loader: Iterable | None = None,
          calib_batches: int | None = None, ratio: float = 0.5, out_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, measure_compress: bool = True,
          compress_options: dict | None = None) -> PruneResult:
    """Prune a copy of `model` for `iterations` rounds of EGP (or IMP), fine-tuning after each.

    `calib_batches` limits the training batches used for the entropy statistics (None: all).
    With `out_dir`, each iteration writes iter_{i}.safetensors and log.json; `resume=True`
    continues after the last finished iteration found there. `model` is never modified.
    """
    if method not in METHODS:
        raise PruneError(f"method must be one of {METHODS}, got {method!r}")
    if iterations < 0:
        raise PruneError(f"iterations must be >= 0, got {iterations}")
    _check_labels(train_loader, finetune)
    model = copy.deepcopy(model)
    device = model_device(model, finetune.device)
    model.to(device)
    layers = find_prunable(trace(model))
    if not layers:
        raise PruneError(f"{type(model).__name__} has no prunable layer: no conv/linear module "
                         "feeds a ReLU or GELU call")
    names = [lay.module for lay in layers]
    header = {"method": method, "ratio": ratio, "iterations": iterations,
              "finetune": asdict(finetune), "prunable_layers": names}
    out = Path(out_dir) if out_dir is not None else None
    records = _open_run(out, header, model, resume) if out is not None else []

    def stats() -> fx.GraphModule:
        return calibrate(model.eval(), train_loader, max_batches=calib_batches, device=device,
                         input_key=finetune.input_key, progress=False)

    def measure(i: int, gm: fx.GraphModule, step: dict, history: list[dict], t0: float) -> None:
        acc = evaluate(model, val_loader, finetune) if val_loader is not None else None
        rec = _record(i, method, model, gm, layers, step, acc)
        if measure_compress:
            rec.compress = _compress_summary(model.eval(), train_loader, gm, compress_options or {})
        rec.train, rec.seconds = history, round(time.perf_counter() - t0, 2)
        records.append(rec)
        if out is not None:
            if i > 0:
                save_checkpoint(model, checkpoint_path(out, i))
            write_log(out, header, records)

    gm = stats()
    if not records:
        measure(0, gm, {}, [], time.perf_counter())
    start = records[-1].iteration
    bar = tqdm(range(start + 1, iterations + 1), desc=f"prune[{method}]", unit="iter",
               disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        masks = masks_from_zeros(model, names)
        step = _prune_egp(model, layers, gm, masks, ratio) if method == "egp" \
            else _prune_imp(model, masks, ratio)
        history = run_finetune(model, train_loader, finetune, masks, progress=progress,
                               desc=f"{method} iter {i}")
        gm = stats()
        measure(i, gm, step, history, t0)
        rec = records[-1]
        bar.set_postfix(acc=rec.accuracy, sparsity=f"{rec.sparsity:.3f}", zero_H=rec.zero_entropy_layers)
        log.info("%s iteration %d: accuracy %s, sparsity %.4f, zero-entropy layers %d (OFF %d, ON %d)",
                 method, i, rec.accuracy, rec.sparsity, rec.zero_entropy_layers, rec.off_layers,
                 rec.on_layers)
    return PruneResult(model.eval(), records, out)
