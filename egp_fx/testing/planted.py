"""Networks with planted dead and linear units, and their oracles: the best any compressor can do.

Every plant is made with parameters (egp_fx.testing.planting), so it holds for every input.

planted_net(): a small residual conv net (eval mode, seeded weights, input 3x16x16):
    stem.2          (ReLU after stem.1)      channels 1 and 5 of 8 dead
    layer1.0.relu1  (after layer1.0.bn1)     channel 3 of 8 dead
    layer1.0.relu2  (after the residual add) mixed: nothing to do
    layer2.0.relu   (after layer2.0.bn)      every channel linear: the ReLU is the identity

resnet18_planted(k): torchvision ResNet-18 (random init, fixed seed) with k BasicBlocks planted
dead: bn1 has weight 0 and bias -1, so relu1 is OFF for every input; bn2 is cancelling, so the
residual branch adds `shift` (0: a float32 residue of about 1e-7, as a trained network whose
branch collapsed would). The block computes relu(x + shift) = x + shift (x is a ReLU output).
resnet18_oracle replaces those blocks with nn.Identity. Only blocks without downsample are
planted: index 1 of layer1..layer4, the first k of them.

vit_planted(kind): timm vit_tiny_patch16_224 (random init, fixed seed):
  "dead":   in every other block 3/4 of the MLP hidden units get fc1 weight row 0 and bias -10,
            so GELU's input is -10 and its output ~ -7.6e-23 (dead);
  "linear": in every block fc1 gets bias +20 and weights ~ N(0, 0.01^2); the input of fc1 is a
            LayerNorm output (|x| ~ sqrt(192)), so GELU's input stays in 20 +- 1 > 5.3 and GELU is
            the identity to float32 rounding: fc2 o fc1 folds into one 192 x 192 Linear.

Language models (LLM_CASES: Hugging Face architectures built from configs, random init, no
weights downloaded), dead FFN units planted after a published profile (Voita et al. 2023,
"Neurons in Large Language Models: Dead, N-gram, Positional": in OPT-66b more than 70% of the
FFN neurons of some early layers never fire, concentrated in the first half of the network):
layer i of n gets the fraction 0.7 (1 - 2i / n) of its FFN units dead for i < n / 2, none after.
A dead unit has its input weights zeroed and a negative bias (beyond GELU's / SiLU's float32
margins), so it is OFF on every input. llm_oracle narrows the FFN layers by hand to exactly the
live units, or the live units plus the fewest dead ones that round each width up to a multiple:
what a person would build who knew which units are dead. A randomly initialised network also
has units that never fire on given tokens; observed_dead finds them with forward hooks
(independently of egp_fx), so that an oracle built from them is the best any compressor can do
with that data.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

from .planting import cancelling, plant_constant, plant_dead, plant_linear, plant_rows

# ----------------------------------------------------------------------------- a small conv net

STEM_DEAD = [1, 5]
BLOCK_DEAD = [3]
WIDTH = 8
INPUT_SHAPE = (3, 16, 16)


class Residual(nn.Module):
    """conv-bn-relu-conv-bn, plus the input, then relu (a ResNet basic block)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(x + y)


class Linearish(nn.Module):
    """1x1 conv, BN that pins every channel near +5, ReLU (always the identity there)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 1)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class PlantedNet(nn.Module):
    def __init__(self, width: int = WIDTH, num_classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Residual(width))
        self.layer2 = nn.Sequential(Linearish(width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def planted_net(num_classes: int = 4) -> PlantedNet:
    """The planted network described in the module docstring (deterministic weights)."""
    torch.manual_seed(0)
    net = PlantedNet(num_classes=num_classes)
    plant_dead(net.stem[1], STEM_DEAD)
    plant_dead(net.layer1[0].bn1, BLOCK_DEAD)
    plant_linear(net.layer2[0].bn, range(WIDTH), 5.0)
    return net.eval()


# ----------------------------------------------------------------------------- vision models

RESNET_BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")
VIT_NAME = "vit_tiny_patch16_224"


def resnet18_planted(k: int, seed: int = 0, shift: float = 0.0) -> nn.Module:
    """ResNet-18 whose first k blocks of RESNET_BLOCKS have a dead first ReLU and a branch that
    adds `shift` (0: a float32 residue of a cancelling BatchNorm)."""
    import torchvision

    if not 0 <= k <= len(RESNET_BLOCKS):
        raise ValueError(f"k must be in 0..{len(RESNET_BLOCKS)}")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    for name in RESNET_BLOCKS[:k]:
        block = model.get_submodule(name)
        assert block.downsample is None, name
        plant_constant(block.bn1, range(block.bn1.num_features), -1.0)
        cancelling(block.bn2, seed + len(name), shift)
    return model


def resnet18_oracle(planted: nn.Module, k: int) -> nn.Module:
    oracle = copy.deepcopy(planted)
    for name in RESNET_BLOCKS[:k]:
        layer, index = name.split(".")
        getattr(oracle, layer)[int(index)] = nn.Identity()
    return oracle.eval()


def vit_planted(kind: str, seed: int = 0, img_size: int = 224) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(VIT_NAME, pretrained=False, img_size=img_size).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            fc1 = block.mlp.fc1
            if kind == "dead" and i % 2 == 0:
                rows = torch.randperm(fc1.out_features, generator=gen)[: 3 * fc1.out_features // 4]
                fc1.weight[rows] = 0.0
                fc1.bias[rows] = -10.0
            elif kind == "linear":
                fc1.weight.copy_(torch.randn(fc1.weight.shape, generator=gen) * 0.01)
                fc1.bias.fill_(20.0)
            elif kind not in ("dead", "linear"):
                raise ValueError(f"unknown ViT variant {kind!r}")
    return model


def images(batches: int, batch_size: int, img_size: int = 224, seed: int = 1) -> list[torch.Tensor]:
    """Random images, N(0, 1), from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, img_size, img_size, generator=gen) for _ in range(batches)]


