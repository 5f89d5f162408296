"""The EGP prune loop (the pruning step of the EGP reference code), IMP with the same loop, and the ablation.

    model_0 = a deep copy of the caller's model; stats_0 = calibrate(model_0, train data)
    for i = 1..iterations:
        EGP: n_l = allocate(H_l from stats_{i-1}, |w_l|, nonzero_l)   (allocation.py)
             zero the n_l smallest |w| of each prunable layer l
        IMP: zero the smallest-|w| half of the nonzero weights, globally over the scope:
             "all" conv/linear layers (the reference) or the EGP-"prunable" ones   (imp.py)
        fine-tune with the masks kept (train.py)
        stats_i = calibrate(model_i) (eval mode, train data)  ->  entropies, OFF/ON layers
        record accuracy, sparsity, what egp_fx.compress removes; checkpoint; log
    reinit_ablation: re-draw model_iterations (frozen emptied layers) and train it from scratch
                     (reinit.py), recorded beside the rounds

The statistics are taken after fine-tuning, so the ones recorded for iteration i are the ones
that steer the pruning of iteration i+1. With `augment`, the training batches of fine-tuning and
of the entropy pass are augmented (augment.py), as in the reference; compress and the accuracy
are measured on the loaders as given.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from egp_fx import distributed as ranks
from egp_fx.calibrate.calibration import calibrate
from egp_fx.capture import trace
from egp_fx.distributed import training as across
from egp_fx.errors import PruneError
from egp_fx.ir.batches import batch_label

from .allocation import allocate
from .augment import Augment, AugmentedLoader
from .imp import global_magnitude_prune
from .layers import (
    PrunableLayer,
    find_prunable,
    masks_from_zeros,
    prune_smallest,
    weight_of,
    weighted_modules,
)
from .record import compress_summary, layer_entropy, make_record
from .reinit import train_from_scratch
from .runlog import (
    LOG_NAME,
    REINIT_NAME,
    IterationRecord,
    PruneResult,
    checkpoint_path,
    load_checkpoint,
    read_finished,
    read_reinit,
    save_checkpoint,
    write_log,
)
from .train import FinetuneConfig, evaluate, model_device
from .train import finetune as run_finetune

log = logging.getLogger(__name__)
METHODS = ("egp", "imp")
IMP_SCOPES = ("all", "prunable")


def _check_labels(loader: Iterable, config: FinetuneConfig, allow_empty: bool = False) -> None:
    for batch in loader:
        if batch_label(batch, config.label_key) is None:
            raise PruneError("the training loader yields no labels: prune() fine-tunes, so it needs "
                             "(input, label) batches (or dicts with label_key=)")
        return
    if not allow_empty:            # across ranks, fine-tuning checks that some rank has data
        raise PruneError("the training loader yielded no batches")


def _check_args(method: str, iterations: int, ratio: float, imp_scope: str,
                reinit_epochs: int | None) -> None:
    if method not in METHODS:
        raise PruneError(f"method must be one of {METHODS}, got {method!r}")
    if iterations < 0:
        raise PruneError(f"iterations must be >= 0, got {iterations}")
    if not 0 < ratio <= 1:
        raise PruneError(f"ratio (the share of the remaining weights pruned per round) must be in "
                         f"(0, 1], got {ratio}")
    if imp_scope not in IMP_SCOPES:
        raise PruneError(f"imp_scope must be one of {IMP_SCOPES}, got {imp_scope!r}")
    if reinit_epochs is not None and reinit_epochs < 1:
        raise PruneError(f"reinit_epochs must be >= 1, got {reinit_epochs}")


def _prune_egp(model: nn.Module, layers: list[PrunableLayer], gm: fx.GraphModule,
               masks: dict[str, torch.Tensor], ratio: float) -> dict:
    entropy = layer_entropy(gm, layers)
    remaining = {n: int(m.sum()) for n, m in masks.items()}
    mean_abs = {n: float(weight_of(model, n).detach()[masks[n]].abs().double().mean())
                if remaining[n] else 0.0 for n in masks}
    alloc = allocate(entropy, mean_abs, remaining, ratio)
    log.debug("EGP allocation: %d passes, emptied %s, excluded %s", alloc.passes, alloc.emptied,
              alloc.excluded)
    for name, n in alloc.prune.items():
        masks[name] = prune_smallest(weight_of(model, name), masks[name], n)
    return {"budget": alloc.pruned, "pruned": alloc.prune, "emptied": alloc.emptied,
            "excluded": alloc.excluded}


def _prune_imp(model: nn.Module, masks: dict[str, torch.Tensor], ratio: float) -> dict:
    before = {n: int(m.sum()) for n, m in masks.items()}
    pruned = global_magnitude_prune(model, masks, ratio)
    emptied = [n for n, k in pruned.items() if k and k == before[n]]
    return {"budget": sum(pruned.values()), "pruned": pruned, "emptied": emptied, "excluded": {}}


def _open_run(out: Path, header: dict, model: nn.Module, resume: bool) -> list[IterationRecord]:
    """The finished records in `out` (loading the last checkpoint into `model`) or [] for a new run."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (out / LOG_NAME).exists():
            raise PruneError(f"{out} already holds a run ({LOG_NAME}): pass resume=True or another "
                             "out_dir")
        return []
    records = read_finished(out, header)
    if records and records[-1].iteration > 0:
        load_checkpoint(model, checkpoint_path(out, records[-1].iteration))
        log.info("resuming %s after iteration %d from %s", header["method"], records[-1].iteration, out)
    return records


