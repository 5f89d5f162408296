"""The benchmark cases: models with planted ground truth, their oracles, calibration data.

Case 1, ResNet-18 (torchvision, random init, fixed seed) with k BasicBlocks planted dead. For a
planted block bn1 has weight 0 and bias -1, so its output is -1 everywhere and relu1 is OFF for
every input; bn2 has random statistics and weight, and a shift that cancels its mean term
(beta = gamma * mean / sqrt(var + eps), computed in float32), so the residual branch adds 0 in
real arithmetic and a float32 residue of about 1e-7 in practice, as a trained network whose
branch collapsed would. The block computes relu(x) = x (x is itself a ReLU output). The oracle
replaces those blocks with nn.Identity: the best any compressor can do. Only blocks without
downsample are planted: index 1 of layer1..layer4, the first k of them.

Case 2, ViT-tiny (timm vit_tiny_patch16_224, random init, fixed seed), two variants:
  "dead":   in every other block 3/4 of the MLP hidden units get fc1 weight row 0 and bias -10,
            so GELU's input is -10 and its output ~ -7.6e-23 (dead);
  "linear": in every block fc1 gets bias +20 and weights ~ N(0, 0.01^2); the input of fc1 is a
            LayerNorm output (|x| ~ sqrt(192)), so GELU's input stays in 20 +- 1 > 5.3 and GELU is
            the identity to float32 rounding: fc2 o fc1 folds into one 192 x 192 Linear.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

RESNET_BLOCKS = ("layer1.1", "layer2.1", "layer3.1", "layer4.1")
VIT_NAME = "vit_tiny_patch16_224"


def resnet18_planted(k: int, seed: int = 0) -> nn.Module:
    import torchvision

    if not 0 <= k <= len(RESNET_BLOCKS):
        raise ValueError(f"k must be in 0..{len(RESNET_BLOCKS)}")
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for name in RESNET_BLOCKS[:k]:
            block = model.get_submodule(name)
            assert block.downsample is None, name
            block.bn1.weight.zero_()
            block.bn1.bias.fill_(-1.0)
            bn, g = block.bn2, torch.Generator().manual_seed(seed + len(name))
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps))
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


def calibration(batches: int, batch_size: int, img_size: int = 224,
                seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 3, img_size, img_size, generator=gen) for _ in range(batches)]


def compressor(stand_in: bool, target: str = "ort-cpu") -> Callable[..., nn.Module]:
    """compress(model, calib, without=()) -> module: egp_fx.compress for `target` with its
    default passes minus `without`; or, with stand_in=True (for developing the scripts), a plain
    trace."""
    if stand_in:
        from egp_fx.capture import trace

        return lambda model, calib, without=(): trace(model)
    from egp_fx.passes import DEFAULT_PIPELINE
    from egp_fx.pipeline.compress import compress

    def run(model: nn.Module, calib: list[torch.Tensor], without=()) -> nn.Module:
        passes = tuple(p for p in DEFAULT_PIPELINE if p not in without)
        return compress(model, calib, passes=passes, target=target, progress=False)

    return run
