"""ResNets: CIFAR ResNet-20 and ImageNet ResNet-18, with torchvision's module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tvm_cim.core.errors import CimError
from tvm_cim.learn.zoo.initialization import torchvision_init

__all__ = ["BasicBlock", "ZeroPadShortcut", "ResNet20", "ResNet18"]


def _same_conv(
    cin: int, cout: int, stride: int | tuple[int, int] = 1, kernel_size: int | tuple = 3
) -> nn.Conv2d:
    """A convolution without bias whose padding keeps the size at stride 1 (odd kernels)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=(kh // 2, kw // 2), bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with batch norm and a shortcut.

    Parameters
    ----------
    cin, cout
        Input and output channels.
    stride
        Stride of ``conv1`` (and of the shortcut).
    downsample
        Shortcut applied to the input, or ``None`` for the identity.
    kernel_size
        Kernel of both convolutions, e.g. ``(1, 3)`` for signals of height 1.
    """

    expansion = 1

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int | tuple[int, int] = 1,
        downsample: nn.Module | None = None,
        kernel_size: int | tuple[int, int] = 3,
    ) -> None:
        super().__init__()
        self.conv1 = _same_conv(cin, cout, stride, kernel_size)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _same_conv(cout, cout, kernel_size=kernel_size)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut (He et al.'s option A): subsample, zero-pad the channels.

    Parameters
    ----------
    cin, cout
        Input and output channels (``cout >= cin``).
    stride
        Spatial subsampling factor.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (cout - cin) // 2
        self.pad_after = cout - cin - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _ResNet(nn.Module):
    """Stages of basic blocks; ``inplanes`` is the channel count the next stage starts from
    and ``kernel_size`` the kernel of the blocks' convolutions."""

    inplanes: int
    kernel_size: int | tuple[int, int] = 3

    def _shortcut(self, planes: int, stride: int | tuple[int, int]) -> nn.Module:
        """Shortcut of a block that changes shape: a 1x1 convolution with batch norm."""
        return nn.Sequential(
            nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )

    def _make_layer(self, planes: int, blocks: int, stride: int | tuple[int, int]) -> nn.Sequential:
        downsample = None
        if stride not in (1, (1, 1)) or self.inplanes != planes:
            downsample = self._shortcut(planes, stride)
        k = self.kernel_size
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, kernel_size=k)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, kernel_size=k) for _ in range(1, blocks)]
        return nn.Sequential(*layers)


def _init_resnet(model: nn.Module, zero_init_residual: bool = False) -> None:
    torchvision_init(model, linear_std=None)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


class ResNet20(_ResNet):
    """CIFAR ResNet-20: a 3x3 stem and three stages of three basic blocks (16/32/64).

    Layers: ``conv1``/``bn1``, ``layer{1,2,3}.{0,1,2}.conv{1,2}``/``bn{1,2}`` and ``fc``.
    Stages 2 and 3 start with stride 2. The shortcuts that change shape are parameter-free
    (option A) by default, so the model has 19 convolutions and one linear layer; with
    ``shortcut="B"`` they are 1x1 convolutions with batch norm (``layer2.0.downsample.0``).

    Parameters
    ----------
    num_classes
        Number of outputs.
    shortcut
        ``"A"`` (zero padding) or ``"B"`` (1x1 projection).
    """

    def __init__(self, num_classes: int = 10, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise CimError(f"resnet20: shortcut must be 'A' or 'B', got {shortcut!r}")
        self.shortcut = shortcut
        self.conv1 = _same_conv(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = 16
        self.layer1 = self._make_layer(16, 3, 1)
        self.layer2 = self._make_layer(32, 3, 2)
        self.layer3 = self._make_layer(64, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _init_resnet(self)

    def _shortcut(self, planes: int, stride: int) -> nn.Module:
        if self.shortcut == "A":
            return ZeroPadShortcut(self.inplanes, planes, stride)
        return super()._shortcut(planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class ResNet18(_ResNet):
    """ImageNet ResNet-18 with torchvision's layout and module names.

    Layers: ``conv1`` (7x7, stride 2), ``bn1``, ``maxpool``, ``layer{1..4}.{0,1}`` basic
    blocks (64/128/256/512 channels; ``layer{2,3,4}.0.downsample.{0,1}`` are 1x1
    convolutions with batch norm), ``avgpool`` and ``fc``: 20 convolutions and one linear
    layer.

    Parameters
    ----------
    num_classes
        Number of outputs.
    zero_init_residual
        Zero the last batch norm's scale in each block, as torchvision can.
    """

    def __init__(self, num_classes: int = 1000, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)
        _init_resnet(self, zero_init_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
