"""EGP pruning: the allocation by hand, IMP's global threshold, the loop end to end, resume, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from egp_fx.capture import trace
from egp_fx.pruning import (
    FinetuneConfig,
    PruneError,
    allocate,
    digits_loaders,
    find_prunable,
    global_magnitude_prune,
    load_digits_data,
    prune,
    resnet18_cifar,
)
from egp_fx.pruning import (
    egp as egp_module,  # egp_fx.prune (the attribute) is the function
)
from egp_fx.pruning.masks import prune_smallest
from egp_fx.pruning.record import count_nonzero

# Three layers with H = (1, .5, .5) and mean|w| = (.5, 1, 2): I = (.5, .5, 1), sum I = 2,
# R = (4, 4, 2), softmax shares s_a = s_b = 1 / (2 + e^-2), s_c = e^-2 / (2 + e^-2).
H = {"a": 1.0, "b": 0.5, "c": 0.5}
MEAN_ABS = {"a": 0.5, "b": 1.0, "c": 2.0}


def test_allocation_softmax_shares_by_hand():
    alloc = allocate(H, MEAN_ABS, {"a": 1000, "b": 1000, "c": 1000})
    assert alloc.irrelevance == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert alloc.relevance == {"a": 4.0, "b": 4.0, "c": 2.0}
    s = 1 / (2 + math.exp(-2))
    assert alloc.shares["a"] == pytest.approx(s, rel=1e-12)
    assert alloc.shares["c"] == pytest.approx(math.exp(-2) * s, rel=1e-12)
    # B = 1500: a_a = a_b = 702.466, a_c = 95.068 -> floors 702+702+95 = 1499; the missing unit
    # goes to the largest fractional part (a and b tie at .466: pool order picks a).
    assert alloc.budget == 1500
    assert alloc.prune == {"a": 703, "b": 702, "c": 95}
    assert alloc.emptied == [] and alloc.excluded == {}


def test_allocation_overflow_recomputes_relevance_over_the_waiting_layers():
    # B = .5 * 2100 = 1050; pass 1: a_a = 1050 * s_a = 491.7 > 100: a is emptied, its I leaves the
    # sum. Pass 2 over {b, c}: sum I = 1.5, R = (3, 1.5), s_b = 1 / (1 + e^-1.5) = .81757,
    # a_b = 950 * s_b = 776.69, a_c = 173.31. The reference truncates each layer: b = 776, c = 173
    # (1049 in all); largest remainder gives the missing unit to b (.69 > .31): 777, 173 (1050).
    # Renormalising the first pass's shares instead (the old allocation) gave 837, 113: 6% of B.
    alloc = allocate(H, MEAN_ABS, {"a": 100, "b": 1000, "c": 1000})
    assert alloc.budget == 1050 and alloc.pruned == 1050
    assert alloc.prune == {"a": 100, "b": 777, "c": 173}
    assert alloc.emptied == ["a"] and alloc.passes == 2
    assert alloc.allotment["b"] == pytest.approx(950 / (1 + math.exp(-1.5)), rel=1e-12)
    truncated = allocate(H, MEAN_ABS, {"a": 100, "b": 1000, "c": 1000}, rounding="truncate")
    assert truncated.prune == {"a": 100, "b": 776, "c": 173}           # the reference's numbers


def test_allocation_one_tiny_irrelevance_does_not_crash():
    # I_a = 1e-3, I_b = I_c = 1: R_a = 2001 and R_b = R_c = 2.001, so exp(R_b - R_a) underflows to
    # 0.0 and a gets the whole first pass: 1050 > 100, a is emptied. Renormalising the first
    # pass's shares then divided 950 by their sum, 0.0 (ZeroDivisionError). Recomputed over
    # {b, c}: R_b = R_c = 2, equal shares, 475 each.
    alloc = allocate({"a": 1e-3, "b": 1.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0},
                     {"a": 100, "b": 1000, "c": 1000})
    assert alloc.shares["b"] == 0.0 and alloc.shares["a"] == 1.0      # the first pass underflows
    assert alloc.prune == {"a": 100, "b": 475, "c": 475}
    assert alloc.emptied == ["a"] and alloc.passes == 2


def test_allocation_overflow_is_strict():
    # Equal I: a_x = a_y = .5 * 200 / 2 = 50 = r_x exactly. The reference empties a layer only when
    # its allotment exceeds what it has left (r < a): x is not emptied and one pass is enough.
    alloc = allocate({"x": 0.5, "y": 0.5}, {"x": 1.0, "y": 1.0}, {"x": 50, "y": 150})
    assert alloc.allotment == {"x": 50.0, "y": 50.0}
    assert alloc.prune == {"x": 50, "y": 50}
    assert alloc.emptied == [] and alloc.passes == 1
    # one weight fewer in x: now 49 < 50, x is emptied and y takes the other 50 in a second pass
    alloc = allocate({"x": 0.5, "y": 0.5}, {"x": 1.0, "y": 1.0}, {"x": 49, "y": 150})
    assert alloc.prune == {"x": 49, "y": 50} and alloc.emptied == ["x"] and alloc.passes == 2


def test_allocation_overflow_cascades():
    # B = 1400; pass 1: a_a = 655.6 > 100 (a emptied), a_b = 655.6 < 700; pass 2 over {b, c}:
    # R = (3, 1.5), a_b = 1300 / (1 + e^-1.5) = 1062.8 > 700 (b emptied); pass 3: c gets 600.
    alloc = allocate(H, MEAN_ABS, {"a": 100, "b": 700, "c": 2000})
    assert alloc.budget == 1400
    assert alloc.prune == {"a": 100, "b": 700, "c": 600}
    assert alloc.emptied == ["a", "b"] and alloc.passes == 3


def test_allocation_excludes_zero_entropy_and_empty_layers():
    alloc = allocate({"a": 1.0, "b": 0.0, "c": 0.5, "d": 0.7}, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 0.0},
                     {"a": 300, "b": 5000, "c": 100, "d": 0})
    assert alloc.excluded == {"b": "zero entropy", "d": "all weights are zero"}
    assert alloc.budget == 200                                   # half of a + c only
    # I = (1, .5), R = (1.5, 3): s_a = 1/(1+e^1.5) = .18243, a_a = 36.49, a_c = 163.51 >= 100:
    # c is emptied, a takes the remaining 100.
    assert alloc.prune == {"a": 100, "c": 100}
    assert alloc.emptied == ["c"]


def test_prune_smallest_drops_exactly_n_of_the_kept():
    w = torch.tensor([[0.5, -0.1, 0.0], [0.3, -0.2, 0.9]])
    mask = w != 0
    new = prune_smallest(w, mask, 2)
    assert new.tolist() == [[True, False, False], [True, False, True]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]     # nothing given changes
    assert w[0, 1] == -0.1
    tied = torch.tensor([0.2, 0.1, 0.1, 0.1])                   # ties: by position
    assert prune_smallest(tied, tied != 0, 2).tolist() == [True, False, False, True]


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 3, bias=False),
                         nn.ReLU(), nn.Linear(3, 2))


def test_imp_prunes_globally_by_magnitude():
    model = _mlp()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -0.8], [0.3, 0.05]]))
        model[2].weight.copy_(torch.tensor([[0.2, -0.6], [0.7, 0.01], [-0.4, 0.9]]))
    names = [p.module for p in find_prunable(trace(model), model)]
    assert names == ["0", "2"]                                   # the classifier is not prunable
    weights = {n: model.get_submodule(n).weight for n in names}
    masks = {n: w != 0 for n, w in weights.items()}
    # 10 weights: the 5 smallest |w| are .01, .05, .1, .2, .3, in both layers.
    masks, lost = global_magnitude_prune(weights, masks)
    assert lost == {"0": 3, "2": 2}
    assert masks["0"].tolist() == [[False, True], [False, False]]
    assert masks["2"].tolist() == [[False, True], [True, False], [True, True]]
    # Round 2: 5 left, floor(2.5) = 2 go: .4 and .6.
    masks, lost = global_magnitude_prune(weights, masks)
    assert lost == {"0": 0, "2": 2}
    assert masks["2"].tolist() == [[False, False], [True, False], [False, True]]
    assert model[0].weight.count_nonzero() == 4                  # the weights are not touched


def test_prunable_layers_of_resnet18_cifar():
    model = resnet18_cifar(width_mult=0.125)
    layers = find_prunable(trace(model), model)
    names = [p.module for p in layers]
    assert len(layers) == 17
    assert not any("downsample" in n or n == "fc" for n in names)
    assert names[0] == "conv1" and names[-1] == "layer4.1.conv2"
    assert layers[2].activations == ("layer1_0_relu_1",)        # conv2 feeds the ReLU after the add


def test_digits_data_split_and_shape():
    data = load_digits_data()
    assert len(data.train) == 1437 and len(data.val) == 360
    x, y = data.train.tensors
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.float32
    assert sorted(y.unique().tolist()) == list(range(10))
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-4)
    assert data.val.tensors[1].bincount().tolist() == [36] * 10


def test_finetune_milestones():
    assert FinetuneConfig(epochs=8).milestone_epochs() == [4, 6]
    assert FinetuneConfig(epochs=1).milestone_epochs() == []


class TinyResNet(nn.Module):
    """Stem + one basic block + classifier: 3 prunable convs, 3 ReLU calls (one module twice)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1, bias=False), nn.BatchNorm2d(6))
        self.conv1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(h)) + x)
        return self.fc(x.mean((2, 3)))


