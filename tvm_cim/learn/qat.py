"""Mixed-precision quantization-aware training in PyTorch, per operator.

``prepare(model)`` replaces every ``nn.Conv2d`` (depthwise and grouped ones included: the
crossbars run them by group sets) and every ``nn.Linear`` by a quantized twin at the same
module path, so precision configs name layers by their usual paths
(``layer1.0.conv1``, ``features.0``, ``classifier.6``).

Each quantized layer fake-quantizes its input activation to ``a_bits`` and its weight to
``w_bits``:

* weights: symmetric per output channel, scale ``max|w| / (2**(w_bits-1) - 1)`` recomputed
  every step (``tvm_cim.core.quant.weight_scales``, the compiler's own function), codes
  ``-qmax..qmax``;
* activations: a calibrated scale (``tvm_cim.core.quant.activation_scale``), from the
  running maximum of ``|x|`` seen in training mode (exponential moving average, momentum
  0.9), frozen in eval mode; unsigned codes when every calibration input was non-negative
  (after a ReLU), signed otherwise;
* biases: rounded to the accumulator's grid (input scale times weight scale), as the
  crossbars add them to the integer accumulator;
* rounding half to even and clamping exactly as ``tvm_cim.core.quant.quantize`` (division in
  float32), with straight-through gradients inside the clamping range.

Matmuls of two activations (``tvm_cim.learn.zoo.attention.ActivationMatmul``, attention's
``q @ kᵀ`` and ``a @ v``) become ``QuantActivationMatmul`` at the same path: the operand
stored in the crossbar is fake-quantized to the policy's ``w_bits``, the driven one to its
``a_bits``, each as an activation (its own calibrated scale, signedness from calibration,
zero point 0).

``export_onnx`` writes the trained model as a QDQ ONNX graph whose integer semantics are
those of the fake quantization: ``Clip`` to the code range, ``QuantizeLinear`` /
``DequantizeLinear`` for activations, int8 weight codes with per-channel scales through
``DequantizeLinear``, both operands of an activation matmul as activations before its
``MatMul``; the Conv/Gemm/MatMul nodes carry the layer paths as names
(``tvm_cim.learn.onnx_export``, shared with the model zoo's float export). ``tvm-cim
compile`` takes it with no further flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import W8A8, Bits, Precision
from tvm_cim.core.quant import (
    activation_scale,
    quant_range,
    quantize,
    weight_qmax,
    weight_scales,
)
from tvm_cim.learn.onnx_export import write_onnx
from tvm_cim.learn.zoo.attention import ActivationMatmul
from tvm_cim.learn.zoo.layers import quantizable_layers

ACT_MOMENTUM = 0.9


class _RoundSTE(torch.autograd.Function):
    """Round half to even forward, identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with a straight-through gradient."""
    codes = _RoundSTE.apply(x / scale)
    return torch.clamp(codes, qmin, qmax) * scale


def weight_fake_quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel fake quantization; returns ``(weight_q, scale)``."""
    qmax = weight_qmax(bits)
    scale = weight_scales(weight.detach(), bits, axis=0)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return fake_quantize(weight, scale.reshape(shape), -qmax, qmax), scale


