"""prune() reads the unrounded EGP entropy; augmentation, IMP scope, stem max-pool, re-init ablation."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from test_prune import TinyResNet, _tiny_run
from test_prune_allocation import reference_allocation
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from egp_fx.calibrate.calibration import calibrate
from egp_fx.calibrate.stats import EGP_META_KEY
from egp_fx.calibrate.table import layer_stats
from egp_fx.capture import trace
from egp_fx.pruning import (
    Augment,
    AugmentedLoader,
    EGPPruner,
    FinetuneConfig,
    PruneError,
    augment_batch,
    augment_preset,
    find_prunable,
    prune,
    reinitialize,
    resnet18_cifar,
)
from egp_fx.pruning import egp as egp_module
from egp_fx.pruning import pruner as pruner_module
from egp_fx.pruning.models import ResNetConfig, load_model, save_model
from egp_fx.pruning.record import count_nonzero, layer_entropy


class DeadUnitsMLP(nn.Module):
    """Three Linear+ReLU layers; 12 of fc2's 16 units are dead on every input, so its EGP
    entropy (mixed units only) is about four times its EASIER entropy (all units)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(16, 4)
        with torch.no_grad():
            self.fc2.bias[:12] = -100.0

    def forward(self, x):
        return self.head(self.relu3(self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))))


def _mlp_data() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=gen)
    return DataLoader(TensorDataset(x, torch.randint(0, 4, (96,), generator=gen)), batch_size=32)


def _entropies_by_hand(model: nn.Module, loader) -> tuple[dict, dict]:
    """(EGP, EASIER) layer entropies of fc1..fc3, from the pre-activations, as the reference."""
    seen: dict[str, list[torch.Tensor]] = {"fc1": [], "fc2": [], "fc3": []}
    hooks = [getattr(model, f"relu{i}").register_forward_hook(
        lambda _m, inp, _o, k=f"fc{i}": seen[k].append(inp[0].detach().clone())) for i in (1, 2, 3)]
    with torch.no_grad():
        for x, _ in loader:
            model.eval()(x)
    for h in hooks:
        h.remove()

    def unit_h(p):
        p = p.double().clamp(1e-5, 1 - 1e-5)
        return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))

    egp, easier = {}, {}
    for name, batches in seen.items():
        per_batch = []
        for z in batches:
            on = (z > 0).sum(0)
            mixed = (on > 0) & (on < z.shape[0])
            per_batch.append(float(unit_h(on / z.shape[0])[mixed].mean()) if mixed.any() else 0.0)
        egp[name] = sum(per_batch) / len(per_batch)
        easier[name] = float(unit_h((torch.cat(batches) > 0).double().mean(0)).mean())
    return egp, easier


def _largest_remainder(entropy, mean_abs, remaining):
    """The reference allocation with its truncated counts topped up to floor(B), by hand."""
    alloc, emptied = reference_allocation(entropy, mean_abs, remaining)
    budget = math.floor(0.5 * sum(remaining.values()))
    exact = {}
    for n in alloc:   # recompute the real-valued allotments of the layers still waiting
        exact[n] = float(alloc[n])
    waiting = [n for n in alloc if n not in emptied]
    left = 0.5 * sum(remaining.values()) - sum(remaining[n] for n in emptied)
    irr = {n: entropy[n] * mean_abs[n] for n in waiting}
    rel = {n: sum(irr.values()) / irr[n] for n in waiting}
    exps = {n: math.exp(rel[n] - max(rel.values())) for n in waiting}
    for n in waiting:
        exact[n] = left * exps[n] / sum(exps.values())
    out = {n: (remaining[n] if n in emptied else math.floor(exact[n])) for n in alloc}
    order = sorted(waiting, key=lambda n: -(exact[n] - math.floor(exact[n])))
    for n in order[:budget - sum(out.values())]:
        out[n] += 1
    return out


