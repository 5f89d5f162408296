"""Hugging Face transformers, captured through torch.export: tiny OPT, GPT-2, BERT and LLaMA with
planted dead, constant and linear FFN units compress exactly, shrink by at least the plant, are
called like the original, and export to ONNX with parity. Models are built from configs: no
network."""
from __future__ import annotations

import copy

import pytest
import torch

import egp_fx

transformers = pytest.importorskip("transformers")

VOCAB, D, FFN = 128, 64, 256
DEAD = list(range(0, FFN, 4))          # 64 units OFF on every input
CONSTANT = list(range(1, FFN, 16))     # 16 units with a constant input: constant output
PLANT = len(DEAD) + len(CONSTANT)      # 80: a multiple of 16, so the ort-cpu width rule keeps none


def batches(n: int = 2, size: int = 4, length: int = 16, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[0, -3:] = 0                                   # one padded sequence
        out.append({"input_ids": torch.randint(0, VOCAB, (size, length), generator=g),
                    "attention_mask": mask})
    return out


def _plant_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows_dead, rows_const,
                dead: float, const: float, out_dim: int = 0) -> None:
    """Zero the weights of units (rows of [out, in] weights, columns of Conv1D's [in, out])."""
    with torch.no_grad():
        for rows, value in ((rows_dead, dead), (rows_const, const)):
            weight.index_fill_(out_dim, torch.tensor(rows), 0.0)
            if bias is not None:
                bias[rows] = value


def _linear_units(weight: torch.Tensor, bias: torch.Tensor, value: float) -> None:
    """Every unit stays in the identity region of its activation on these inputs."""
    with torch.no_grad():
        weight.mul_(1e-3)
        bias.fill_(value)


def opt():
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, ffn_dim=FFN, num_attention_heads=4,
        max_position_embeddings=64))
    fc1 = model.model.decoder.layers[0].fc1
    _plant_rows(fc1.weight, fc1.bias, DEAD, CONSTANT, -1.0, 0.5)
    lin = model.model.decoder.layers[1].fc1
    _linear_units(lin.weight, lin.bias, 3.0)
    return model, ("model.decoder.layers.1.fc1", "model.decoder.layers.1.fc2")


def gpt2():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64, n_inner=FFN,
        bos_token_id=0, eos_token_id=0))            # default activation: gelu_new (tanh form)
    c_fc = model.transformer.h[0].mlp.c_fc          # Conv1D: weight [in, out]
    _plant_rows(c_fc.weight, c_fc.bias, DEAD, CONSTANT, -10.0, 10.0, out_dim=1)
    lin = model.transformer.h[1].mlp.c_fc
    _linear_units(lin.weight, lin.bias, 10.0)
    return model, ("transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj")


def bert():
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, intermediate_size=FFN,
        num_attention_heads=4, max_position_embeddings=64), add_pooling_layer=False)
    dense = model.encoder.layer[0].intermediate.dense
    _plant_rows(dense.weight, dense.bias, DEAD, CONSTANT, -10.0, 10.0)
    lin = model.encoder.layer[1].intermediate.dense
    _linear_units(lin.weight, lin.bias, 10.0)
    return model, ("encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense")


def llama():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, intermediate_size=FFN,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        mlp_bias=True))
    gate = model.model.layers[0].mlp.gate_proj
    _plant_rows(gate.weight, gate.bias, DEAD, CONSTANT, -30.0, 0.0)   # silu(-30) = 0, silu(0) = 0
    return model, None


MODELS = {"opt": opt, "gpt2": gpt2, "bert": bert, "llama": llama}


def _call(model, batch):
    kwargs = {} if isinstance(model, transformers.BertModel) else {"use_cache": False}
    return model(**batch, **kwargs)


