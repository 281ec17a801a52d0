"""A deep residual network for MNIST-1D signals laid out as images of height 1."""

from __future__ import annotations

import torch
from torch import nn

from tvm_cim.core.errors import CimError
from tvm_cim.learn.zoo.resnet import _init_resnet, _ResNet, _same_conv

__all__ = ["Mnist1dResNet"]

#: Subsampling of a stage that halves the signal: the height of 1 stays 1.
_HALVE = (1, 2)


class Mnist1dResNet(_ResNet):
    """1-D ResNet for MNIST-1D signals of shape ``(N, 1, 1, length)``.

    A stem ``conv1`` (1->16, kernel (1, 5)) with ``bn1``, three stages ``layer{1,2,3}`` of
    ``blocks`` basic blocks (16/32/64 channels, kernels (1, 3); stages 2 and 3 start with
    stride (1, 2) and a 1x1 projection shortcut ``layer{2,3}.0.downsample.0`` with batch
    norm, the other blocks add their input unchanged), global average pooling and ``fc``.
    With the default three blocks per stage it has 21 convolutions and one linear layer
    (22 crossbar layers) and 93,946 parameters; the names follow ``resnet20``'s.

    Parameters
    ----------
    num_classes
        Number of outputs.
    channels
        Channels of the three stages (the stem has the first stage's).
    blocks
        Basic blocks per stage.
    zero_init_residual
        Zero the last batch norm's scale in each block, so blocks start as identities.
    """

    kernel_size = (1, 3)

    def __init__(
        self,
        num_classes: int = 10,
        channels: tuple[int, int, int] = (16, 32, 64),
        blocks: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != 3 or blocks < 1:
            raise CimError(
                f"mnist1d-resnet: need three stage widths and blocks >= 1, got "
                f"channels={channels!r}, blocks={blocks!r}"
            )
        c1, c2, c3 = channels
        self.conv1 = _same_conv(1, c1, kernel_size=(1, 5))
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = c1
        self.layer1 = self._make_layer(c1, blocks, 1)
        self.layer2 = self._make_layer(c2, blocks, _HALVE)
        self.layer3 = self._make_layer(c3, blocks, _HALVE)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, num_classes)
        _init_resnet(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))
