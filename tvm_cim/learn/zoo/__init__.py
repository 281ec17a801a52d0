"""Model zoo: small trainable models and standard architectures as ``torch.nn`` modules.

``build(name)`` returns a freshly initialised model; ``names()`` lists the known names and
``input_shape(name)`` the per-sample input shape (channels first, no batch dimension).

Layer names follow the usual PyTorch module paths (``named_modules()``), because precision
policies name layers by those paths: the ImageNet and CIFAR architectures use
torchvision's names (``conv1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``, ``fc``;
``features.0``, ``classifier.6``; ``features.1.conv.0.0``, ``classifier.1``;
``conv_proj``, ``encoder.layers.encoder_layer_0.mlp.0``, ``heads.head``) and are written
here by hand, so torchvision is not needed.

================== =================== ================================================
name               input shape         model
================== =================== ================================================
``digits-mlp``     ``(1, 8, 8)``       MLP 64-128-64-10 for scikit-learn's digits
``digits-cnn``     ``(1, 8, 8)``       two 3x3 convolutions, two linear layers
``mnist1d-cnn``    ``(1, 1, 40)``      three ``(1, k)`` convolutions with BN, a linear layer
``mnist1d-resnet`` ``(1, 1, 40)``      1-D ResNet: 21 ``(1, k)`` convolutions, a linear layer
``digits-vit``     ``(1, 8, 8)``       ViT for digits: 4x4 patches, 2 blocks of width 64
``resnet20``       ``(3, 32, 32)``     CIFAR ResNet-20 (He et al., option A shortcuts)
``resnet18``       ``(3, 224, 224)``   ImageNet ResNet-18 (torchvision layout)
``vgg16``          ``(3, 224, 224)``   ImageNet VGG-16 (torchvision layout)
``mobilenetv2``    ``(3, 224, 224)``   ImageNet MobileNetV2 (torchvision layout)
``vit-b32``        ``(3, 224, 224)``   ImageNet ViT-B/32 (torchvision layout)
``vit-b16``        ``(3, 224, 224)``   ImageNet ViT-B/16 (torchvision layout)
================== =================== ================================================

One-dimensional signals are handled as images of height 1: ``mnist1d-cnn`` and
``mnist1d-resnet`` take ``(N, 1, 1, 40)`` inputs and their convolutions are ``nn.Conv2d``
with ``(1, k)`` kernels, so their exported graphs hold 2-D convolutions that the crossbar
compiler maps like any other. ``mnist1d-resnet`` is the deep one: 22 crossbar layers in
three stages of residual blocks (identity shortcuts, and 1x1 projections where a stage
halves the signal), named as ``resnet20``'s (``layer2.0.downsample.0``).
``tvm_cim.learn.data.load("mnist1d")`` yields samples of that same shape ``(1, 1, 40)``.

The vision transformers write attention out with its two matmuls of activations as
``ActivationMatmul`` modules (``encoder.layers.encoder_layer_0.self_attention.qk`` for
``q @ kᵀ``, ``...self_attention.av`` for ``a @ v``), so policies name them like the linear
layers: per block ``self_attention.in_proj``, ``qk``, ``av``, ``out_proj``, ``mlp.0`` and
``mlp.3``, between ``conv_proj`` and ``heads.head`` (74 layers for ViT-B/32, CIM-AQ's order).
torchvision's state dicts load into them as they are.

The families live in ``small``, ``resnet``, ``resnet1d``, ``vgg``, ``mobilenet`` and ``vit``
(its attention in ``attention``); ``layers`` says which layers the crossbars take,
``batchnorm`` folds batch norm into convolutions, and ``export_onnx`` writes float graphs
through ``tvm_cim.learn.onnx_export``.

Importing this package imports PyTorch; ``import tvm_cim`` does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tvm_cim.core.errors import CimError
from tvm_cim.learn.onnx_export import write_onnx
from tvm_cim.learn.zoo.attention import ActivationMatmul, SelfAttention
from tvm_cim.learn.zoo.batchnorm import fold_batchnorm
from tvm_cim.learn.zoo.layers import depthwise_layers, quantizable_layers
from tvm_cim.learn.zoo.mobilenet import MobileNetV2
from tvm_cim.learn.zoo.resnet import ResNet18, ResNet20
from tvm_cim.learn.zoo.resnet1d import Mnist1dResNet
from tvm_cim.learn.zoo.small import DigitsCNN, DigitsMLP, Mnist1dCNN
from tvm_cim.learn.zoo.vgg import VGG16
from tvm_cim.learn.zoo.vit import DigitsViT, VisionTransformer, ViTB16, ViTB32

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
    "Mnist1dResNet",
    "ResNet20",
    "ResNet18",
    "VGG16",
    "MobileNetV2",
    "ActivationMatmul",
    "SelfAttention",
    "VisionTransformer",
    "DigitsViT",
    "ViTB32",
    "ViTB16",
]


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {
    "digits-mlp": _Entry(DigitsMLP, (1, 8, 8)),
    "digits-cnn": _Entry(DigitsCNN, (1, 8, 8)),
    "mnist1d-cnn": _Entry(Mnist1dCNN, (1, 1, 40)),
    "mnist1d-resnet": _Entry(Mnist1dResNet, (1, 1, 40)),
    "digits-vit": _Entry(DigitsViT, (1, 8, 8)),
    "resnet20": _Entry(ResNet20, (3, 32, 32)),
    "resnet18": _Entry(ResNet18, (3, 224, 224)),
    "vgg16": _Entry(VGG16, (3, 224, 224)),
    "mobilenetv2": _Entry(MobileNetV2, (3, 224, 224)),
    "vit-b32": _Entry(ViTB32, (3, 224, 224)),
    "vit-b16": _Entry(ViTB16, (3, 224, 224)),
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
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        raise CimError("export_onnx: pass input_shape (the model has no input_shape attribute)")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *(int(d) for d in input_shape)), generator=gen)
    return write_onnx(model, x, path, fold_constants=True)
