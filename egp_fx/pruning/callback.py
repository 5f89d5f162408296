"""EGPCallback: EGP rounds from a Hugging Face transformers.Trainer.

    pruner = EGPPruner(model, calib_batches, ratio=0.5)        # token batches: dicts of tensors
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[EGPCallback(pruner, every_n_epochs=1)])
    trainer.train()                                            # a round after every epoch
    pruner.remove()                                            # then save_pretrained as usual

At the end of every `every_n_epochs`-th epoch (by the Trainer's epoch count, so a resumed run
keeps the schedule) the callback runs pruner.step(), up to `max_rounds` rounds, and logs the
round. The Trainer's optimizer needs nothing: the masks hold through its steps (masks.py).
Every Trainer event it does not use is TrainerCallback's own (a no-op).

transformers is an optional dependency (the `hf` extra): it is imported when a callback is made,
and a missing install is a PruneError then, not an ImportError when egp_fx is imported.
"""
from __future__ import annotations

import logging

from egp_fx.errors import PruneError

from .pruner import EGPPruner

log = logging.getLogger(__name__)


def _trainer_callback() -> type:
    try:
        from transformers import TrainerCallback  # noqa: PLC0415  (optional: the hf extra)
    except ImportError as err:
        raise PruneError("EGPCallback needs transformers: pip install 'egp-fx[hf]'") from err
    return TrainerCallback


class EGPCallback:
    """A transformers.TrainerCallback that runs pruner.step() every `every_n_epochs` epochs."""

    def __init__(self, pruner: EGPPruner, every_n_epochs: int = 1, max_rounds: int | None = None):
        if not isinstance(pruner, EGPPruner):
            raise PruneError(f"EGPCallback takes an EGPPruner, got {type(pruner).__name__}")
        if not (isinstance(every_n_epochs, int) and every_n_epochs >= 1):
            raise PruneError(f"every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if max_rounds is not None and max_rounds < 0:
            raise PruneError(f"max_rounds must be >= 0, got {max_rounds}")
        self._events = _trainer_callback()()
        self.pruner, self.every_n_epochs, self.max_rounds = pruner, every_n_epochs, max_rounds
        self.stepped_at: list[int] = []          # the epochs after which a round ran

    def __getattr__(self, name: str):
        if name.startswith("on_"):               # the events this callback does not use
            return getattr(self.__dict__["_events"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def on_epoch_end(self, args, state, control, **kwargs):
        epoch = round(state.epoch) if state.epoch is not None else len(self.stepped_at) + 1
        due = epoch % self.every_n_epochs == 0 and epoch not in self.stepped_at
        if due and (self.max_rounds is None or self.pruner.round < self.max_rounds):
            done = self.pruner.step()
            self.stepped_at.append(epoch)
            log.info("EGPCallback: epoch %d, round %d: %d weights pruned, sparsity %.4f, "
                     "emptied %s", epoch, done.round, done.budget, self.pruner.sparsity,
                     done.emptied)
        return control