def prune(model: nn.Module, train_loader: Iterable, *, method: str = "egp", iterations: int = 5,
          finetune: FinetuneConfig = FinetuneConfig(), val_loader: Iterable | None = None,
          calib_batches: int | None = None, ratio: float = 0.5, imp_scope: str = "all",
          augment: Augment | None = None, reinit_ablation: bool = False,
          reinit_epochs: int | None = None, out_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, measure_compress: bool = True,
          compress_options: dict | None = None, distributed: bool | None = None) -> PruneResult:
    """Prune a copy of `model` for `iterations` rounds of EGP (or IMP), fine-tuning after each.

    imp_scope        IMP's layers: "all" conv/linear layers (the reference's baseline) or the
                     "prunable" ones EGP prunes (the convs feeding a ReLU/GELU)
    augment          augment the training batches of fine-tuning and of the entropy pass
    reinit_ablation  after the last round, re-initialise the surviving layers, freeze the
                     emptied ones and train from scratch for `reinit_epochs` (default: all the
                     rounds' epochs, iterations * finetune.epochs); result.reinit holds its record
    calib_batches    training batches used for the entropy statistics (None: all)
    out_dir          each iteration writes iter_{i}.safetensors and log.json there; `resume=True`
                     continues after the last finished iteration found there
    distributed      run across the ranks of the default torch.distributed process group
                     (default: when one is initialised; False keeps it local). Each rank passes
                     its own share of the training data (a DistributedSampler; val_loader: its
                     share, or all of it); fine-tuning runs under DistributedDataParallel, the
                     entropies and accuracies are over all ranks, every rank computes the same
                     masks from the same weights (checked), and rank 0 alone reads and writes
                     out_dir (on resume it sends the state to the others). Progress bars show
                     on rank 0 only.

    `model` is never modified.
    """
    _check_args(method, iterations, ratio, imp_scope, reinit_epochs)
    spread = ranks.enabled(distributed)
    progress = progress and (ranks.is_writer() or not spread)
    with ranks.together("prune: set-up", spread):
        _check_labels(train_loader, finetune, allow_empty=spread)
        model = copy.deepcopy(model)
        device = model_device(model, finetune.device)
        model.to(device)
        if spread:
            ranks.backend_device(device)
        layers = find_prunable(trace(model))
        if not layers:
            raise PruneError(f"{type(model).__name__} has no prunable layer: no conv/linear "
                             "module feeds a ReLU or GELU call")
    if spread:
        across.sync_state(model, "prune: start")
    names = [lay.module for lay in layers]
    pruned_names = weighted_modules(model) if method == "imp" and imp_scope == "all" else names
    header = {"method": method, "ratio": ratio, "iterations": iterations,
              "finetune": asdict(finetune), "prunable_layers": names, "pruned_layers": pruned_names,
              "imp_scope": imp_scope if method == "imp" else None,
              "augment": asdict(augment) if augment is not None else None}
    out = Path(out_dir) if out_dir is not None else None
    records = ranks.from_writer(lambda: _open_run(out, header, model, resume),
                                "prune: opening out_dir", spread) if out is not None else []
    if spread and records and records[-1].iteration > 0:
        across.sync_state(model, "prune: resumed state")
    train_data = AugmentedLoader(train_loader, augment, finetune.input_key) if augment else train_loader

    def stats(m: nn.Module) -> fx.GraphModule:
        return calibrate(m.eval(), train_data, max_batches=calib_batches, device=device,
                         input_key=finetune.input_key, progress=False, distributed=spread)

    def record(i: int, name: str, m: nn.Module, gm: fx.GraphModule, step: dict,
               history: list[dict], t0: float) -> IterationRecord:
        acc = evaluate(m, val_loader, finetune, distributed=spread) \
            if val_loader is not None else None
        rec = make_record(i, name, m, gm, layers, step, acc)
        if measure_compress:   # statistics of augmented batches are not those of the data as given
            rec.compress = compress_summary(m.eval(), train_loader, None if augment else gm,
                                            {**(compress_options or {}), "distributed": spread})
        rec.train, rec.seconds = history, round(time.perf_counter() - t0, 2)
        return rec

    def save(i: int) -> None:
        def write() -> None:
            if i > 0:
                save_checkpoint(model, checkpoint_path(out, i))
            write_log(out, header, records)
        if out is not None:
            ranks.from_writer(write, f"prune: saving iteration {i}", spread)

    gm = stats(model)
    if not records:
        records.append(record(0, method, model, gm, {}, [], time.perf_counter()))
        save(0)
    start = records[-1].iteration
    bar = tqdm(range(start + 1, iterations + 1), desc=f"prune[{method}]", unit="iter",
               disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        masks = masks_from_zeros(model, pruned_names)
        step = _prune_egp(model, layers, gm, masks, ratio) if method == "egp" \
            else _prune_imp(model, masks, ratio)
        if spread:
            across.check_identical(masks, f"the masks of iteration {i}")
        history = run_finetune(model, train_data, finetune, masks, progress=progress,
                               desc=f"{method} iter {i}", distributed=spread)
        gm = stats(model)
        records.append(record(i, method, model, gm, step, history, t0))
        save(i)
        rec = records[-1]
        bar.set_postfix(acc=rec.accuracy, sparsity=f"{rec.sparsity:.3f}", zero_H=rec.zero_entropy_layers)
        log.info("%s iteration %d: accuracy %s, sparsity %.4f, zero-entropy layers %d (OFF %d, ON %d)",
                 method, i, rec.accuracy, rec.sparsity, rec.zero_entropy_layers, rec.off_layers,
                 rec.on_layers)
    result = PruneResult(model.eval(), records, out)
    if reinit_ablation:
        epochs = reinit_epochs if reinit_epochs is not None else iterations * finetune.epochs
        result.reinit_model, result.reinit = _ablation(
            model, records, out, header, epochs, lambda m, gm, step, hist, t0: record(
                records[-1].iteration, f"{method}-reinit", m, gm, step, hist, t0),
            stats, train_data, finetune, resume, progress, spread)
    return result


def _ablation(model: nn.Module, records: list[IterationRecord], out: Path | None, header: dict,
              epochs: int, record, stats, train_data: Iterable, finetune: FinetuneConfig,
              resume: bool, progress: bool, spread: bool) -> tuple[nn.Module, IterationRecord]:
    """The re-initialisation ablation of the last round's model (or the stored one on resume)."""
    last = records[-1].iteration
    scratch = copy.deepcopy(model)

    def stored_ablation() -> IterationRecord | None:
        found = read_reinit(out, last) if out is not None and resume else None
        if found is not None and found.train and len(found.train) == epochs:
            load_checkpoint(scratch, out / REINIT_NAME)
            return found
        return None

    stored = ranks.from_writer(stored_ablation, "prune: stored ablation", spread)
    if stored is not None:
        if spread:
            across.sync_state(scratch, "prune: stored ablation state")
        log.info("re-initialisation ablation of iteration %d reused from %s", last, out)
        return scratch.eval(), stored
    if max(epochs, 0) == 0:
        raise PruneError("the re-initialisation ablation needs at least one epoch: pass reinit_epochs")
    t0 = time.perf_counter()
    frozen, history = train_from_scratch(scratch, train_data, finetune, epochs, progress=progress,
                                         distributed=spread)
    rec = record(scratch, stats(scratch), {"frozen": frozen}, history, t0)
    log.info("re-initialisation ablation of iteration %d: accuracy %s (pruned: %s), %d frozen layers",
             last, rec.accuracy, records[-1].accuracy, len(frozen))

    def write() -> None:
        save_checkpoint(scratch, out / REINIT_NAME)
        write_log(out, header, records, rec)
    if out is not None:
        ranks.from_writer(write, "prune: saving the ablation", spread)
    return scratch.eval(), rec