# ----------------------------------------------------------------------------- language models

PROFILE_TOP = 0.7
OPT_SIZES = {"125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                          num_attention_heads=12),
             "350m": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096,
                          num_attention_heads=16, word_embed_proj_dim=512),
             "1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192,
                          num_attention_heads=32)}


@dataclass(frozen=True)
class FFN:
    """Where an architecture's FFN units are: the layer stack, the layers narrowed by rows (the
    first writes the activation's input) and by columns, the bias of a planted unit, and the
    dead region (pre-activation at or below `threshold`: ReLU 0, GELU -5.5, SiLU -20)."""
    stack: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]
    dead_bias: float
    threshold: float
    decoder: bool = True           # called with use_cache=False


OPT_FFN = FFN("model.decoder.layers", ("fc1",), ("fc2",), -1.0, 0.0)
LLAMA_FFN = FFN("model.layers", ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",), -30.0, -20.0)
BERT_FFN = FFN("encoder.layer", ("intermediate.dense",), ("output.dense",), -10.0, -5.5,
               decoder=False)


def dead_fraction(i: int, n: int) -> float:
    return PROFILE_TOP * (1 - 2 * i / n) if i < n / 2 else 0.0


def _plant_profile(model: nn.Module, ffn: FFN, seed: int):
    """(model, {layer index: dead units}) after planting the profile into `model`."""
    g = torch.Generator().manual_seed(seed + 1)
    layers = model.get_submodule(ffn.stack)
    dead = {i: plant_rows(layer.get_submodule(ffn.rows[0]), dead_fraction(i, len(layers)),
                          ffn.dead_bias, g)
            for i, layer in enumerate(layers) if dead_fraction(i, len(layers)) > 0}
    return model, dead


def opt_model(size: str = "125m") -> nn.Module:
    """OPTForCausalLM of `size` (OPT_SIZES), random init from the global generator, eval mode."""
    import transformers

    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=50272, max_position_embeddings=2048, **OPT_SIZES[size])).eval()


def opt(size: str = "125m", seed: int = 0):
    """(OPTForCausalLM, {layer index: dead units}); 125m: 12 layers, d=768, FFN 3072; 1.3b: 24
    layers, d=2048, FFN 8192."""
    torch.manual_seed(seed)
    return _plant_profile(opt_model(size), OPT_FFN, seed)


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
    return _plant_profile(model, LLAMA_FFN, seed)


def bert(seed: int = 0):
    """BERT-base architecture (12 layers, d=768, FFN 3072, GELU) with dead intermediate units."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(), add_pooling_layer=False).eval()
    return _plant_profile(model, BERT_FFN, seed)


class LanguageCase(NamedTuple):
    build: Callable[[], tuple]     # () -> (model, {layer index: planted dead units})
    ffn: FFN
    vocab: int


LLM_CASES = {"opt-125m": LanguageCase(opt, OPT_FFN, 50272),
             "llama-200m": LanguageCase(llama, LLAMA_FFN, 32000),
             "bert-base": LanguageCase(bert, BERT_FFN, 30522)}


def llm_oracle(ffn: FFN, model: nn.Module, dead: dict[int, list[int]], multiple: int = 1):
    """A copy of `model` whose FFN layers keep only the live units (and the fewest dead ones
    that make each width a multiple of `multiple`)."""
    oracle = copy.deepcopy(model)
    layers = oracle.get_submodule(ffn.stack)
    for i, units in dead.items():
        layer = layers[i]
        keep = _kept(layer.get_submodule(ffn.rows[0]).out_features, units, multiple)
        for path in ffn.rows:
            _replace(layer, path, _rows(layer.get_submodule(path), keep))
        for path in ffn.cols:
            _replace(layer, path, _cols(layer.get_submodule(path), keep))
    return oracle.eval()


@torch.no_grad()
def observed_dead(ffn: FFN, model, batches: list[dict]) -> dict[int, list[int]]:
    """Per layer, the units whose pre-activation stayed in the dead region (at or below
    ffn.threshold) on every token of `batches`."""
    layers = model.get_submodule(ffn.stack)
    top: dict[int, torch.Tensor] = {}
    hooks = [layer.get_submodule(ffn.rows[0]).register_forward_hook(
        lambda mod, inp, out, i=i: top.__setitem__(
            i, torch.maximum(top[i], out.flatten(0, -2).amax(0)) if i in top
            else out.flatten(0, -2).amax(0)))
        for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            model(**batch, use_cache=False) if ffn.decoder else model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.nonzero(m <= ffn.threshold).flatten().tolist() for i, m in top.items()
            if bool((m <= ffn.threshold).any())}


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


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


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
