"""EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) with open_clip's pooled linear head, in plain torch.

The default model's image towers and its modality detector are this network. Building it through open_clip and
timm imports both (and, through torchvision, torch._dynamo): about 4.5 s of every app start and CLI call on
this CPU. The network is small, so it is written out here with timm's and open_clip's parameter names (the
package's ImageNet weights and saved models load unchanged) and TensorFlow's "same" padding;
``tests/test_efficientnet.py`` checks that its outputs equal timm's and open_clip's.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the ported weights were trained with
# (repeats, kernel, first stride, expansion, output channels) per stage; expansion 1 is a depthwise-separable block
_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
           (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# the vision_cfg of the open_clip tower this module reproduces
VISION_CFG = {"timm_model_name": "tf_efficientnet_lite0", "timm_pool": "avg", "timm_proj": "linear"}


class _ConvSame(nn.Conv2d):
    """A bias-free convolution padded as TensorFlow's "same": symmetric when it can be, else one more pixel
    on the bottom and right (strided convolutions)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
        static = stride == 1
        super().__init__(c_in, c_out, kernel, stride, padding=kernel // 2 if static else 0, groups=groups, bias=False)
        self.dynamic = not static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            k, s = self.kernel_size[0], self.stride[0]
            pad_h, pad_w = (max((math.ceil(n / s) - 1) * s + k - n, 0) for n in x.shape[-2:])
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


class _BatchNormAct(nn.BatchNorm2d):
    """Batch norm, then ReLU6 when ``act`` (timm's BatchNormAct2d: the same parameters)."""

    def __init__(self, channels: int, act: bool):
        super().__init__(channels, eps=_BN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu6(x) if self.act else x


class _Block(nn.Module):
    """timm's DepthwiseSeparableConv (expansion 1) or InvertedResidual (expand, depthwise, project), each
    convolution followed by its batch norm under timm's names; a residual where the shape is kept."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = c_in * expansion
        depthwise = [_ConvSame(mid, mid, kernel, stride, groups=mid), _BatchNormAct(mid, act=True)]
        if expansion == 1:
            layers = {"conv_dw": depthwise[0], "bn1": depthwise[1],
                      "conv_pw": _ConvSame(mid, c_out, 1), "bn2": _BatchNormAct(c_out, act=False)}
        else:
            layers = {"conv_pw": _ConvSame(c_in, mid, 1), "bn1": _BatchNormAct(mid, act=True),
                      "conv_dw": depthwise[0], "bn2": depthwise[1],
                      "conv_pwl": _ConvSame(mid, c_out, 1), "bn3": _BatchNormAct(c_out, act=False)}
        for name, layer in layers.items():
            self.add_module(name, layer)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.children():
            y = layer(y)
        return x + y if self.skip else y


def _stage(repeats: int, kernel: int, stride: int, expansion: int, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(*(_Block(c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expansion)
                           for i in range(repeats)))


class EfficientNetLite0(nn.Module):
    """The trunk: (B, 3, H, W) normalised pixels -> (B, 1280) average-pooled features."""

    num_features = 1280

    def __init__(self):
        super().__init__()
        self.conv_stem = _ConvSame(3, 32, 3, 2)
        self.bn1 = _BatchNormAct(32, act=True)
        stages, c_in = [], 32
        for repeats, kernel, stride, expansion, c_out in _STAGES:
            stages.append(_stage(repeats, kernel, stride, expansion, c_in, c_out))
            c_in = c_out
        self.blocks = nn.Sequential(*stages)
        self.conv_head = _ConvSame(c_in, self.num_features, 1)
        self.bn2 = _BatchNormAct(self.num_features, act=True)

    def forward_head(self, maps: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        """Global average pooling (timm's name for the step after ``bn2``)."""
        return maps.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.bn1(self.conv_stem(x)))
        return self.forward_head(self.bn2(self.conv_head(x)))


class EfficientNetLite0Tower(nn.Module):
    """open_clip's TimmModel for ``VISION_CFG``: the trunk, then ``head.proj`` (a bias-free linear map to D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.trunk = EfficientNetLite0()
        self.head = nn.Sequential()
        self.head.add_module("drop", nn.Dropout(0.0))
        self.head.add_module("proj", nn.Linear(self.trunk.num_features, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))
