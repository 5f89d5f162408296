"""egp_fx.prune: the EGP prune loop of the reference code (or IMP, and the ablation), as a driver
on top of EGPPruner (pruner.py).

    model_0 = a deep copy of the caller's model; pruner = EGPPruner(model_0, training batches)
    stats_0 = pruner.entropy_pass()
    for i = 1..iterations:
        pruner.step(stats_{i-1})      EGP: allocation.py's budget, L1 per layer; IMP: global L1
                                      over the scope (imp.py); the masks are parametrizations
        fine-tune (train.py): loss_fn, optimizer, scheduler (default: the reference's
                              cross-entropy and SGD schedule)
        stats_i = pruner.entropy_pass()   (eval mode, training data)
        record metric_fn and loss_fn on val_loader, sparsity, entropies, OFF/ON layers and what
        egp_fx.compress removes (pruner.report); checkpoint (plain weights); log
    pruner.remove(): the result is a plain model with zeros where pruned
    reinit_ablation: re-draw the last model (frozen emptied layers) and train it from scratch
                     (reinit.py), recorded beside the rounds

The statistics are taken after fine-tuning, so the ones recorded for iteration i are the ones
that steer the pruning of iteration i+1. With `augment`, the training batches of fine-tuning and
of the entropy pass are augmented (augment.py), as in the reference; compress and the metric
are measured on the loaders as given.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from egp_fx import distributed as ranks
from egp_fx.calibrate.calibration import calibrate
from egp_fx.distributed import training as across
from egp_fx.errors import PruneError
from egp_fx.ir.batches import batch_label

from .augment import Augment, AugmentedLoader
from .pruner import IMP_SCOPES, METHODS, EGPPruner, check_options
from .record import compress_summary, make_record
from .reinit import train_from_scratch
from .runlog import (
    LOG_NAME,
    REINIT_NAME,
    IterationRecord,
    PruneResult,
    checkpoint_path,
    load_checkpoint,
    read_checkpoint,
    read_finished,
    read_reinit,
    save_checkpoint,
    write_log,
)
from .train import FinetuneConfig, Objective, model_device, objective, validate
from .train import finetune as run_finetune

log = logging.getLogger(__name__)
__all__ = ["IMP_SCOPES", "METHODS", "prune"]


def _first_batch(loader: Iterable, goal: Objective, config: FinetuneConfig,
                 allow_empty: bool = False):
    """The first training batch (the capture's example), checked for the labels the loss needs."""
    for batch in loader:
        if getattr(goal.loss_fn, "needs_labels", False) and \
                batch_label(batch, config.label_key) is None:
            raise PruneError("the training loader yields no labels: prune() fine-tunes with "
                             f"the {getattr(goal.loss_fn, 'name', 'given')} loss, so it needs "
                             "(input, label) batches (or dicts with label_key=)")
        return batch
    if not allow_empty:            # across ranks, fine-tuning checks that some rank has data
        raise PruneError("the training loader yielded no batches")
    return None


def _check_args(method: str, iterations: int, ratio: float, imp_scope: str,
                reinit_epochs: int | None) -> None:
    check_options(method, ratio, imp_scope)
    if iterations < 0:
        raise PruneError(f"iterations must be >= 0, got {iterations}")
    if reinit_epochs is not None and reinit_epochs < 1:
        raise PruneError(f"reinit_epochs must be >= 1, got {reinit_epochs}")


def _open_run(out: Path, header: dict, pruner: EGPPruner, resume: bool) -> list[IterationRecord]:
    """The finished records in `out` (loading the last checkpoint into the pruner's model) or
    [] for a new run."""
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        if (out / LOG_NAME).exists():
            raise PruneError(f"{out} already holds a run ({LOG_NAME}): pass resume=True or another "
                             "out_dir")
        return []
    records = read_finished(out, header)
    if records and records[-1].iteration > 0:
        path = checkpoint_path(out, records[-1].iteration)
        device = model_device(pruner.model)
        pruner.masks.load_plain(read_checkpoint(path, device))
        log.info("resuming %s after iteration %d from %s", header["method"], records[-1].iteration, out)
    return records


def _name(fn) -> str | None:
    return None if fn is None else getattr(fn, "name", None) or getattr(fn, "__name__", None) \
        or type(fn).__name__


def prune(model: nn.Module, train_loader: Iterable, *, method: str = "egp", iterations: int = 5,
          finetune: FinetuneConfig = FinetuneConfig(), val_loader: Iterable | None = None,
          calib_batches: int | None = None, ratio: float = 0.5, imp_scope: str = "all",
          augment: Augment | None = None, reinit_ablation: bool = False,
          reinit_epochs: int | None = None, out_dir: str | Path | None = None, resume: bool = False,
          progress: bool = True, measure_compress: bool = True,
          compress_options: dict | None = None, distributed: bool | None = None,
          loss_fn: Callable | None = None, metric_fn: Callable | None = None,
          optimizer: Callable | None = None, scheduler: Callable | None = None,
          capture: str = "auto") -> PruneResult:
    """Prune a copy of `model` for `iterations` rounds of EGP (or IMP), fine-tuning after each.

    loss_fn          loss_fn(output, batch) -> loss (default: cross-entropy on (input, label)
                     batches; egp_fx.pruning.loss_by_name("bce" | "mse" | "lm"))
    metric_fn        metric_fn(output, batch) -> float, higher is better, recorded per round on
                     val_loader (default: top-1 accuracy with the default loss, none otherwise)
    optimizer        optimizer(params) -> torch.optim.Optimizer, made each round (default: SGD,
                     momentum 0.9, weight decay 1e-4, finetune.lr)
    scheduler        scheduler(optimizer) -> LR scheduler stepped once per epoch (default: x0.1
                     at 50% and 75% of the round's epochs)
    capture          how the model is captured to find its layers and take its statistics:
                     "auto" (torch.fx, then torch.export), "fx" or "export"
    imp_scope        IMP's layers: "all" conv/linear layers (the reference's baseline) or the
                     "prunable" ones EGP prunes (the conv/linear feeding a ReLU-like, GELU or SiLU)
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
                     entropies and figures are over all ranks, every rank computes the same
                     masks from the same weights (checked), and rank 0 alone reads and writes
                     out_dir (on resume it sends the state to the others). Progress bars show
                     on rank 0 only.

    `model` is never modified; result.model is a pruned plain copy (zeros where pruned). For
    pruning inside your own training loop, use EGPPruner.
    """
    _check_args(method, iterations, ratio, imp_scope, reinit_epochs)
    goal = objective(finetune, loss_fn, metric_fn, optimizer, scheduler)
    spread = ranks.enabled(distributed)
    progress = progress and (ranks.is_writer() or not spread)
    with ranks.together("prune: set-up", spread):
        first = _first_batch(train_loader, goal, finetune, allow_empty=spread)
        model = copy.deepcopy(model)
        device = model_device(model, finetune.device)
        model.to(device)
        if spread:
            ranks.backend_device(device)
    if spread:
        across.sync_state(model, "prune: start")
    train_data = AugmentedLoader(train_loader, augment, finetune.input_key) if augment else train_loader
    pruner = EGPPruner(model, train_data, ratio, capture=capture, input_key=finetune.input_key,
                       method=method, imp_scope=imp_scope, calib_batches=calib_batches,
                       example=first, distributed=spread)
    header = {"method": method, "ratio": ratio, "iterations": iterations,
              "finetune": asdict(finetune), "prunable_layers": pruner.layer_names,
              "pruned_layers": pruner.pruned_names,
              "imp_scope": imp_scope if method == "imp" else None,
              "augment": asdict(augment) if augment is not None else None,
              "loss": _name(loss_fn), "metric": _name(metric_fn), "capture": pruner.capture}
    out = Path(out_dir) if out_dir is not None else None
    records = ranks.from_writer(lambda: _open_run(out, header, pruner, resume),
                                "prune: opening out_dir", spread) if out is not None else []
    if spread and records and records[-1].iteration > 0:
        across.sync_state(model, "prune: resumed state")
    fit = {"loss_fn": loss_fn, "metric_fn": metric_fn, "optimizer": optimizer,
           "scheduler": scheduler}

    def record(i: int, name: str, m: nn.Module, gm: fx.GraphModule, rec: IterationRecord,
               history: list[dict], t0: float) -> IterationRecord:
        rec.iteration, rec.method = i, name
        if val_loader is not None:
            figures = validate(m, val_loader, finetune, loss_fn=loss_fn, metric_fn=metric_fn,
                               distributed=spread)
            rec.metric, rec.val_loss = figures["metric"], figures["loss"]
            rec.accuracy = rec.metric if goal.default_metric else None
        if measure_compress:   # statistics of augmented batches are not those of the data as given
            view = pruner.plain_view().eval() if pruner.model is m else m.eval()
            rec.compress = compress_summary(view, train_loader, None if augment else gm,
                                            {**(compress_options or {}), "distributed": spread})
        rec.train, rec.seconds = history, round(time.perf_counter() - t0, 2)
        return rec

    def save(i: int) -> None:
        def write() -> None:
            if i > 0:
                save_checkpoint(pruner.plain_view(), checkpoint_path(out, i))
            write_log(out, header, records)
        if out is not None:
            ranks.from_writer(write, f"prune: saving iteration {i}", spread)

    gm = pruner.entropy_pass()
    if not records:
        t0 = time.perf_counter()
        records.append(record(0, method, model, gm, pruner.report(stats=gm, compress=False), [], t0))
        save(0)
    start = records[-1].iteration
    pruner.round = start
    bar = tqdm(range(start + 1, iterations + 1), desc=f"prune[{method}]", unit="iter",
               disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        pruner.step(stats=gm)
        history = run_finetune(model, train_data, finetune, progress=progress,
                               desc=f"{method} iter {i}", distributed=spread, **fit)
        gm = pruner.entropy_pass()
        records.append(record(i, method, model, gm, pruner.report(stats=gm, compress=False),
                              history, t0))
        save(i)
        rec = records[-1]
        bar.set_postfix(metric=rec.metric, sparsity=f"{rec.sparsity:.3f}",
                        zero_H=rec.zero_entropy_layers)
        log.info("%s iteration %d: metric %s, loss %s, sparsity %.4f, zero-entropy layers %d "
                 "(OFF %d, ON %d)", method, i, rec.metric, rec.val_loss, rec.sparsity,
                 rec.zero_entropy_layers, rec.off_layers, rec.on_layers)
    weighted = list(pruner.weighted)
    model = pruner.remove().eval()
    result = PruneResult(model, records, out)
    if reinit_ablation:
        epochs = reinit_epochs if reinit_epochs is not None else iterations * finetune.epochs
        result.reinit_model, result.reinit = _ablation(
            model, records, out, header, epochs, weighted, pruner, record, train_data, finetune,
            fit, resume, progress, spread)
    return result


def _ablation(model: nn.Module, records: list[IterationRecord], out: Path | None, header: dict,
              epochs: int, weighted: list[str], pruner: EGPPruner, record, train_data: Iterable,
              finetune: FinetuneConfig, fit: dict, resume: bool, progress: bool, spread: bool
              ) -> tuple[nn.Module, IterationRecord]:
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
    frozen, history = train_from_scratch(scratch, train_data, finetune, epochs, weights=weighted,
                                         progress=progress, distributed=spread, **fit)
    gm, rec = _scratch_record(scratch, pruner, train_data)
    rec = record(last, f"{records[-1].method}-reinit", scratch, gm, rec, history, t0)
    rec.frozen = frozen
    log.info("re-initialisation ablation of iteration %d: metric %s (pruned: %s), %d frozen layers",
             last, rec.metric, records[-1].metric, len(frozen))

    def write() -> None:
        save_checkpoint(scratch, out / REINIT_NAME)
        write_log(out, header, records, rec)
    if out is not None:
        ranks.from_writer(write, "prune: saving the ablation", spread)
    return scratch.eval(), rec


def _scratch_record(scratch: nn.Module, pruner: EGPPruner, train_data: Iterable
                    ) -> tuple[fx.GraphModule, IterationRecord]:
    """The statistics and record of the ablation's (plain) model, on the pruner's layers."""
    gm = calibrate(scratch.eval(), train_data, max_batches=pruner.calib_batches,
                   input_key=pruner.input_key, progress=False, capture_mode=pruner.capture,
                   distributed=pruner.spread)
    return gm, make_record(0, "", scratch, gm, pruner.layers_in(gm), pruner.weighted, {}, None)
