"""Small networks with planted dead and linear units, for exact inspect/CLI tests.

`planted_net()` returns a residual conv net (eval mode, seeded weights) whose BatchNorm shifts
decide the sign of chosen pre-activations for every input: a BN channel with weight 0 and bias
-1 feeds its ReLU the constant -1 (a dead unit), and a BN with weight 1e-3 and bias 5 feeds its
ReLU 5 +- a tiny term (always in the identity region). So, on any calibration data:

    stem.2          (ReLU after stem.1)      channels 1 and 5 of 8 dead
    layer1.0.relu1  (after layer1.0.bn1)     channel 3 of 8 dead
    layer1.0.relu2  (after the residual add) mixed: nothing to do
    layer2.0.relu   (after layer2.0.bn)      every channel linear: the ReLU is the identity
"""
from __future__ import annotations

import torch
from torch import nn

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


def _pin(bn: nn.BatchNorm2d, channels, weight: float, bias: float) -> None:
    with torch.no_grad():
        bn.weight[channels] = weight
        bn.bias[channels] = bias


def planted_net(num_classes: int = 4) -> PlantedNet:
    """The planted network described in the module docstring (deterministic weights)."""
    torch.manual_seed(0)
    net = PlantedNet(num_classes=num_classes)
    _pin(net.stem[1], STEM_DEAD, 0.0, -1.0)
    _pin(net.layer1[0].bn1, BLOCK_DEAD, 0.0, -1.0)
    _pin(net.layer2[0].bn, list(range(WIDTH)), 1e-3, 5.0)
    return net.eval()


def broken_factory():
    """A factory that returns something that is not a module (for the CLI error tests)."""
    return 42
