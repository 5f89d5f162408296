"""Tiny members of the timm families whose activations hid inside fused norm+act modules.

Each is the family's own model class with fewer and narrower stages, so that a compress test
takes a couple of seconds; FAMILIES maps a family to (factory, input side).
"""
from __future__ import annotations

import timm
from timm.layers import BatchNormAct2d, create_conv2d
from timm.models.byobnet import ByobNet, ByoModelCfg
from timm.models.cspnet import CspModelCfg, CspNet, CspStagesCfg, CspStemCfg
from timm.models.densenet import DenseNet
from timm.models.dpn import DPN
from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block
from timm.models.regnet import RegNet, RegNetCfg
from timm.models.resnetv2 import ResNetV2


def mobilevit():
    """MobileViT (mobilevit_xxs's blocks): one inverted residual stage, one MobileViT stage."""
    return ByobNet(ByoModelCfg(
        blocks=(_inverted_residual_block(d=1, c=8, s=1, br=2.0),
                _mobilevit_block(d=1, c=16, s=2, transformer_dim=16, transformer_depth=1,
                                 patch_size=2, br=2.0)),
        stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu",
        num_features=32), num_classes=10)


def darknet():
    """Darknet (darknet17's stages: dark blocks, leaky ReLU), two stages."""
    return CspNet(CspModelCfg(
        stem=CspStemCfg(out_chs=16, kernel_size=3, stride=1, pool=""),
        stages=CspStagesCfg(depth=(1, 1), out_chs=(32, 64), stride=(2,), bottle_ratio=(0.5,),
                            block_ratio=(1.0,), stage_type="dark", block_type="dark")),
        num_classes=10)


FAMILIES = {
    "mobilenetv2": (lambda: timm.create_model("mobilenetv2_035", num_classes=10), 32),
    "densenet": (lambda: DenseNet(growth_rate=8, block_config=(2, 2), num_classes=10), 32),
    "resnetv2": (lambda: ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16,
                                  conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                                  num_classes=10), 32),   # resnetv2_50's layers, BatchNormAct2d
    "darknet": (darknet, 32),
    "dpn": (lambda: DPN(small=True, num_init_features=16, k_r=16, groups=1, k_sec=(1, 1, 1, 1),
                        inc_sec=(8, 8, 8, 8), num_classes=10), 32),
    "mobilevit": (mobilevit, 32),
    "efficientnet": (lambda: timm.create_model("test_efficientnet", num_classes=10), 32),
    "regnety": (lambda: RegNet(RegNetCfg(w0=16, wa=8, wm=1.2, depth=4, group_size=8,
                                         se_ratio=0.25), num_classes=10), 32),
}