def test_prune_allocates_from_the_egp_entropy_not_the_easier_one():
    torch.manual_seed(0)
    model, loader = DeadUnitsMLP(), _mlp_data()
    egp_h, easier_h = _entropies_by_hand(copy.deepcopy(model), loader)
    assert egp_h["fc2"] / easier_h["fc2"] > 4                    # the two entropies differ
    mean_abs = {n: float(getattr(model, n).weight.detach().abs().double().mean())
                for n in ("fc1", "fc2", "fc3")}
    remaining = {"fc1": 128, "fc2": 256, "fc3": 256}
    expected = _largest_remainder(egp_h, mean_abs, remaining)
    with_easier = _largest_remainder(easier_h, mean_abs, remaining)
    assert max(abs(expected[n] - with_easier[n]) for n in expected) > 20   # the test can tell
    result = prune(model, loader, iterations=1, finetune=FinetuneConfig(epochs=0), progress=False,
                   measure_compress=False)
    rec = result.log[1]
    assert rec.pruned == expected
    assert rec.budget == 320 and sum(rec.pruned.values()) == 320
    assert {lay["module"]: lay["entropy"] for lay in result.log[0].layers} == pytest.approx(egp_h, rel=1e-12)


def test_prune_reads_the_unrounded_entropy():
    torch.manual_seed(0)
    model, loader = DeadUnitsMLP(), _mlp_data()
    gm = calibrate(model.eval(), loader, progress=False)
    node = next(n for n in gm.graph.nodes if n.name == "relu3")
    st = node.meta[EGP_META_KEY]
    node.meta[EGP_META_KEY] = dataclasses.replace(st, egp_sum=3e-7 * st.batches)   # H = 3e-7
    row = next(r for r in layer_stats(gm) if r.node == "relu3")
    assert row.egp_entropy == pytest.approx(3e-7, rel=1e-12)      # unrounded in the table ...
    assert f"{row.egp_entropy:.4f}" == "0.0000"                    # ... rounded only in its text
    layers = find_prunable(trace(model), model)
    assert layer_entropy(gm, layers)["fc3"] == pytest.approx(3e-7, rel=1e-12)
    pruner = EGPPruner(model, loader)
    step = pruner.step(stats=gm)
    # fc3 stays in the pool and, with the smallest I, takes more than it has: it is emptied
    assert "fc3" not in step.excluded and step.emptied == ["fc3"]
    assert int(model.fc3.weight.count_nonzero()) == 0
    rec = pruner.report(stats=gm, compress=False)
    assert rec.zero_entropy_layers == 0
    assert next(a for a in rec.activations if a["node"] == "relu3")["egp_entropy"] == pytest.approx(3e-7, rel=1e-12)


# ----------------------------------------------------------------------------- augmentation

def test_augment_batch_translates_and_flips_each_sample():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    aug = Augment(pad=1, flip=True, fill=-1.0)
    out = augment_batch(x, aug, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)        # the same draws, in the same order
    dy, dx = torch.randint(0, 3, (2,), generator=gen), torch.randint(0, 3, (2,), generator=gen)
    flip = torch.rand(2, generator=gen) < 0.5
    padded = torch.full((2, 1, 6, 7), -1.0)
    padded[:, :, 1:5, 1:6] = x
    for n in range(2):
        want = padded[n, :, dy[n]:dy[n] + 4, dx[n]:dx[n] + 5]
        torch.testing.assert_close(out[n], want.flip(-1) if flip[n] else want, rtol=0, atol=0)
    assert out.shape == x.shape and x[0, 0, 0, 0] == 0                  # input untouched
    same = augment_batch(x, Augment(pad=0, flip=False), torch.Generator())
    torch.testing.assert_close(same, x, rtol=0, atol=0)
    edge = augment_batch(torch.ones(3, 2, 4, 4), Augment(pad=2, flip=False), torch.Generator())
    torch.testing.assert_close(edge, torch.ones(3, 2, 4, 4), rtol=0, atol=0)   # replicate border
    with pytest.raises(PruneError, match="image batches"):
        augment_batch(torch.ones(4, 8), aug, torch.Generator())


