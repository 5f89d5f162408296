"""FLOPs counted on the meta device equal a count on real tensors, whatever the graph form, and
a model that reads tensor values is counted on data instead."""
from __future__ import annotations

import logging

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import egp_fx
from egp_fx.ir.batches import as_batch
from egp_fx.pipeline.measures import count_flops


def _on_data(module, example) -> int:
    """torch's own count on real tensors, with the CPU's fused attention given its formula."""
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        as_batch(example).head(1).widen(2)(module)
    return int(counter.get_total_flops()) // 2


class ReadsValues(nn.Module):
    """Branches on a tensor's value: runs on data, not on the meta device."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(8, 16)

    def forward(self, x):
        return self.a(x) if bool(x.sum() > -1e9) else self.b(x)


def _tiny_opt():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=32)).eval()
    return model, {"input_ids": torch.randint(0, 64, (2, 12)),
                   "attention_mask": torch.ones(2, 12, dtype=torch.long)}


@pytest.mark.parametrize("form", ["resnet18 fx", "opt export"])
def test_meta_count_equals_the_count_on_data(form, caplog):
    if form.startswith("resnet18"):
        model, example = torchvision.models.resnet18().eval(), torch.randn(2, 3, 64, 64)
    else:
        model, example = _tiny_opt()
    module = egp_fx.trace(model, example, capture=form.split()[1])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with caplog.at_level(logging.DEBUG, logger="egp_fx.pipeline.measures"):
        flops = count_flops(module, example)
    assert flops == _on_data(module, example) > 0
    assert not [r for r in caplog.records if "counting on data" in r.getMessage()]
    after = module.state_dict()      # the module itself stays on its device, untouched
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v)
               for k, v in before.items())


def test_attention_counts_its_two_matmuls():
    model, example = _tiny_opt()
    gm = egp_fx.trace(model, example, capture="export")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:      # torch's own CPU count
        as_batch(example).head(1).widen(2)(gm)
    # 2 layers x 2 matmuls of (12 x 32) by (32 x 12) per sample (4 heads of 8), x 2 FLOPs
    assert count_flops(gm, example) - int(counter.get_total_flops()) // 2 == 2 * 2 * 2 * 12 * 12 * 32


def test_a_model_that_reads_values_is_counted_on_data(caplog):
    model, x = ReadsValues().eval(), torch.randn(3, 8)
    with caplog.at_level(logging.DEBUG, logger="egp_fx.pipeline.measures"):
        assert count_flops(model, x) == 2 * 8 * 32
    assert [r for r in caplog.records if "counting on data" in r.getMessage()]


class DataDependent(nn.Module):
    """torch.nonzero has no meta kernel (its output shape depends on the values)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 32)

    def forward(self, x):
        return self.a(x) + torch.nonzero(x > 0).shape[0] * 0.0


def test_a_graph_that_fails_on_meta_is_put_back_and_counted_on_data(caplog):
    gm = torch.fx.symbolic_trace(DataDependent().eval())
    x = torch.randn(3, 8)
    ref = gm(x)
    with caplog.at_level(logging.DEBUG, logger="egp_fx.pipeline.measures"):
        assert count_flops(gm, x) == 2 * 8 * 32
    assert [r for r in caplog.records if "counting on data" in r.getMessage()]
    assert all(t.device.type == "cpu" for t in [*gm.parameters(), *gm.buffers()])
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
