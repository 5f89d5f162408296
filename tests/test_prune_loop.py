"""EGPPruner in the caller's loop: masks through optimizer steps, save/load, torch.compile,
remove(); a model only torch.export captures (the pruner and prune(loss_fn=, metric_fn=));
layers from the one op classifier (timm convs, OPT's fc1); the losses; the errors."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

import egp_fx
from egp_fx.pruning import (
    EGPCallback,
    EGPPruner,
    FinetuneConfig,
    LMLoss,
    PruneError,
    WeightMask,
    loss_by_name,
    prune,
)


class MLP(nn.Module):
    """Three Linear+ReLU layers and a head (48 + 256 + 256 prunable weights); BatchNorm and
    dropout make the train/eval modes differ."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 32), nn.Linear(32, 8)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.bn(self.fc2(h)))
        return self.head(self.drop(torch.relu(self.fc3(h))))


class Flagged(nn.Module):
    """forward(x, embed=False) with a branch on the input's shape: torch.fx fixes the flag but
    cannot trace the branch on a shape; torch.export specialises it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x, embed=False):
        h = F.gelu(self.fc2(torch.relu(self.fc1(x))))
        if embed or x.shape[0] == 0:
            return h
        return self.head(h)


def _data(n_batches: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n_batches)]


def _mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def _train(model: nn.Module, opt: torch.optim.Optimizer, data, steps: int = 1) -> None:
    model.train()
    for _ in range(steps):
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def _weights(model: nn.Module, pruner: EGPPruner) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in pruner.pruned_names}


OPTIMIZERS = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam-decay": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_masks_hold_through_optimizer_steps(make_opt):
    """An optimizer made before the pruner, with momentum (or Adam's moments) built up on
    weights that a step then prunes: they stay exactly zero through further steps, while
    the kept weights train."""
    model, data = _mlp(), _data()
    opt = make_opt(model.parameters())
    _train(model, opt, data, steps=2)                  # state for every weight, pruned ones too
    pruner = EGPPruner(model, data, ratio=0.5)
    assert pruner.layer_names == ["fc1", "fc2", "fc3"] and pruner.pruned_names == pruner.layer_names
    step = pruner.step()
    assert step.budget == 280 and sum(step.pruned.values()) == 280   # half of 48 + 256 + 256
    masks = {n: pruner.masks.mask(f"{n}.weight").clone() for n in pruner.pruned_names}
    before = _weights(model, pruner)
    _train(model, opt, data, steps=3)
    after = _weights(model, pruner)
    drift, trained = 0.0, []
    for name, mask in masks.items():
        assert int(mask.sum()) == int(after[name].count_nonzero())
        assert torch.equal(after[name][~mask], torch.zeros(int((~mask).sum())))
        if mask.any():                                  # a layer EGP emptied has none left
            trained.append(not torch.equal(after[name][mask], before[name][mask]))
        original = pruner.masks.original(f"{name}.weight").detach()
        drift = max(drift, float(original[~mask].abs().max()))
    assert len(trained) >= 2 and all(trained)          # the kept weights train
    assert drift > 1e-4            # the optimizer did move the pruned entries: the mask held them


def test_step_runs_in_eval_mode_and_keeps_the_models_mode():
    model, data = _mlp(), _data()
    model.train()
    stats = copy.deepcopy(model.bn.state_dict())
    pruner = EGPPruner(model, data)
    pruner.step()
    assert model.training and model.bn.training and model.drop.training
    for k, v in model.bn.state_dict().items():                # no batch statistics were taken
        assert torch.equal(v, stats[k]), k
    model.eval()
    pruner.step()
    assert not model.training and not model.bn.training
    assert pruner.round == 2 and pruner.sparsity == pytest.approx(420 / 560, abs=0)


def test_masks_survive_save_and_load():
    model, data = _mlp(), _data()
    pruner = EGPPruner(model, data)
    pruner.step()
    opt = OPTIMIZERS["sgd-momentum"](model.parameters())
    _train(model, opt, data)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert "fc2.parametrizations.weight.0.mask" in saved["model"]
    x = data[0][0]
    # (1) the model's own state dict carries the masks
    again = _mlp(seed=5)
    EGPPruner(again, data)
    again.load_state_dict(saved["model"])
    torch.testing.assert_close(again.eval()(x), model.eval()(x), rtol=0, atol=0)
    # (2) the pruner's state dict: masks, round and steps, onto other weights
    other = _mlp(seed=6)
    restored = EGPPruner(other, data)
    restored.load_state_dict(saved["pruner"])
    assert restored.round == 1 and restored.steps[0].budget == pruner.steps[0].budget
    for name in pruner.pruned:
        assert torch.equal(restored.masks.mask(name), pruner.masks.mask(name))
        w = other.get_submodule(name[:-len(".weight")]).weight
        assert int(w.count_nonzero()) == int(pruner.masks.mask(name).sum())
    restored.step()                                             # and it goes on from there
    assert restored.round == 2 and restored.steps[-1].round == 2
    assert restored.sparsity > pruner.sparsity
    imp = EGPPruner(_mlp(), data, method="imp")
    with pytest.raises(PruneError, match="method"):
        imp.load_state_dict(saved["pruner"])


def test_remove_leaves_a_plain_model():
    model, data = _mlp(), _data()
    keys = list(model.state_dict())
    params = {n: id(p) for n, p in model.named_parameters()}
    pruner = EGPPruner(model, data)
    opt = OPTIMIZERS["sgd-momentum"](model.parameters())
    _train(model, opt, data)                       # momentum, then a round: pruned entries of
    pruner.step()                                  # W_orig drift in the next steps
    _train(model, opt, data)
    x = data[0][0]
    expected = model.eval()(x)
    masks = {n: pruner.masks.mask(n).clone() for n in pruner.pruned}
    assert pruner.remove() is model
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, WeightMask) for m in model.modules())
    assert type(model.fc2) is nn.Linear
    assert list(model.state_dict()) == keys
    assert {n: id(p) for n, p in model.named_parameters()} == params   # the optimizer's tensors
    for name, mask in masks.items():
        assert int(model.get_parameter(name).count_nonzero()) == int(mask.sum())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    with pytest.raises(PruneError, match="removed"):
        pruner.step()
    again = EGPPruner(model, data)                              # a plain model takes a new one
    assert again.masks.remaining() == {n: int(m.sum()) for n, m in masks.items()}


def test_masks_hold_under_torch_compile():
    model, data = _mlp(), _data()
    pruner = EGPPruner(model, data)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in data:
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pruner.step()                                  # masks change in place: no recompile needed
    for x, y in data:
        loss = F.cross_entropy(compiled(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mask = pruner.masks.mask("fc2.weight")
    assert int(model.fc2.weight.count_nonzero()) == int(mask.sum()) < mask.numel()
    model.eval()
    torch.testing.assert_close(compiled(data[0][0]), model(data[0][0]), rtol=1e-6, atol=1e-6)
    # the compiled module reads the masks as they are now: empty fc3 through its mask
    x = data[0][0]
    before = compiled(x).detach()
    pruner.masks.set("fc3.weight", torch.zeros_like(pruner.masks.mask("fc3.weight")))
    after = compiled(x).detach()
    torch.testing.assert_close(after, model(x).detach(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    assert float((after - after[0]).abs().max()) < 1e-6       # no longer depends on the input


# ----------------------------------------------------------------------------- torch.export

def test_pruner_on_a_model_only_torch_export_captures():
    torch.manual_seed(0)
    model, data = Flagged(), _data()
    with pytest.raises(egp_fx.TraceError):
        egp_fx.trace(model, data[0][0], capture="fx")
    pruner = EGPPruner(model, data)
    assert pruner.capture == "export"
    assert pruner.layer_names == ["fc1", "fc2"]                 # relu and gelu feeders
    assert pruner.weighted == ["fc1.weight", "fc2.weight", "head.weight"]
    step = pruner.step()
    assert step.budget == (96 + 256) // 2 and set(step.entropy) == {"fc1", "fc2"}
    assert all(0 < h <= 1 for h in step.entropy.values())
    rec = pruner.report(compress=True)
    assert rec.iteration == 1 and rec.sparsity == pytest.approx(176 / 352, abs=0)
    assert [lay["module"] for lay in rec.layers] == ["fc1", "fc2"]
    assert sum(lay["nonzero"] for lay in rec.layers) == 176
    assert rec.activation_layers == 2 and rec.compress is not None and "error" not in rec.compress
    assert rec.compress["before"]["weighted_depth"] == 3


def test_prune_with_loss_and_metric_on_a_model_only_torch_export_captures(tmp_path):
    torch.manual_seed(0)
    model, data = Flagged(), _data()
    seen = []

    def loss_fn(output, batch):
        seen.append(type(batch).__name__)
        return F.cross_entropy(output, batch[1], label_smoothing=0.1)

    def neg_loss(output, batch):
        return -float(F.cross_entropy(output, batch[1]))

    result = prune(model, data, iterations=1, finetune=FinetuneConfig(epochs=1, lr=0.05),
                   val_loader=data, loss_fn=loss_fn, metric_fn=neg_loss, out_dir=tmp_path,
                   progress=False, measure_compress=False,
                   optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
                   scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    rec0, rec1 = result.log
    assert seen and set(seen) == {"tuple"}
    assert rec0.accuracy is None and rec1.accuracy is None            # not the default metric
    with torch.no_grad():
        by_hand = [-float(F.cross_entropy(result.model(x), y)) for x, y in data]
    assert rec1.metric == pytest.approx(sum(by_hand) / 3, rel=1e-6)  # equal batches: the mean
    assert rec1.val_loss > 0 and rec1.train[0]["lr"] == 1e-3 and "accuracy" not in rec1.train[0]
    assert rec1.sparsity == pytest.approx(0.5, abs=1e-12)
    assert not any(parametrize.is_parametrized(m) for m in result.model.modules())
    import json
    doc = json.loads((tmp_path / "log.json").read_text())
    assert doc["capture"] == "export" and doc["loss"] == "loss_fn" and doc["metric"] == "neg_loss"


# ----------------------------------------------------------------------------- layers

def test_timm_convs_are_prunable():
    from timm_models import darknet

    torch.manual_seed(0)
    model = darknet().eval()
    data = [torch.randn(2, 3, 32, 32)]
    pruner = EGPPruner(model, data)
    assert len(pruner.layers) == 7 and all(n.endswith(".conv") for n in pruner.layer_names)
    assert pruner.weighted[-1] == "head.fc.weight" and "head.fc" not in pruner.layer_names
    step = pruner.step()
    # timm zero-initialises the last BatchNorm of each residual block: its ReLU input is 0, OFF
    # everywhere, so the layer feeding it has zero entropy and stays out of the pool
    last = ["stages.0.blocks.0.conv2.conv", "stages.1.blocks.0.conv2.conv"]
    assert step.excluded == dict.fromkeys(last, "zero entropy")
    pool = sum(pruner.masks.mask(lay.weight).numel() for lay in pruner.layers
               if lay.module not in last)
    assert step.budget == pool // 2 == 13016


# ----------------------------------------------------------------------------- Hugging Face

def _tiny_opt():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                    ffn_dim=32, num_attention_heads=2, max_position_embeddings=32,
                                    dropout=0.0, attention_dropout=0.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (8, 12), generator=g)
    return transformers, transformers.OPTForCausalLM(config), ids


def test_lm_loss_is_the_models_own():
    _, lm, ids = _tiny_opt()
    loss = LMLoss()
    batch = {"input_ids": ids[:4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    call = loss.inputs(batch)
    assert torch.equal(call.kwargs["labels"], ids[:4])
    got = loss(call(lm), batch)
    logits = lm(input_ids=ids[:4]).logits
    by_hand = F.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:4, 1:].reshape(-1))
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    assert isinstance(loss_by_name("lm"), LMLoss)
    with pytest.raises(PruneError, match="returned no loss"):
        loss(lm(input_ids=ids[:4]), batch)
    with pytest.raises(PruneError, match="unknown loss"):
        loss_by_name("hinge")


def test_trainer_callback_prunes_a_tiny_opt(tmp_path):
    transformers, lm, ids = _tiny_opt()
    pytest.importorskip("accelerate")
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": ids[i]} for i in range(8)]
    calib = [{"input_ids": ids[:4], "attention_mask": torch.ones(4, 12, dtype=torch.long)}]
    pruner = EGPPruner(lm, calib, capture="export")
    fc1 = [f"model.decoder.layers.{i}.fc1" for i in range(2)]
    assert pruner.layer_names == fc1 and pruner.capture == "export"
    callback = EGPCallback(pruner, every_n_epochs=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, learning_rate=1e-3, weight_decay=0.1)
    trainer = transformers.Trainer(model=lm, args=args, train_dataset=rows, callbacks=[callback])
    out = trainer.train()
    assert math.isfinite(out.training_loss)
    assert callback.stepped_at == [2] and pruner.round == 1       # after epoch 2 alone
    assert pruner.sparsity == pytest.approx(0.5, abs=1 / 1024)
    for name in fc1:                    # epoch 3's AdamW steps (weight decay) left them at zero
        mask = pruner.masks.mask(f"{name}.weight")
        assert int(lm.get_submodule(name).weight.count_nonzero()) == int(mask.sum())
    pruner.remove()
    assert "model.decoder.layers.0.fc1.weight" in lm.state_dict()


# ----------------------------------------------------------------------------- errors

def test_pruner_errors():
    model, data = _mlp(), _data()
    for kwargs, match in (({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                          ({"method": "random"}, "method"), ({"imp_scope": "some"}, "imp_scope"),
                          ({"capture": "jit"}, "capture")):
        with pytest.raises(PruneError, match=match):
            EGPPruner(model, data, **kwargs)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    with pytest.raises(PruneError, match="no batches"):
        EGPPruner(model, [])
    no_relu = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(PruneError, match="no prunable layer"):
        EGPPruner(no_relu, data)
    pruner = EGPPruner(model, data)
    with pytest.raises(PruneError, match="already carries pruning masks"):
        EGPPruner(model, data)
    with pytest.raises(PruneError, match="every_n_epochs"):
        EGPCallback(pruner, every_n_epochs=0)
    with pytest.raises(PruneError, match="EGPPruner"):
        EGPCallback(model)
    with pytest.raises(PruneError, match="shape"):
        pruner.masks.set("fc1.weight", torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(PruneError, match="no labels"):
        prune(_mlp(), [x for x, _ in data], progress=False)
