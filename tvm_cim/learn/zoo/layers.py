"""Which layers of a model the crossbars can take: dense ``Conv2d`` and ``Linear`` layers,
and the matmuls of two activations (``ActivationMatmul``, attention's ``q @ kᵀ`` and
``a @ v``)."""

from __future__ import annotations

from torch import nn

from tvm_cim.learn.zoo.attention import ActivationMatmul

__all__ = ["quantizable_layers", "depthwise_layers"]


def quantizable_layers(model: nn.Module, *, include_depthwise: bool = True) -> list[str]:
    """``named_modules()`` paths of the model's ``Conv2d``, ``Linear`` and
    ``ActivationMatmul`` layers.

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
        if isinstance(module, (nn.Linear, ActivationMatmul))
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
