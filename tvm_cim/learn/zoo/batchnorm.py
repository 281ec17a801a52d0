"""Folding batch norm into the convolution before it."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tvm_cim.core.errors import CimError

__all__ = ["fold_batchnorm"]

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
