"""MobileNetV2 with torchvision's module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tvm_cim.learn.zoo.initialization import torchvision_init

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_act(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block (torchvision's layout).

    ``conv`` is a ``Sequential``: with expansion, ``conv.0`` is the 1x1 expansion
    (``conv.0.0`` its convolution), ``conv.1`` the 3x3 depthwise convolution block
    (``conv.1.0``), ``conv.2`` the 1x1 projection and ``conv.3`` its batch norm; without
    expansion the depthwise block is ``conv.0``, the projection ``conv.1`` and the batch norm
    ``conv.2``.

    Parameters
    ----------
    cin, cout
        Input and output channels.
    stride
        Stride of the depthwise convolution.
    expand_ratio
        Width multiplier of the hidden layer.
    """

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(cin, hidden, kernel=1))
        layers += [
            _conv_bn_act(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """ImageNet MobileNetV2 with torchvision's layout and module names.

    ``features.0`` is the stem (``features.0.0`` a 3x3 stride-2 convolution),
    ``features.1`` ... ``features.17`` are inverted residual blocks, ``features.18`` the
    final 1x1 convolution block and ``classifier.1`` the linear layer (``classifier.0`` is
    dropout). At width 1.0 it has 52 convolutions (17 of them depthwise) and one linear
    layer.

    Parameters
    ----------
    num_classes
        Number of outputs.
    width_mult
        Channel multiplier.
    dropout
        Dropout probability before the classifier.
    """

    SETTINGS = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2
    ) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_act(3, cin, stride=2)]
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_act(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes)
        )
        torchvision_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)