def _tiny_run(out_dir, iterations, **kw):
    torch.manual_seed(0)
    train, val = digits_loaders(batch_size=32, train_limit=64, val_limit=32)
    model = TinyResNet()
    cfg = FinetuneConfig(epochs=1, lr=0.01)
    return model, prune(model, train, method=kw.pop("method", "egp"), iterations=iterations,
                        finetune=cfg, val_loader=val, out_dir=out_dir, progress=False, **kw)


def test_egp_one_iteration_end_to_end(tmp_path):
    model, result = _tiny_run(tmp_path, 1)
    torch.manual_seed(0)
    untouched = TinyResNet().state_dict()                        # what _tiny_run passed in
    assert all(torch.equal(v, untouched[k]) for k, v in model.state_dict().items())
    rec0, rec1 = result.log
    names = [p.weight for p in find_prunable(trace(model), model)]
    nz, total = count_nonzero(result.model, names)
    # Exactly the budget is gone after fine-tuning: no pruned weight came back.
    assert rec0.sparsity == 0.0 and rec1.budget > 0
    assert nz == total - rec1.budget
    assert sum(rec1.pruned.values()) == rec1.budget
    assert rec1.sparsity == pytest.approx(rec1.budget / total, abs=1e-12)
    assert rec1.activation_layers == 3 and 0.0 <= rec1.accuracy <= 1.0
    assert len(rec1.train) == 1
    assert rec1.compress is not None and "before" in rec1.compress
    assert (tmp_path / "iter_1.safetensors").exists()
    log = json.loads((tmp_path / "log.json").read_text())
    assert [r["iteration"] for r in log["records"]] == [0, 1] and log["method"] == "egp"