class _ActivationObserver:
    """Calibrated fake quantization of one activation tensor, to ``act_bits``-wide codes.

    The module keeps the running maximum of ``|x|`` (``act_absmax``, exponential moving
    average over training-mode calls) and the smallest value seen (``act_min``, which
    makes the codes signed once it is negative) as buffers; eval mode freezes them.
    """

    @property
    def act_bits(self) -> int:
        raise NotImplementedError

    def _init_observer(self) -> None:
        self.register_buffer("act_absmax", torch.zeros(()))
        self.register_buffer("act_min", torch.full((), float("inf")))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.exporting = False

    def reset_observer(self) -> None:
        """Forget the calibration: the next call sets the scale afresh."""
        self.calibrated.fill_(False)
        self.act_min.fill_(float("inf"))

    @property
    def signed_input(self) -> bool:
        return bool(self.act_min < 0)

    def act_range(self) -> tuple[int, int]:
        return quant_range(self.act_bits, self.signed_input)

    def act_scale(self) -> torch.Tensor:
        return activation_scale(self.act_absmax, self.act_bits, self.signed_input)

    def _observe(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            absmax = x.detach().abs().max()
            if bool(self.calibrated):
                self.act_absmax.mul_(ACT_MOMENTUM).add_((1 - ACT_MOMENTUM) * absmax)
            else:
                self.act_absmax.copy_(absmax)
                self.calibrated.fill_(True)
            self.act_min.copy_(torch.minimum(self.act_min, x.detach().min()))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.exporting:  # scale and range frozen as Python numbers: graph constants
            return _export_activation(x, *self.export_activation)
        if self.training or not bool(self.calibrated):
            self._observe(x)
        qmin, qmax = self.act_range()
        return fake_quantize(x, self.act_scale(), qmin, qmax)


class _QuantMixin(_ActivationObserver):
    """State and behaviour shared by the quantized layers; the input takes ``a_bits``."""

    def _init_quant(self, bits: Bits):
        self.bits = bits
        self._init_observer()

    @property
    def act_bits(self) -> int:
        return self.bits.a_bits

    def quantized_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fake-quantized weight and bias; the bias on the accumulator's grid.

        The bias is rounded to multiples of ``input scale * weight scale``, the unit of
        the integer accumulator it is added to on the crossbars.
        """
        if self.exporting:  # codes and scales fixed before tracing: constants in the graph
            weight = torch.fake_quantize_per_channel_affine(
                self.export_weight, self.export_scale, self.export_zero_point, 0, -128, 127
            )
            return weight, getattr(self, "export_bias", None)
        weight, w_scale = weight_fake_quantize(self.weight, self.bits.w_bits)
        if self.bias is None:
            return weight, None
        step = self.act_scale().detach() * w_scale
        return weight, fake_quantize(self.bias, step, -(2**31), 2**31 - 1)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input, weight and bias."""

    def forward(self, x):
        x = self.quantize_input(x)
        return self._conv_forward(x, *self.quantized_params())


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input, weight and bias."""

    def forward(self, x):
        x = self.quantize_input(x)
        return F.linear(x, *self.quantized_params())


class ActivationQuantizer(_ActivationObserver, nn.Module):
    """Calibrated fake quantization of one operand of a ``QuantActivationMatmul``.

    Parameters
    ----------
    bits
        Code width (``act_bits``); the matmul sets it from its ``Bits``.
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self._init_observer()

    @property
    def act_bits(self) -> int:
        return self.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize_input(x)


class QuantActivationMatmul(ActivationMatmul):
    """``ActivationMatmul`` with both operands fake-quantized, each with its own scale.

    The driven operand (``driven``, the one fed bit-serially) takes ``a_bits``, the stored
    operand (``stored``, written into the crossbar at run time) ``w_bits``; both are
    activations, so both are calibrated like a layer's input (running maximum, signed
    codes once a negative value was seen, zero point 0).

    Parameters
    ----------
    bits
        The widths of the two operands.
    """

    def __init__(self, bits: Bits = W8A8) -> None:
        super().__init__()
        self.driven = ActivationQuantizer(bits.a_bits)
        self.stored = ActivationQuantizer(bits.w_bits)
        self.bits = bits

    @property
    def bits(self) -> Bits:
        return self._bits

    @bits.setter
    def bits(self, bits: Bits) -> None:
        self._bits = bits
        self.driven.bits = bits.a_bits
        self.stored.bits = bits.w_bits

    def forward(self, x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.driven(x), self.stored(stored))


#: Modules of a prepared model that carry a precision: quantized layers and matmuls.
_QUANTIZED = (_QuantMixin, QuantActivationMatmul)


def _export_activation(x, scale: float, qmin: int, qmax: int):
    """``Clip`` to the code range, then an 8-bit QDQ pair: ONNX export of ``fake_quantize``.

    Clipping at ``code * scale`` and then rounding gives the codes the narrow fake
    quantization gives, so the graph means the same in any ONNX runtime; tvm-cim reads
    the activation width back from the clip bounds.
    """
    x = torch.clamp(x, qmin * scale, qmax * scale)
    lo, hi = (-128, 127) if qmin < 0 else (0, 255)
    return torch.fake_quantize_per_tensor_affine(x, scale, 0, lo, hi)


def layer_names(model: nn.Module) -> list[str]:
    """Paths of the quantizable (or quantized) layers, in ``named_modules()`` order: every
    ``Conv2d`` (grouped ones included), ``Linear`` and ``ActivationMatmul``."""
    return quantizable_layers(model)


def _resolve(model: nn.Module, precision) -> dict[str, Bits]:
    names = layer_names(model)
    return {n: b or W8A8 for n, b in Precision.load(precision).resolve(names).items()}


def _quantized_twin(module: nn.Module, bits: Bits) -> nn.Module:
    """The quantized module that replaces ``module``, sharing its parameters."""
    if isinstance(module, ActivationMatmul):
        return QuantActivationMatmul(bits).train(module.training)
    cls = QuantConv2d if isinstance(module, nn.Conv2d) else QuantLinear
    quant = cls.__new__(cls)
    quant.__dict__.update(module.__dict__)
    quant._init_quant(bits)
    return quant


def prepare(model: nn.Module, precision=None) -> nn.Module:
    """Replace quantizable layers by quantized ones, in place; returns ``model``.

    ``Conv2d`` and ``Linear`` layers become ``QuantConv2d`` and ``QuantLinear``;
    ``ActivationMatmul`` modules (attention's ``q @ kᵀ`` and ``a @ v``) become
    ``QuantActivationMatmul``, whose stored operand takes ``w_bits`` and driven operand
    ``a_bits``. Layers that are already quantized keep their calibration and take the new
    bits, so preparing a prepared model sets its precision. ``precision`` is anything
    ``tvm_cim.core.precision.Precision.load`` reads, naming layers by module path;
    unspecified layers get W8A8. Weight bits must be at least 2.
    """
    bits = _resolve(model, precision)
    for name, b in bits.items():
        if b.w_bits < 2:
            raise CimError(f"{name}: symmetric weights need at least 2 bits, got w_bits=1")
    for name, module in list(model.named_modules()):
        if name not in bits or isinstance(module, _QUANTIZED):
            if isinstance(module, _QUANTIZED):
                module.bits = bits[name]
            continue
        _set_module(model, name, _quantized_twin(module, bits[name]))
    return model


def set_precision(model: nn.Module, precision) -> None:
    """Change the bit widths of a prepared model's layers (keeps the calibration)."""
    for name, b in _resolve(model, precision).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, _QUANTIZED):
            raise CimError(f"{name}: the model is not prepared for QAT; call prepare() first")
        if b.w_bits < 2:
            raise CimError(f"{name}: symmetric weights need at least 2 bits, got w_bits=1")
        layer.bits = b