def test_augment_presets_and_loader():
    assert augment_preset("none") is None and augment_preset(None) is None
    assert augment_preset("crop-flip", seed=5) == Augment(pad=4, flip=True, fill=None, seed=5)
    assert augment_preset("shift") == Augment(pad=2, flip=False)
    with pytest.raises(PruneError, match="unknown augmentation"):
        augment_preset("mixup")
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    loader = AugmentedLoader(DataLoader(TensorDataset(x, y), batch_size=4), Augment(pad=2))
    batches = list(loader)
    assert len(loader) == 2 and [b[1].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    assert not torch.equal(batches[0][0], x[:4])
    again = list(loader)                          # the stream goes on: a fresh draw per pass
    assert not torch.equal(again[0][0], batches[0][0])
    dicts = AugmentedLoader([{"img": x, "label": y}], Augment(pad=1), input_key="img")
    (d,) = list(dicts)
    assert d["label"] is y and d["img"].shape == x.shape


def test_prune_augments_finetuning_and_the_entropy_pass(monkeypatch):
    seen = {"calibrate": set(), "finetune": set(), "compress_stats": []}
    real_cal, real_ft, real_cs = pruner_module.calibrate, egp_module.run_finetune, egp_module.compress_summary
    monkeypatch.setattr(pruner_module, "calibrate", lambda m, loader, **k: seen["calibrate"].add(
        type(loader).__name__) or real_cal(m, loader, **k))
    monkeypatch.setattr(egp_module, "run_finetune", lambda m, loader, *a, **k: seen["finetune"].add(
        type(loader).__name__) or real_ft(m, loader, *a, **k))
    monkeypatch.setattr(egp_module, "compress_summary", lambda m, loader, gm, o: seen[
        "compress_stats"].append((type(loader).__name__, gm)) or real_cs(m, loader, gm, o))
    _, plain = _tiny_run(None, 1, measure_compress=False)
    _, augmented = _tiny_run(None, 1, augment=Augment(pad=4, seed=0))
    assert seen["calibrate"] == {"DataLoader", "AugmentedLoader"}
    assert seen["finetune"] == {"DataLoader", "AugmentedLoader"}
    # compress is measured on the data as given, calibrating afresh
    assert seen["compress_stats"] == [("DataLoader", None), ("DataLoader", None)]
    h_plain = [a["egp_entropy"] for a in plain.log[0].activations]
    h_aug = [a["egp_entropy"] for a in augmented.log[0].activations]
    assert h_plain != h_aug                        # iteration 0: same weights, other batches


# ----------------------------------------------------------------------------- models

def test_resnet18_cifar_stem_maxpool_option(tmp_path):
    torch.manual_seed(0)
    plain, pooled = resnet18_cifar(width_mult=0.125), resnet18_cifar(width_mult=0.125, stem_maxpool=True)
    assert not hasattr(plain, "maxpool")
    assert (pooled.maxpool.kernel_size, pooled.maxpool.stride, pooled.maxpool.padding) == (3, 2, 1)
    assert plain.state_dict().keys() == pooled.state_dict().keys()
    assert len(find_prunable(trace(pooled), pooled)) == 17
    sizes = []
    hook = pooled.layer1.register_forward_pre_hook(lambda _m, inp: sizes.append(tuple(inp[0].shape)))
    assert pooled.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    hook.remove()
    assert sizes == [(2, 8, 16, 16)]                              # 32x32 halved before layer1
    config = ResNetConfig(width_mult=0.125, stem_maxpool=True)
    save_model(pooled, config, tmp_path / "m.safetensors", tmp_path / "m.json")
    loaded, meta = load_model(tmp_path / "m.safetensors", tmp_path / "m.json")
    assert meta["stem_maxpool"] is True and loaded.stem_maxpool
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), pooled(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- re-init ablation

def test_reinitialize_freezes_emptied_layers_and_redraws_the_rest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 8))
    with torch.no_grad():
        model[3].weight.zero_()
        model[1].weight.fill_(3.0)
        model[1].running_mean.fill_(2.0)
    head_bias = model[3].bias.detach().clone()
    frozen = reinitialize(model)
    assert frozen == ["3"]
    assert not model[3].weight.requires_grad and not model[3].bias.requires_grad
    assert int(model[3].weight.count_nonzero()) == 0 and torch.equal(model[3].bias, head_bias)
    w = model[0].weight
    assert int(w.count_nonzero()) == w.numel() and w.requires_grad
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / 512), rel=0.02)   # Kaiming, fan_out
    assert float(w.detach().mean()) == pytest.approx(0.0, abs=1e-3)
    assert int(model[0].bias.count_nonzero()) == 0
    bn = model[1]
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))
    assert torch.equal(bn.running_mean, torch.zeros(512)) and torch.equal(bn.running_var, torch.ones(512))


