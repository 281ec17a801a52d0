"""Model zoo: small trainable models and standard architectures as ``torch.nn`` modules.

``build(name)`` returns a freshly initialised model; ``names()`` lists the known names and
``input_shape(name)`` the per-sample input shape (channels first, no batch dimension).

Layer names follow the usual PyTorch module paths (``named_modules()``), because precision
policies name layers by those paths: the ImageNet and CIFAR architectures use
torchvision's names (``conv1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``;
``features.0``, ``classifier.6``; ``features.1.conv.0.0``, ``classifier.1``) and are written
here by hand, so torchvision is not needed.

=============== =================== ================================================
name            input shape         model
=============== =================== ================================================
``digits-mlp``  ``(1, 8, 8)``       MLP 64-128-64-10 for scikit-learn's digits
``digits-cnn``  ``(1, 8, 8)``       two 3x3 convolutions, two linear layers
``mnist1d-cnn`` ``(1, 1, 40)``      three ``(1, k)`` convolutions with BN, a linear layer
``resnet20``    ``(3, 32, 32)``     CIFAR ResNet-20 (He et al., option A shortcuts)
``resnet18``    ``(3, 224, 224)``   ImageNet ResNet-18 (torchvision layout)
``vgg16``       ``(3, 224, 224)``   ImageNet VGG-16 (torchvision layout)
``mobilenetv2`` ``(3, 224, 224)``   ImageNet MobileNetV2 (torchvision layout)
=============== =================== ================================================

One-dimensional signals are handled as images of height 1: ``mnist1d-cnn`` takes
``(N, 1, 1, 40)`` inputs and its convolutions are ``nn.Conv2d`` with ``(1, k)`` kernels, so
its exported graph holds 2-D convolutions that the crossbar compiler maps like any other.
``tvm_cim.learn.data.load("mnist1d")`` yields samples of that same shape ``(1, 1, 40)``.

Importing this module imports PyTorch; ``import tvm_cim`` does not import this module.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tvm_cim.core.errors import CimError

__all__ = [
    "build",
    "names",
    "input_shape",
    "quantizable_layers",
    "depthwise_layers",
    "fold_batchnorm",
    "export_onnx",
    "DigitsMLP",
    "DigitsCNN",
    "Mnist1dCNN",
    "ResNet20",
    "ResNet18",
    "VGG16",
    "MobileNetV2",
]


# ------------------------------------------------------------------- small models


class DigitsMLP(nn.Module):
    """Multi-layer perceptron 64-128-64-10 for 8x8 digit images.

    Parameters
    ----------
    num_classes
        Number of outputs.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 128)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(128, 64)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digit images.

    ``conv1`` (1->16, 3x3, padding 1), ``conv2`` (16->32, 3x3, padding 1), 2x2 max pooling,
    ``dropout``, ``fc1`` (512->64) and ``fc2`` (64->classes), with ReLU after every layer
    but the last. Dropout only acts in training mode; exported graphs do not contain it.

    Parameters
    ----------
    num_classes
        Number of outputs.
    channels
        Output channels of ``conv1`` and ``conv2``.
    hidden
        Width of ``fc1``.
    dropout
        Dropout probability before ``fc1``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: tuple[int, int] = (16, 32),
        hidden: int = 64,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.conv1(x))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.dropout(self.flatten(x))))
        return self.fc2(x)


