"""ResNet-18 for 32x32 inputs (the CIFAR variant EGP was run on), built from torchvision's BasicBlock.

Stem: 3x3 conv, stride 1, BatchNorm, ReLU, and with `stem_maxpool=True` the 3x3 stride-2 max-pool
(padding 1) that the EGP reference's CIFAR ResNet-18 keeps from torchvision (it halves the
32x32 maps to 16x16 before the first stage); then four stages of two BasicBlocks with widths
w, 2w, 4w, 8w (w = round(64 * width_mult)), stride 2 at the start of stages 2-4 with a 1x1
conv + BatchNorm downsample on the shortcut; global average pool; linear classifier.
ReLU calls: 1 (stem) + 2 per block x 8 blocks = 17; the second ReLU of a block comes after the
residual add, as in torchvision (one nn.ReLU module called twice per block).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock

from egp_fx.deploy.saving import save_weights
from egp_fx.distributed import is_writer

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEMO_CHECKPOINT = DATA_DIR / "demo_resnet18_digits.safetensors"
DEMO_CONFIG = DATA_DIR / "demo_resnet18_digits.json"


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int = 10
    width_mult: float = 1.0
    in_channels: int = 3
    arch: str = "resnet18_cifar"
    stem_maxpool: bool = False


class ResNetCifar(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 width_mult: float = 1.0, in_channels: int = 3, stem_maxpool: bool = False):
        super().__init__()
        width = max(1, round(64 * width_mult))
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.stem_maxpool = stem_maxpool
        if stem_maxpool:
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0], stride=1)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.stem_maxpool:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                   stem_maxpool: bool = False) -> ResNetCifar:
    """ResNet-18 with the CIFAR stem; width_mult=0.25 gives stage widths 16/32/64/128;
    stem_maxpool=True adds the reference's max-pool after the stem."""
    return ResNetCifar((2, 2, 2, 2), num_classes, width_mult, in_channels, stem_maxpool)


def build_model(config: ResNetConfig) -> ResNetCifar:
    if config.arch != "resnet18_cifar":
        raise ValueError(f"unknown arch {config.arch!r} (only 'resnet18_cifar')")
    return resnet18_cifar(config.num_classes, config.width_mult, config.in_channels,
                          config.stem_maxpool)


def save_model(model: nn.Module, config: ResNetConfig, weights_path: str | Path,
               config_path: str | Path, extra: dict | None = None) -> None:
    """Weights as safetensors, the config (plus `extra`, e.g. data normalisation) as JSON; under
    an initialised torch.distributed process group, by rank 0 alone."""

    if not is_writer():
        return
    save_weights(model, weights_path)
    Path(config_path).write_text(json.dumps({**asdict(config), **(extra or {})}, indent=2) + "\n")


def load_model(weights_path: str | Path, config_path: str | Path) -> tuple[ResNetCifar, dict]:
    """(model in eval mode, the JSON config as a dict) from files written by save_model."""
    from safetensors.torch import load_file  # noqa: PLC0415

    meta = json.loads(Path(config_path).read_text())
    fields = {k: meta[k] for k in ResNetConfig.__dataclass_fields__ if k in meta}
    model = build_model(ResNetConfig(**fields))
    model.load_state_dict(load_file(str(weights_path)))
    return model.eval(), meta


def load_demo_model() -> tuple[ResNetCifar, dict]:
    """The EGP-pruned ResNet-18 shipped for the demo (see benchmarks/make_demo_checkpoint.py)."""
    return load_model(DEMO_CHECKPOINT, DEMO_CONFIG)
