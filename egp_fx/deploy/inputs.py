"""One description of a model's inputs and which of their axes are dynamic, for every exporter.

    spec = InputSpec.of(batch, dynamic_batch=True, dynamic_sequence=None)

- Names: keyword inputs keep their keys (input_ids, attention_mask, ...). Positional inputs are
  named per format: "input" (one) or "input_0", "input_1", ... in ONNX files; "args[0]",
  "args[1]", ... in torch.export programs (`names(style)`).
- Axes: dim 0 of every input that has dimensions is "batch" when `dynamic_batch`; dim 1 of every
  2-D input is "sequence" when `dynamic_sequence`, which by default is on exactly when the
  inputs are keywords (token inputs: input_ids (N, L); pixel_values (N, 3, H, W) keep theirs).
- Outputs (`output_axes`): dim 0 is "batch"; with a dynamic sequence, dim 1 of an output with
  two or more dims is "sequence" (logits (N, L, V)).
- torch.export specialises a dimension of size one, so a batch of one sample is exported at two
  (`exportable`).

The TorchScript exporter reads `dynamic_axes()`; torch.export and the dynamo exporter read
`dynamic_shapes(batch_dim, sequence_dim)`; saving.py and onnx.py both build theirs here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from egp_fx.ir.batches import Batch

BATCH, SEQUENCE = "batch", "sequence"


@dataclass(frozen=True)
class InputSpec:
    keywords: tuple[str, ...]                 # keyword names, () for positional inputs
    axes: tuple[dict[int, str], ...]          # per input (in Batch.tensors() order)
    dynamic_batch: bool
    dynamic_sequence: bool

    @classmethod
    def of(cls, batch: Batch, dynamic_batch: bool = True,
           dynamic_sequence: bool | None = None) -> InputSpec:
        sequence = bool(batch.kwargs) if dynamic_sequence is None else dynamic_sequence
        return cls(tuple(batch.kwargs), tuple(_axes(t.dim(), dynamic_batch, sequence and
                                                     t.dim() == 2) for t in batch.tensors()),
                   dynamic_batch, sequence)

    @property
    def dynamic(self) -> bool:
        return self.dynamic_batch or self.dynamic_sequence

    def names(self, style: str = "onnx") -> list[str]:
        """Input names: keyword keys, else "input"/"input_i" ("onnx") or "args[i]" ("program")."""
        if self.keywords:
            return list(self.keywords)
        if style == "program":
            return [f"args[{i}]" for i in range(len(self.axes))]
        return ["input"] if len(self.axes) == 1 else [f"input_{i}" for i in range(len(self.axes))]

    def output_axes(self, n_dims: int) -> dict[int, str]:
        return _axes(n_dims, self.dynamic_batch, self.dynamic_sequence)

    def dynamic_axes(self, outputs: dict[str, int]) -> dict[str, dict[int, str]] | None:
        """The TorchScript exporter's dynamic_axes: input and output name -> {axis: name};
        `outputs` maps each output name to its number of dims. None when nothing is dynamic."""
        if not self.dynamic:
            return None
        return dict(zip(self.names(), self.axes)) | {
            name: self.output_axes(nd) for name, nd in outputs.items()}

    def dynamic_shapes(self, batch_dim, sequence_dim, *, flat: bool = False):
        """torch.export's dynamic_shapes with these Dim objects: a dict by keyword for keyword
        inputs (unless `flat`), else a tuple in input order; None when nothing is dynamic."""
        if not self.dynamic:
            return None
        dims = {BATCH: batch_dim, SEQUENCE: sequence_dim}
        per_input = [{a: dims[n] for a, n in axes.items() if dims[n] is not None} or None
                     for axes in self.axes]
        if self.keywords and not flat:
            return dict(zip(self.keywords, per_input))
        return tuple(per_input)

    def exportable(self, batch: Batch) -> Batch:
        """The batch torch.export should trace at: a batch of one doubled when the batch axis is
        dynamic (export specialises a size-one dimension)."""
        if self.dynamic_batch and batch.size == 1:
            return batch.map(lambda t: torch.cat([t, t]) if t.dim() else t)
        return batch


def _axes(n_dims: int, dynamic_batch: bool, dynamic_sequence: bool) -> dict[int, str]:
    axes = {0: BATCH} if dynamic_batch and n_dims else {}
    if dynamic_sequence and n_dims >= 2:
        axes[1] = SEQUENCE
    return axes