def precision_of(model: nn.Module) -> dict[str, dict]:
    """``{layer: {w_bits, a_bits}}`` of a prepared model."""
    return {
        name: m.bits.to_dict() for name, m in model.named_modules() if isinstance(m, _QUANTIZED)
    }


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Reset and recompute every activation scale from ``batches`` (train-mode statistics)."""
    for m in model.modules():
        if isinstance(m, _ActivationObserver):
            m.reset_observer()
    was_training = model.training
    model.train()
    for x in batches:
        model(x)
    model.train(was_training)


@contextlib.contextmanager
def _frozen_for_export(model: nn.Module):
    """Eval mode with every quantized layer's codes, scales and ranges fixed as constants.

    Inside, quantized layers compute with ``torch.fake_quantize_per_*_affine`` on frozen
    buffers (``export_weight``, ``export_scale``, ``export_bias``) and Python-number
    activation scales (those of matmul operands too), which both ONNX export and
    ``torch.export`` trace into constants. Yields ``{path: layer}`` of the quantized layers
    and matmuls; restores the model on exit.
    """
    layers = {n: m for n, m in model.named_modules() if isinstance(m, _QUANTIZED)}
    if not layers:
        raise CimError("the model has no quantized layers; call tvm_cim.learn.qat.prepare() first")
    observers = {n: m for n, m in model.named_modules() if isinstance(m, _ActivationObserver)}
    uncalibrated = [n for n, m in observers.items() if not bool(m.calibrated)]
    if uncalibrated:
        raise CimError(
            f"{uncalibrated[0]}: no activation scale yet; run tvm_cim.learn.qat.calibrate() or "
            "train the model before exporting it"
        )
    was_training = model.training
    model.eval()
    weighted = [m for m in layers.values() if isinstance(m, _QuantMixin)]
    for m in weighted:
        with torch.no_grad():
            weight_q, bias_q = m.quantized_params()
            scale = weight_fake_quantize(m.weight, m.bits.w_bits)[1]
        # Registered buffers become initializers named after the layer's path.
        m.register_buffer("export_weight", weight_q)
        m.register_buffer("export_scale", scale)
        m.register_buffer("export_zero_point", torch.zeros(scale.numel(), dtype=torch.int32))
        if bias_q is not None:
            m.register_buffer("export_bias", bias_q)
    for m in observers.values():
        m.export_activation = (float(m.act_scale()), *m.act_range())
        m.exporting = True
    try:
        yield layers
    finally:
        for m in observers.values():
            m.exporting = False
            del m.export_activation
        for m in weighted:
            del m.export_weight, m.export_scale, m.export_zero_point
            if hasattr(m, "export_bias"):
                del m.export_bias
        model.train(was_training)


def export_onnx(model: nn.Module, path, example_input: torch.Tensor) -> Path:
    """Write the prepared model as a QDQ ONNX file; returns the path.

    Conv, Gemm and MatMul nodes of quantized layers and matmuls are named by their module
    paths, so precision configs and compile reports use the same names as training. Weight
    codes and scales stay apart (no constant folding): each weight is an int8 initializer
    read by a ``DequantizeLinear``.
    """
    with _frozen_for_export(model) as layers:
        return write_onnx(
            model,
            example_input,
            path,
            fold_constants=False,
            layers=set(layers),
            rewrite=_fold_weight_quantization,
        )


def export_program(model: nn.Module, example_input: torch.Tensor):
    """``torch.export`` of the prepared model, with the quantization as QDQ operators.

    The program carries ``fake_quantize_per_tensor_affine`` for activations (after a
    ``clamp`` to the code range) and ``fake_quantize_per_channel_affine`` for weights;
    ``tvm_cim.compiler.frontend.load_torch`` imports them as Relax ``quantize``/``dequantize``, the
    same graph the QDQ ONNX file imports as.
    """
    with _frozen_for_export(model):
        return torch.export.export(model, (example_input,))


def _fold_weight_quantization(model) -> None:
    """``QuantizeLinear(float weight)`` becomes an int8 initializer of the weight codes."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return numpy_helper.to_array(consts[name].attribute[0].t)

    dropped = set()  # outputs of the QuantizeLinear nodes that become initializers
    for node in g.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits:
            continue
        source = node.input[0]
        if not source.endswith(".export_weight"):
            continue
        layer = source[: -len(".export_weight")]
        scale = value(node.input[1]).astype(np.float32)
        w = numpy_helper.to_array(inits[source]).astype(np.float32)
        shape = (-1,) + (1,) * (w.ndim - 1)
        codes = quantize(w, scale.reshape(shape), 0, 8, True, dtype=np.int8)
        codes_name = f"{layer}.weight_codes"
        g.initializer.append(numpy_helper.from_array(codes, codes_name))
        dropped.add(node.output[0])
        for consumer in g.node:
            if consumer.op_type == "DequantizeLinear" and consumer.input[0] == node.output[0]:
                consumer.input[0] = codes_name
        g.initializer.remove(inits[source])
    keep = [n for n in g.node if n.output[0] not in dropped]
    del g.node[:]
    g.node.extend(keep)