def test_resume_continues_after_last_iteration(tmp_path, monkeypatch):
    _, first = _tiny_run(tmp_path, 1, measure_compress=False)
    stamp = (tmp_path / "iter_1.safetensors").stat().st_mtime_ns
    calls = []
    real = egp_module.run_finetune
    monkeypatch.setattr(egp_module, "run_finetune", lambda *a, **k: calls.append(k["desc"]) or real(*a, **k))
    _, second = _tiny_run(tmp_path, 2, measure_compress=False, resume=True)
    assert calls == ["egp iter 2"]                               # iteration 1 was not redone
    assert [r.iteration for r in second.log] == [0, 1, 2]
    assert second.log[1] == first.log[1]
    assert (tmp_path / "iter_1.safetensors").stat().st_mtime_ns == stamp
    assert second.log[2].sparsity > second.log[1].sparsity
    with pytest.raises(PruneError, match="method"):
        _tiny_run(tmp_path, 3, method="imp", measure_compress=False, resume=True)
    with pytest.raises(PruneError, match="already holds a run"):
        _tiny_run(tmp_path, 3, measure_compress=False)


@pytest.mark.parametrize("scope", ["all", "prunable"])
def test_imp_loop_halves_the_nonzero_weights_each_round(scope):
    _, result = _tiny_run(None, 2, method="imp", imp_scope=scope, measure_compress=False)
    prunable = 6 * 3 * 9 + 2 * 6 * 6 * 9                         # 810 weights in the three convs
    total = prunable + 6 * 10                                    # and 60 in the classifier
    budgets = [r.budget for r in result.log[1:]]
    if scope == "prunable":                                      # 405, then 202
        assert budgets == [405, 202]
        assert [r.sparsity for r in result.log] == [0.0, 405 / prunable, 607 / prunable]
    else:                                                        # 435, then 217, fc included
        assert budgets == [435, 217]
        assert [r.sparsity_all for r in result.log] == [0.0, 435 / total, 652 / total]
        assert sum(result.log[1].pruned.values()) == 435 and "fc" in result.log[1].pruned
        assert int(result.model.fc.weight.count_nonzero()) < 60


def test_errors():
    x = torch.randn(8, 3, 32, 32)
    unlabeled = DataLoader(TensorDataset(x), batch_size=4)
    labeled = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(PruneError, match="no labels"):
        prune(resnet18_cifar(width_mult=1 / 16), [x], progress=False)
    with pytest.raises(PruneError, match="no labels"):
        prune(resnet18_cifar(width_mult=1 / 16), unlabeled, progress=False)
    no_relu = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10), nn.Tanh(), nn.Linear(10, 2))
    with pytest.raises(PruneError, match="no prunable layer"):
        prune(no_relu, labeled, progress=False)
    with pytest.raises(PruneError, match="method"):
        prune(resnet18_cifar(width_mult=1 / 16), labeled, method="random", progress=False)