class Mnist1dCNN(nn.Module):
    """CNN for MNIST-1D signals laid out as ``(N, 1, 1, 40)`` images of height 1.

    ``conv1`` (1->32, kernel (1, 5)), ``conv2`` and ``conv3`` (32->32, kernel (1, 3),
    stride (1, 2)), each followed by batch norm (``bn1``..``bn3``) and ReLU, then ``fc``
    (32 * 10 -> classes). The convolutions are ``nn.Conv2d`` with kernels of height 1, so
    the exported graph holds 2-D convolutions.

    Parameters
    ----------
    num_classes
        Number of outputs.
    length
        Signal length (the input's width).
    channels
        Channels of the three convolutions.
    """

    def __init__(self, num_classes: int = 10, length: int = 40, channels: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv1 = nn.Conv2d(1, c, (1, 5), padding=(0, 2), bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c, c, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        width = ((length + 1) // 2 + 1) // 2
        self.fc = nn.Linear(c * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.flatten(x))


# ----------------------------------------------------------------------- ResNets


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


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
    """

    expansion = 1

    def __init__(
        self, cin: int, cout: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(cout, cout)
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


def _init_resnet(model: nn.Module, zero_init_residual: bool = False) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


class ResNet20(nn.Module):
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
        self.conv1 = _conv3x3(3, 16)
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

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            if self.shortcut == "A":
                downsample = ZeroPadShortcut(self.inplanes, planes, stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


class ResNet18(nn.Module):
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

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- VGG

_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M")
_VGG16_CFG = _VGG16_CFG + (512, 512, 512, "M")


class VGG16(nn.Module):
    """ImageNet VGG-16 (configuration D) with torchvision's layout and module names.

    ``features`` holds 13 3x3 convolutions (``features.0``, ``features.2``, ...,
    ``features.28`` without batch norm) with ReLU and five max pools; ``avgpool`` pools to
    7x7; ``classifier.0``, ``classifier.3`` and ``classifier.6`` are the three linear layers.

    Parameters
    ----------
    num_classes
        Number of outputs.
    batch_norm
        Insert batch norm after each convolution (torchvision's ``vgg16_bn`` layout).
    hidden
        Width of the two hidden linear layers (4096 in the original).
    dropout
        Dropout probability in the classifier.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        batch_norm: bool = False,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2))
                continue
            layers.append(nn.Conv2d(cin, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


# ------------------------------------------------------------------- MobileNetV2


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
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


# ---------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {
    "digits-mlp": _Entry(DigitsMLP, (1, 8, 8)),
    "digits-cnn": _Entry(DigitsCNN, (1, 8, 8)),
    "mnist1d-cnn": _Entry(Mnist1dCNN, (1, 1, 40)),
    "resnet20": _Entry(ResNet20, (3, 32, 32)),
    "resnet18": _Entry(ResNet18, (3, 224, 224)),
    "vgg16": _Entry(VGG16, (3, 224, 224)),
    "mobilenetv2": _Entry(MobileNetV2, (3, 224, 224)),
}


def names() -> list[str]:
    """Names of the models ``build`` knows, small models first.

    Returns
    -------
    list of str
        The model names.
    """
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise CimError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None


def input_shape(name: str) -> tuple[int, ...]:
    """Per-sample input shape of a model, channels first, without the batch dimension.

    Parameters
    ----------
    name
        A name from ``names()``.

    Returns
    -------
    tuple of int
        For example ``(1, 8, 8)``, ``(1, 1, 40)`` or ``(3, 224, 224)``.

    Raises
    ------
    CimError
        If the name is unknown.
    """
    return _entry(name).input_shape


def build(name: str, **kwargs) -> nn.Module:
    """Build a freshly initialised model.

    The model draws its initial weights from PyTorch's global generator (seed it with
    ``torch.manual_seed`` for reproducible weights). Its per-sample input shape is also
    stored as the attribute ``input_shape``, which ``export_onnx`` uses.

    Parameters
    ----------
    name
        A name from ``names()``.
    **kwargs
        Passed to the model's constructor, e.g. ``num_classes``.

    Returns
    -------
    torch.nn.Module
        The model, in training mode.

    Raises
    ------
    CimError
        If the name is unknown or the keyword arguments do not fit the model.
    """
    entry = _entry(name)
    try:
        model = entry.factory(**kwargs)
    except TypeError as exc:
        raise CimError(f"model {name!r}: {exc}") from None
    model.input_shape = entry.input_shape
    return model


# ------------------------------------------------------------------------ layers


def quantizable_layers(model: nn.Module, *, include_depthwise: bool = True) -> list[str]:
    """``named_modules()`` paths of the model's ``Conv2d`` and ``Linear`` layers.

    The order is ``named_modules()`` order, which indexes layers in CIM-AQ's policies.

    Parameters
    ----------
    model
        Any module.
    include_depthwise
        Keep grouped convolutions (``groups > 1``, e.g. depthwise); with ``False`` only
        dense layers are listed.

    Returns
    -------
    list of str
        The layer paths.
    """
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        or (isinstance(module, nn.Conv2d) and (include_depthwise or module.groups == 1))
    ]


def depthwise_layers(model: nn.Module) -> list[str]:
    """``named_modules()`` paths of the model's grouped ``Conv2d`` layers (``groups > 1``).

    Parameters
    ----------
    model
        Any module.

    Returns
    -------
    list of str
        The layer paths, a subset of ``quantizable_layers(model)`` in the same order.
    """
    return [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.Conv2d) and module.groups > 1
    ]


# --------------------------------------------------------------- batch-norm folding

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN_TYPES):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), _CONV_TYPES)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _conv_bn_pairs_siblings(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if isinstance(conv, _CONV_TYPES) and isinstance(bn, _BN_TYPES):
                join = f"{prefix}." if prefix else ""
                pairs.append((join + cname, join + bname))
    return pairs


def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise CimError("fold_batchnorm: batch norm without running statistics")
    if bn.num_features != conv.out_channels:
        raise CimError(
            f"fold_batchnorm: batch norm over {bn.num_features} channels follows a "
            f"convolution with {conv.out_channels} outputs"
        )
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        shift = -bn.running_mean.double() * scale
        if bn.affine:
            scale = scale * bn.weight.double()
            shift = shift * bn.weight.double() + bn.bias.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        dtype = conv.weight.dtype
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        conv.weight.copy_((conv.weight.double() * scale.reshape(shape)).to(dtype))
        new_bias = (bias * scale + shift).to(dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias)
        else:
            conv.bias.copy_(new_bias)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Eval-mode copy of a model with every batch norm folded into its convolution.

    A batch norm is folded when it reads the output of a convolution that feeds nothing
    else, and neither module is called anywhere else (found by tracing the model with
    ``torch.fx``; for a model that cannot be traced, a batch norm directly after a
    convolution among a module's children is folded). The
    convolution's weight and bias absorb the normalisation and the batch norm is replaced by
    ``nn.Identity``, so every module path stays valid. The input model is left unchanged.

    Parameters
    ----------
    model
        A model with convolutions followed by batch norm.

    Returns
    -------
    torch.nn.Module
        The folded copy, in eval mode.

    Raises
    ------
    CimError
        If a batch norm to fold has no running statistics or a channel count that does not
        match its convolution.
    """
    folded = copy.deepcopy(model).eval()
    try:
        pairs = _conv_bn_pairs_fx(folded)
    except Exception:
        pairs = _conv_bn_pairs_siblings(folded)
    for conv_path, bn_path in pairs:
        _fold_into(folded.get_submodule(conv_path), folded.get_submodule(bn_path))
        folded.set_submodule(bn_path, nn.Identity())
    return folded


# -------------------------------------------------------------------------- ONNX

_NAMED_OPS = ("Conv", "Gemm", "MatMul")

# Warnings of the TorchScript-based exporter that say nothing about the model at hand (its
# deprecation, and constant folding it leaves to ``_fold_constant_nodes``).
_EXPORTER_NOISE = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "Constant folding - Only steps=1",
)
_SUFFIX = re.compile(r"_\d+$")


def _module_path(node_name: str, modules: dict) -> str | None:
    """Module path behind a legacy-exporter node name, or ``None``.

    The exporter names a node by its module scopes, each scope by the module's path from
    its last non-numeric part on: ``/layer1/layer1.0/conv1/Conv`` is ``layer1.0.conv1`` and
    ``/features/features.1/conv/conv.0/conv.0.0/Conv`` is ``features.1.conv.0.0``.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    path = last = ""
    for part in parts:
        if last and part.startswith(last + "."):
            path = path[: len(path) - len(last)] + part
        else:
            path = f"{path}.{part}" if path else part
        last = part
    if path in modules:
        return path
    path = _SUFFIX.sub("", path)
    return path if path in modules else None


def _fold_constant_nodes(proto, max_elements: int = 4096) -> None:
    """Replace small nodes computed from ``Constant`` nodes alone by ``Constant`` nodes.

    The exporter leaves index arithmetic on constants in the graph (for example the pads of
    a ``Pad``), which importers then see as dynamic. Nodes reading initializers (weights)
    are left alone; unused ``Constant`` nodes are removed afterwards.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    opsets = {op.domain: op.version for op in proto.opset_import}
    values: dict = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: a for a in node.attribute}
            if set(attrs) == {"value"}:
                values[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
            nodes.append(node)
            continue
        inputs = [i for i in node.input if i]
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type.startswith("Random")
            or node.op_type == "Bernoulli"
            or not inputs
            or not all(i in values for i in inputs)
        ):
            nodes.append(node)
            continue
        try:
            outputs = ReferenceEvaluator(node, opsets=opsets).run(
                None, {i: values[i] for i in inputs}
            )
        except Exception:
            nodes.append(node)
            continue
        if any(getattr(o, "size", max_elements + 1) > max_elements for o in outputs):
            nodes.append(node)
            continue
        for k, (name, value) in enumerate(zip(node.output, outputs)):
            values[name] = value
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    name=f"{node.name}_folded_{k}" if node.name else "",
                    value=numpy_helper.from_array(value, name),
                )
            )
    used = {i for node in nodes for i in node.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)


def export_onnx(
    model: nn.Module, path: str | Path, input_shape: Sequence[int] | None = None
) -> Path:
    """Export a model to ONNX with its current weights, naming layers by module path.

    The model is traced in eval mode with a batch-1 random input named ``x`` (output
    ``y``) by PyTorch's TorchScript-based exporter at opset 17; batch norm after a
    convolution is folded into it by the exporter. Each ``Conv``, ``Gemm`` and ``MatMul``
    node produced by a module is then renamed to that module's ``named_modules()`` path
    (``layer1.0.conv1``, ``fc``), so precision configs written against the PyTorch model
    name the same layers in the ONNX file; a module that emits several such nodes gets
    ``_1``, ``_2`` suffixes on the later ones. Small computations on constants that the
    exporter leaves in the graph (such as the pads of a ``Pad``) are folded into constants.

    Parameters
    ----------
    model
        The model; the training mode of each of its modules is restored afterwards.
    path
        The ``.onnx`` file to write.
    input_shape
        Per-sample input shape; defaults to the model's ``input_shape`` attribute (set by
        ``build``).

    Returns
    -------
    pathlib.Path
        The written file.

    Raises
    ------
    CimError
        If no input shape is given or known.
    """
    import onnx

    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise CimError("export_onnx: pass input_shape (the model has no input_shape attribute)")
    path = Path(path)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *(int(d) for d in input_shape)), generator=gen)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with warnings.catch_warnings():
            for message in _EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=message)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=["x"],
                output_names=["y"],
                opset_version=17,
                dynamo=False,
                do_constant_folding=True,
            )
    finally:
        for module, mode in modes:
            module.training = mode

    proto = onnx.load(str(path))
    _fold_constant_nodes(proto)
    modules = dict(model.named_modules())
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in _NAMED_OPS:
            continue
        module_path = _module_path(node.name, modules)
        if module_path is None:
            continue
        count = seen.get(module_path, 0)
        seen[module_path] = count + 1
        node.name = module_path if count == 0 else f"{module_path}_{count}"
    onnx.save(proto, str(path))
    return path
