"""Language-model cases: Hugging Face architectures built from configs (random init: no weights
are downloaded), dead FFN units planted after a published profile, and hand-built oracles.

Profile (after Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram,
Positional": in OPT-66b more than 70% of the FFN neurons of some early layers never fire,
concentrated in the first half of the network): layer i of n gets the fraction
0.7 (1 - 2i / n) of its FFN units dead for i < n / 2, none after. A dead unit has its input
weights zeroed and a negative bias (for GELU/SiLU beyond their float32 margins), so it is OFF on
every input, not only on the calibration data.

Oracle: the same Hugging Face model with the FFN layers replaced by hand by narrowed nn.Linear
modules holding exactly the live units ("exact"), or the live units plus the fewest dead ones
that round each width up to a multiple ("aligned"): what a person would build who knew which
units are dead. A randomly initialised network also has units that never fire on a given set
of tokens; `observed_dead` finds them with forward hooks on the calibration data (independently
of egp_fx), and the oracles remove them too, so that the oracle is the best any compressor can
do with that data.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

PROFILE_TOP = 0.7


def dead_fraction(i: int, n: int) -> float:
    return PROFILE_TOP * (1 - 2 * i / n) if i < n / 2 else 0.0


def _plant(rows_of: nn.Linear, fraction: float, bias: float, g: torch.Generator) -> list[int]:
    """Zero `fraction` of the units (rows) of `rows_of`, chosen at random; their indices."""
    n = rows_of.out_features
    dead = sorted(torch.randperm(n, generator=g)[: int(round(fraction * n))].tolist())
    with torch.no_grad():
        rows_of.weight[dead] = 0.0
        if rows_of.bias is not None:
            rows_of.bias[dead] = bias
    return dead


def opt(size: str = "125m", seed: int = 0):
    """(OPTForCausalLM, {layer index: dead units}) ; 125m: 12 layers, d=768, FFN 3072; 1.3b: 24
    layers, d=2048, FFN 8192."""
    import transformers

    dims = {"125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                         num_attention_heads=12),
            "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                         num_attention_heads=32)}[size]
    torch.manual_seed(seed)
    model = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=50272, max_position_embeddings=2048, **dims)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    layers = model.model.decoder.layers
    dead = {i: _plant(layer.fc1, dead_fraction(i, len(layers)), -1.0, g)
            for i, layer in enumerate(layers) if dead_fraction(i, len(layers)) > 0}
    return model, dead


def opt_oracle(model, dead: dict[int, list[int]], multiple: int = 1):
    oracle = copy.deepcopy(model)
    for i, units in dead.items():
        layer = oracle.model.decoder.layers[i]
        keep = _kept(layer.fc1.out_features, units, multiple)
        layer.fc1 = _rows(layer.fc1, keep)
        layer.fc2 = _cols(layer.fc2, keep)
    return oracle.eval()


def llama(seed: int = 0):
    """A LLaMA-architecture model of about 200M parameters with dead gate units (SiLU), and the
    dead units per layer. Biases on (mlp_bias) so that a unit can be planted far below SiLU's
    margin."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, num_hidden_layers=12, intermediate_size=2816,
        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        mlp_bias=True)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    layers = model.model.layers
    dead = {i: _plant(layer.mlp.gate_proj, dead_fraction(i, len(layers)), -30.0, g)
            for i, layer in enumerate(layers) if dead_fraction(i, len(layers)) > 0}
    return model, dead


def llama_oracle(model, dead, multiple: int = 1):
    oracle = copy.deepcopy(model)
    for i, units in dead.items():
        mlp = oracle.model.layers[i].mlp
        keep = _kept(mlp.gate_proj.out_features, units, multiple)
        mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, keep), _rows(mlp.up_proj, keep)
        mlp.down_proj = _cols(mlp.down_proj, keep)
    return oracle.eval()


def bert(seed: int = 0):
    """BERT-base architecture (12 layers, d=768, FFN 3072, GELU) with dead intermediate units."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(seed + 1)
    layers = model.encoder.layer
    dead = {i: _plant(layer.intermediate.dense, dead_fraction(i, len(layers)), -10.0, g)
            for i, layer in enumerate(layers) if dead_fraction(i, len(layers)) > 0}
    return model, dead


def bert_oracle(model, dead, multiple: int = 1):
    oracle = copy.deepcopy(model)
    for i, units in dead.items():
        layer = oracle.encoder.layer[i]
        keep = _kept(layer.intermediate.dense.out_features, units, multiple)
        layer.intermediate.dense = _rows(layer.intermediate.dense, keep)
        layer.output.dense = _cols(layer.output.dense, keep)
    return oracle.eval()


FIRST_LAYER = {"opt-125m": ("model.decoder.layers", "fc1", 0.0),
               "llama-200m": ("model.layers", "mlp.gate_proj", -20.0),
               "bert-base": ("encoder.layer", "intermediate.dense", -5.5)}


@torch.no_grad()
def observed_dead(name: str, model, batches: list[dict]) -> dict[int, list[int]]:
    """Per layer, the units whose pre-activation stayed in the dead region (at or below the
    threshold: ReLU 0, GELU -5.5, SiLU -20) on every token of `batches`."""
    stack, first, threshold = FIRST_LAYER[name]
    layers = model.get_submodule(stack)
    top: dict[int, torch.Tensor] = {}
    hooks = [layer.get_submodule(first).register_forward_hook(
        lambda mod, inp, out, i=i: top.__setitem__(
            i, torch.maximum(top[i], out.flatten(0, -2).amax(0)) if i in top
            else out.flatten(0, -2).amax(0)))
        for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            model(**batch) if name == "bert-base" else model(**batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.nonzero(m <= threshold).flatten().tolist() for i, m in top.items()
            if bool((m <= threshold).any())}


CASES = {"opt-125m": (opt, opt_oracle), "llama-200m": (llama, llama_oracle),
         "bert-base": (bert, bert_oracle)}


def tokens(vocab: int, batches: int, size: int, length: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (size, length), generator=g),
             "attention_mask": torch.ones(size, length, dtype=torch.long)}
            for _ in range(batches)]


def _kept(n: int, dead: list[int], multiple: int) -> list[int]:
    """The live units, plus the first dead ones needed to reach a multiple of `multiple`."""
    live = [u for u in range(n) if u not in set(dead)]
    extra = (-len(live)) % multiple if multiple > 1 else 0
    return sorted(live + sorted(dead)[:extra])


def _rows(linear: nn.Linear, keep: list[int]) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


def _cols(linear: nn.Linear, keep: list[int]) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new