def _collapsed_tiny() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        model.conv1.weight.zero_()                 # a layer EGP emptied
    return model


def test_prune_reinit_ablation(tmp_path, monkeypatch):
    model = _collapsed_tiny()
    before = copy.deepcopy(model.state_dict())
    from egp_fx.pruning import digits_loaders
    train, val = digits_loaders(batch_size=32, train_limit=64, val_limit=32)
    cfg = FinetuneConfig(epochs=1, lr=0.01)
    result = prune(model, train, iterations=1, finetune=cfg, val_loader=val, out_dir=tmp_path,
                   progress=False, measure_compress=False, reinit_ablation=True, reinit_epochs=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    rec, last = result.reinit, result.log[-1]
    assert rec.method == "egp-reinit" and rec.iteration == 1 and rec.frozen == ["conv1"]
    assert last.excluded == {"conv1": "all weights are zero"}
    assert len(rec.train) == 2 and 0.0 <= rec.accuracy <= 1.0
    scratch = result.reinit_model
    assert int(scratch.conv1.weight.count_nonzero()) == 0 and scratch.conv1.weight.requires_grad
    for name in ("stem.0", "conv2"):                              # dense again, and re-drawn
        w = scratch.get_submodule(name).weight
        assert int(w.count_nonzero()) == w.numel()
        assert int(result.model.get_submodule(name).weight.count_nonzero()) < w.numel()
    nz, total = count_nonzero(result.model, ["stem.0.weight", "conv1.weight", "conv2.weight"])
    assert nz == total - 162 // 2 - 324 // 2 - 324               # the pruned model is untouched
    doc = json.loads((tmp_path / "log.json").read_text())
    assert doc["reinit"]["frozen"] == ["conv1"] and (tmp_path / "reinit.safetensors").exists()
    calls = []
    monkeypatch.setattr(egp_module, "train_from_scratch", lambda *a, **k: calls.append(1))
    again = prune(model, train, iterations=1, finetune=cfg, val_loader=val, out_dir=tmp_path,
                  progress=False, measure_compress=False, reinit_ablation=True, reinit_epochs=2,
                  resume=True)
    assert calls == [] and again.reinit == rec                    # reused, not retrained
    torch.testing.assert_close(again.reinit_model.state_dict(), scratch.state_dict(), rtol=0, atol=0)


def test_prune_option_errors():
    model, loader = DeadUnitsMLP(), _mlp_data()
    for kwargs, match in (({"imp_scope": "some"}, "imp_scope"), ({"ratio": 1.5}, "ratio"),
                          ({"ratio": 0.0}, "ratio"), ({"reinit_epochs": 0}, "reinit_epochs")):
        with pytest.raises(PruneError, match=match):
            prune(model, loader, progress=False, **kwargs)
    with pytest.raises(PruneError, match="at least one epoch"):
        prune(model, loader, iterations=0, progress=False, measure_compress=False,
              reinit_ablation=True)
    with pytest.raises(PruneError, match="pad"):
        Augment(pad=-1)
