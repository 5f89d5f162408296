"""EGP, the training-time algorithm: entropy-guided unstructured pruning that collapses layers.

`prune(model, train_loader, method="egp"|"imp", ...)` runs the iterative loop of egp.py with the
per-layer budget of allocation.py (EGP) or global magnitude pruning (imp.py), fine-tuning after
each round (train.py) on optionally augmented batches (augment.py), and optionally the
re-initialisation ablation (reinit.py). models.py and datasets.py hold the ResNet-18 (CIFAR stem)
and the offline digits data of the experiment in benchmarks/make_demo_checkpoint.py.

`egp_fx.prune(model, loader, ...)` is egp.prune: a plain function exported from this package.
"""
from egp_fx.errors import PruneError

from .allocation import Allocation, allocate
from .augment import Augment, AugmentedLoader, augment_batch, augment_preset
from .datasets import digits_loaders, load_digits_data
from .egp import IMP_SCOPES, prune
from .imp import global_magnitude_prune
from .layers import PrunableLayer, find_prunable
from .models import load_demo_model, resnet18_cifar
from .reinit import reinitialize, train_from_scratch
from .runlog import IterationRecord, PruneResult
from .train import FinetuneConfig, evaluate, finetune

__all__ = [
    "IMP_SCOPES", "Allocation", "Augment", "AugmentedLoader", "FinetuneConfig", "IterationRecord",
    "PrunableLayer", "PruneError", "PruneResult", "allocate", "augment_batch", "augment_preset",
    "digits_loaders", "evaluate", "find_prunable", "finetune", "global_magnitude_prune",
    "load_demo_model", "load_digits_data", "prune", "reinitialize", "resnet18_cifar",
    "train_from_scratch",
]

