"""EGP, the training-time algorithm: entropy-guided unstructured pruning that collapses layers.

Two forms:
- `EGPPruner(model, calib_loader, ratio=0.5, method="egp"|"imp")` (pruner.py) lives in the
  caller's training loop: step() runs one round (the entropy pass, the allocation of
  allocation.py or IMP's global magnitude pruning of imp.py, L1 masks held by parametrizations,
  masks.py), report() says where the model stands, remove() leaves a plain model.
  EGPCallback (callback.py) calls step() from a Hugging Face transformers.Trainer.
- `prune(model, train_loader, ...)` (egp.py) is the driver of the reference's loop on top of it:
  rounds of step() and fine-tuning (train.py, with losses.py's loss and metric functions) on
  optionally augmented batches (augment.py), a run log and checkpoints (runlog.py), and
  optionally the re-initialisation ablation (reinit.py).
layers.py finds the prunable layers on the captured graph with the one op classifier; record.py
reads the statistics. models.py and datasets.py hold the ResNet-18 (CIFAR stem) and the offline
digits data of the experiment in benchmarks/make_demo_checkpoint.py.

`egp_fx.prune(model, loader, ...)` is egp.prune, and `egp_fx.EGPPruner` is pruner.EGPPruner.
"""
from egp_fx.errors import PruneError

from .allocation import Allocation, allocate
from .augment import Augment, AugmentedLoader, augment_batch, augment_preset
from .callback import EGPCallback
from .datasets import digits_loaders, load_digits_data
from .egp import prune
from .imp import global_magnitude_prune
from .layers import PRUNED_KINDS, PrunableLayer, find_prunable, find_weighted
from .losses import BCE, LOSSES, MSE, CrossEntropy, LMLoss, TopOne, loss_by_name
from .masks import Masks, WeightMask, prune_smallest
from .models import load_demo_model, resnet18_cifar
from .pruner import IMP_SCOPES, METHODS, EGPPruner, PruneStep
from .reinit import reinitialize, train_from_scratch
from .runlog import IterationRecord, PruneResult
from .train import FinetuneConfig, evaluate, finetune, validate

__all__ = [
    "BCE", "IMP_SCOPES", "LOSSES", "METHODS", "MSE", "PRUNED_KINDS", "Allocation", "Augment",
    "AugmentedLoader", "CrossEntropy", "EGPCallback", "EGPPruner", "FinetuneConfig",
    "IterationRecord", "LMLoss", "Masks", "PrunableLayer", "PruneError", "PruneResult",
    "PruneStep", "TopOne", "WeightMask", "allocate", "augment_batch", "augment_preset",
    "digits_loaders", "evaluate", "find_prunable", "find_weighted", "finetune",
    "global_magnitude_prune", "load_demo_model", "load_digits_data", "loss_by_name", "prune",
    "prune_smallest", "reinitialize", "resnet18_cifar", "train_from_scratch", "validate",
]