def _main(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module", params=sorted(MODELS))
def compressed(request):
    torch.manual_seed(0)
    model, linear_pair = MODELS[request.param]()
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    small = egp_fx.compress(model, batches(), progress=False)
    return request.param, model, small, linear_pair, state


def test_captured_through_torch_export_with_the_reason(compressed):
    _, model, small, _, state = compressed
    info = egp_fx.capture_info(small) or egp_fx.report_of(small).capture
    assert info.mode == "export" and "torch.fx cannot trace" in info.fx_failure
    assert "use_cache=False" in info.describe() or isinstance(model, transformers.BertModel)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_outputs_equal_on_calibration_and_other_shapes(compressed):
    _, model, small, _, _ = compressed
    report = egp_fx.report_of(small)
    assert report.max_error <= 1e-5 and not report.rolled_back
    other = batches(1, size=3, length=11, seed=5)          # dynamic batch and sequence
    with torch.no_grad():
        for batch in batches() + other:
            ref, out = _call(model, batch), small(**batch)
            assert type(out) is type(ref)
            scale = float(_main(ref).abs().max())
            torch.testing.assert_close(_main(out), _main(ref), rtol=0, atol=1e-5 * scale)


def test_planted_units_are_gone(compressed):
    name, model, small, linear_pair, _ = compressed
    report = egp_fx.report_of(small)
    narrowed = [r for r in report.applied if r.kind == "narrow_channels"]
    assert len(narrowed) == 1 and str(narrowed[0].decision) == f"narrowed {FFN} -> {FFN - PLANT}"
    factor = 3 if name == "llama" else 2                    # gate, up and down / fc1 and fc2
    assert report.before.params - report.after.params >= factor * PLANT * D
    assert report.before.flops - report.after.flops >= 2 * factor * PLANT * D * 16   # 16 tokens
    if linear_pair is not None:   # the all-linear MLP became one D x D Linear
        folds = [r for r in report.applied if r.kind == "linear_o_linear"]
        assert len(folds) == 1 and folds[0].path == linear_pair[1]
        assert "-> linear 64->64" in folds[0].detail


def test_exports_to_onnx_with_parity(compressed, tmp_path):
    name, _, small, _, _ = compressed
    result = egp_fx.export_onnx(small, tmp_path / f"{name}.onnx", batches()[0])
    assert result.inputs == ["input_ids", "attention_mask"]
    assert result.max_rel_err <= 1e-4 and result.path.is_file()


def test_runs_on_a_device_other_than_the_capture(compressed):
    """torch.export writes the capture's device into the ops that make masks and positions; the
    compressed module must follow .to() like the model did. The meta device stands in for a GPU:
    a tensor left on the CPU, or a view only valid for the CPU kernel's strides, fails there."""
    _, model, small, _, _ = compressed
    assert "device(type='cpu')" not in small.code
    batch = batches(1, size=3, length=11, seed=5)[0]
    with torch.no_grad():
        expected = _main(_call(model, batch)).shape
        out = copy.deepcopy(small).to("meta")(**{k: v.to("meta") for k, v in batch.items()})
    assert _main(out).device.type == "meta" and _main(out).shape == expected


def test_into_model_puts_the_narrowing_back_into_the_model_class(compressed):
    name, model, small, _, state = compressed
    result = egp_fx.into_model(small, model)
    assert type(result) is type(model) and result is not model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    narrowing, = [r for r in egp_fx.report_of(small).applied if r.kind == "narrow_channels"]
    prefix = egp_fx.capture_info(small).prefix
    produced = narrowing.tensors[0][len(prefix):]          # the layer making the planted units
    width = result.get_submodule(produced.rpartition(".")[0])
    weight = result.get_parameter(produced)
    assert FFN - PLANT in weight.shape and FFN not in weight.shape
    assert (width.nf if name == "gpt2" else width.out_features) == FFN - PLANT
    other = batches(1, size=3, length=11, seed=5)
    with torch.no_grad():
        for batch in batches() + other:
            ref, out = _call(model, batch), _call(result, batch)
            scale = float(_main(ref).abs().max())
            torch.testing.assert_close(_main(out), _main(ref), rtol=0, atol=1e-5 * scale)
    if hasattr(model, "generate"):                          # the class's own methods work
        prompt = other[0]["input_ids"][:1, :5]
        kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(result.generate(prompt, **kwargs), model.generate(prompt, **kwargs))



def test_into_model_refuses_a_copy_that_computes_otherwise(compressed):
    """A narrowing whose record misses a tensor it replaced (a narrowed weight, or the reader's
    bias that absorbed constant units) gives a copy that differs: refused, not returned."""
    _, model, small, _, _ = compressed
    narrowing, = [r for r in egp_fx.report_of(small).applied if r.kind == "narrow_channels"]
    prefix = egp_fx.capture_info(small).prefix
    transposed = egp_fx.capture_info(small).transposed
    own = model.state_dict()

    def changed(name):
        value = small.get_parameter(name) if name in dict(small.named_parameters()) \
            else small.get_buffer(name)
        value = value.t() if name in transposed else value
        mine = own[name[len(prefix):]]
        return value.shape != mine.shape or not torch.equal(value, mine)

    kept = list(narrowing.tensors)
    dropped = [name for name in kept if changed(name)]
    assert len(dropped) >= 3               # the maker's weight and bias, the reader's weight
    try:
        for name in dropped:
            narrowing.tensors[:] = [n for n in kept if n != name]
            with pytest.raises(egp_fx.CompressError, match="differs from the compressed module"):
                egp_fx.into_model(small, model)
    finally:
        narrowing.tensors[:] = kept
