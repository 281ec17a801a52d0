"""Read a partitioned ``cim`` function back into the operators the codegen lowers.

A function made by ``MergeCompositeFunctions`` binds its composite functions locally and
calls them in dataflow order. Each composite body is evaluated symbolically: constant
subexpressions (reshaped biases, transposed or dequantized weights) are computed with
numpy, the parameter is followed through ``dequantize``, ``astype`` and ``subtract``, and
the anchor ``matmul`` or ``conv2d`` with its bias, ReLU and ``quantize`` becomes one
``CimOp`` as the graph states it. A float model's operators still hold real weights;
``codegen.quantize`` completes them into integer form.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from tvm import relax

from tvm_cim.core.errors import CimError, InternalCompilerError, UnsupportedOperator

from ..codegen.layers import CimOp, Codes, ConvGeometry, Region, StoredOperand
from ..codegen.mapping import placeholder_weight
from .canonicalize import clip_bounds, clipped_code_range, quantized_code_range, weight_clip_bits
from .partition import anchor_names, operator_name

# ------------------------------------------------------------------ symbolic values


@dataclass
class _Dequantized:
    """``(codes - zero_point) * scale`` of a constant, with the channel axis of the scale."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    #: Bounds of the integer clip the codes passed through, which states their width.
    clip: tuple[float, float] | None = None

    def real(self) -> np.ndarray:
        shape = [1] * self.codes.ndim
        if self.scale.size > 1:
            shape[self.axis] = -1
        scale = self.scale.reshape(shape) if self.scale.size > 1 else self.scale
        zp = self.zero_point.reshape(shape) if self.zero_point.size > 1 else self.zero_point
        return ((self.codes.astype(np.float64) - zp) * scale).astype(np.float32)


@dataclass
class _Activation:
    """The composite's parameter, as codes once dequantized or cast."""

    source: tuple[str, int]
    shape: tuple[int, ...]
    dtype: str
    codes: Codes | None = None
    clip: tuple[float, float] | None = None


@dataclass
class _ClippedCodes:
    """Constant integer codes after an integer clip, with the clip's bounds."""

    codes: np.ndarray
    bounds: tuple[float, float]


@dataclass
class _Clipped:
    """An operator's result clipped before its ``quantize``."""

    op: CimOp
    bounds: tuple[float, float]


def _shape(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def _bits_of(dtype: str) -> tuple[int, bool]:
    return {"int8": (8, True), "uint8": (8, False)}.get(dtype, (0, False))


def _scalar(value, what: str, op: str) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise CimError(f"{op}: {what} must be a single value, got shape {arr.shape}")
    return arr.reshape(()).item()


class _CompositeReader:
    def __init__(self, fn: relax.Function, sources: list, name: str):
        self.fn = fn
        self.name = name
        self.env: dict = {}
        for param, src in zip(fn.params, sources):
            self.env[param] = _Activation(src, _shape(param), str(param.ty.dtype))
        self.op: CimOp | None = None
        #: ``(dtype, real clip before it or None)`` of each ``quantize`` in the composite.
        self.quantized: dict = {}

    def read(self) -> CimOp:
        for block in self.fn.body.blocks:
            for binding in block.bindings:
                self.env[binding.var] = self.visit(binding.value, binding.var)
        if self.op is None:
            raise CimError(f"{self.name}: no dense or convolution operator in the region")
        return self.op

    def value(self, expr):
        if isinstance(expr, relax.Var):
            return self.env[expr]
        if isinstance(expr, relax.ShapeExpr):
            return tuple(int(v) for v in expr.values)
        if hasattr(expr, "value") and hasattr(expr.value, "numpy"):
            return expr.value.numpy()
        if isinstance(getattr(expr, "value", None), (int, float)):  # clip bounds
            return expr.value
        raise CimError(f"{self.name}: cannot read {type(expr).__name__} in a cim region")

    def visit(self, call, var):
        name = call.op.name
        args = [self.value(a) for a in call.args]
        handler = getattr(self, "op_" + name.split(".")[-1], None)
        if handler is None:
            raise CimError(f"{self.name}: unexpected operator {name} in a cim region")
        return handler(call, args, var)

    # constant folding and activation tracking
    def op_reshape(self, call, args, var):
        data, shape = args
        if isinstance(data, _ClippedCodes):
            data = data.codes
        if isinstance(data, _Dequantized):
            data = data.real()
        if not isinstance(data, np.ndarray):
            raise CimError(f"{self.name}: reshape of a non-constant in a cim region")
        return data.reshape(shape)

    def op_permute_dims(self, call, args, var):
        (data,) = args
        axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
        if isinstance(data, _Dequantized):
            axes = axes or list(range(data.codes.ndim))[::-1]
            return replace(data, codes=np.transpose(data.codes, axes), axis=axes.index(data.axis))
        return np.transpose(data, axes)

    def op_astype(self, call, args, var):
        (data,) = args
        dtype = str(call.attrs.dtype)
        if isinstance(data, np.ndarray):
            return data.astype(dtype)
        bits, signed = _bits_of(data.dtype)
        return _Activation(data.source, data.shape, dtype, Codes(bits, signed, None, 0))

    def op_subtract(self, call, args, var):
        a, b = args
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return a.astype(np.int64) - b.astype(np.int64)
        if isinstance(a, _Activation) and isinstance(b, np.ndarray) and a.codes is not None:
            zp = int(_scalar(b, "activation zero point", self.name))
            return _Activation(
                a.source, a.shape, a.dtype, Codes(a.codes.bits, a.codes.signed, None, zp)
            )
        raise CimError(f"{self.name}: unsupported subtract in a cim region")

    def op_dequantize(self, call, args, var):
        data, scale, zp = args
        axis = int(call.attrs.axis)
        bounds = None
        if isinstance(data, _ClippedCodes):
            data, bounds = data.codes, data.bounds
        if isinstance(data, np.ndarray):
            axis = axis % data.ndim
            return _Dequantized(
                data.astype(np.int64), np.asarray(scale, np.float32), np.asarray(zp), axis, bounds
            )
        bits, signed = _bits_of(data.dtype)
        if data.codes is not None:  # quantized inside this region: keep its code width
            bits, signed = data.codes.bits, data.codes.signed
        codes = Codes(
            bits,
            signed,
            float(_scalar(scale, "activation scale", self.name)),
            int(_scalar(zp, "activation zero point", self.name)),
        )
        return _Activation(data.source, data.shape, data.dtype, codes)

    # the operator itself
    def op_matmul(self, call, args, var):
        if isinstance(args[1], _Activation):
            return self._act_anchor(call, args, var)
        return self._stated_width(self._anchor(call, args, var, "dense"), args[1])

    def _act_anchor(self, call, args, var):
        """An activation-activation matmul: its second operand is the stored one."""
        x, stored = (self._as_codes(a) for a in args)
        self.op = CimOp(
            name=operator_name(call) or var.name,
            kind="matmul",
            source=x.source,
            weight=placeholder_weight(*stored.shape[-2:]),
            in_shape=x.shape,
            out_shape=_shape(call),
            input=x.codes,
            w_bits=None if stored.codes is None else stored.codes.bits,
            stored=StoredOperand(stored.source, stored.shape, stored.codes),
        )
        return self.op

    @staticmethod
    def _as_codes(x: _Activation) -> _Activation:
        """Integer codes used as they are get their dtype's width."""
        if x.codes is None and _bits_of(x.dtype)[0]:
            return _Activation(x.source, x.shape, x.dtype, Codes(*_bits_of(x.dtype), None, 0))
        return x

    def op_conv2d(self, call, args, var):
        return self._stated_width(self._anchor(call, args, var, "conv2d"), args[1])

    def _stated_width(self, op: CimOp, w) -> CimOp:
        """``op`` with the weight width an integer clip of its codes states."""
        if isinstance(w, _Dequantized) and w.clip is not None:
            op.w_bits = weight_clip_bits(*w.clip)
            if op.w_bits is None:
                lo, hi = w.clip
                raise CimError(
                    f"{op.name}: its weight codes pass through an integer clip "
                    f"[{lo:g}, {hi:g}] that is not a signed code range of 2..8 bits"
                )
        return op

    def _anchor(self, call, args, var, kind):
        x, w = args
        x = self._as_codes(x)
        name = operator_name(call) or var.name
        groups = int(call.attrs.groups) if kind == "conv2d" else 1
        weight, scale = _weight_matrix(w, kind, name, groups)
        self.op = CimOp(
            name=name,
            kind=kind,
            source=x.source,
            weight=weight,
            weight_scale=scale,
            in_shape=x.shape,
            out_shape=_shape(call),
            input=x.codes,
            conv=_geometry(call, x.shape, w) if kind == "conv2d" else None,
        )
        return self.op

    def op_add(self, call, args, var):
        op = args[0] if isinstance(args[0], CimOp) else args[1]
        bias = args[1] if op is args[0] else args[0]
        if isinstance(bias, _Dequantized):
            bias = bias.real()
        n = op.out_shape[1] if op.kind == "conv2d" else op.out_shape[-1]
        bias = np.asarray(bias, dtype=np.float32)
        if bias.size == 1:
            bias = np.full(n, bias.reshape(()).item(), np.float32)
        elif bias.size == n:
            # [N], [1, N] or [1, N, 1, 1]: one value per output channel
            channel_axis = 1 if op.kind == "conv2d" else -1
            if bias.ndim > 1 and bias.shape[channel_axis] != n:
                raise CimError(f"{op.name}: bias of shape {bias.shape} is not per channel")
            bias = bias.reshape(n)
        else:
            raise CimError(f"{op.name}: bias of shape {bias.shape} is not per channel")
        op.real_bias = bias if op.real_bias is None else op.real_bias + bias
        return op

    def op_clip(self, call, args, var):
        value = args[0]
        bounds = clip_bounds(call)
        if isinstance(value, np.ndarray):  # constant codes: the clip states their width
            return _ClippedCodes(np.clip(value, *bounds).astype(value.dtype), bounds)
        if call.args[0] in self.quantized and isinstance(value, _Activation):
            return replace(value, codes=self._clipped_codes(call, value.codes, bounds))
        if call.args[0] in self.quantized:  # the codes of the operator's own quantize
            value.output = self._clipped_codes(call, value.output, bounds)
            return value
        if isinstance(value, _Activation):
            return replace(value, clip=bounds)
        return _Clipped(value, bounds)

    def _clipped_codes(self, call, codes: Codes, bounds) -> Codes:
        """``codes`` (of a ``quantize`` in this region) after an integer clip."""
        dtype, before = self.quantized[call.args[0]]
        found = quantized_code_range(dtype, codes.scale, codes.zero_point, before, bounds)
        if found is None:  # the pattern check made sure it cuts at a code range
            raise CimError(f"{self.name}: codes clipped to {bounds} are not a full code range")
        return replace(codes, bits=found[0], signed=found[1])

    def op_relu(self, call, args, var):
        (op,) = args
        op.relu = True
        return op

    def op_quantize(self, call, args, var):
        value, scale, zp = args
        dtype = str(call.attrs.out_dtype)
        scale = float(_scalar(scale, "quantization scale", self.name))
        zp = int(_scalar(zp, "quantization zero point", self.name))
        bits, signed = _bits_of(dtype)
        clip = None
        if isinstance(value, _Clipped):
            value, clip = value.op, value.bounds
        elif isinstance(value, _Activation):
            clip = value.clip
        if clip is not None:  # the pattern check made sure it cuts at a code range
            bits, signed = clipped_code_range(*clip, scale, zp, dtype)
        self.quantized[var] = (dtype, clip)
        codes = Codes(bits, signed, scale, zp)
        if isinstance(value, _Activation):  # quantized on the host from real values
            return _Activation(value.source, value.shape, dtype, codes)
        value.output = codes
        return value


def _weight_matrix(
    w, kind: str, name: str, groups: int = 1
) -> tuple[np.ndarray, np.ndarray | None]:
    """``([K, N] weight, [N] scale or None)`` of a constant or dequantized weight."""
    if not isinstance(w, _Dequantized):
        return _as_matrix(w, kind, groups), None
    out_axis = 0 if kind == "conv2d" else 1
    if np.any(w.zero_point != 0):
        raise CimError(f"{name}: weights with a nonzero zero point are not supported")
    if w.scale.size > 1 and w.axis != out_axis:
        raise CimError(f"{name}: weight scales must be per output channel")
    n = w.codes.shape[out_axis]
    scale = np.broadcast_to(w.scale.reshape(-1), (n,)).astype(np.float32)
    return _as_matrix(w.codes, kind, groups), scale


def _geometry(call: relax.Call, in_shape: tuple[int, ...], weight) -> ConvGeometry:
    """The window of a ``conv2d`` call on an NCHW input with an OIHW ``weight``."""
    a = call.attrs
    _, c, h, width = in_shape
    kh, kw = (weight.codes if isinstance(weight, _Dequantized) else weight).shape[2:]
    return ConvGeometry(
        channels=c,
        height=h,
        width=width,
        kernel=(kh, kw),
        strides=tuple(int(s) for s in a.strides),
        padding=tuple(int(p) for p in a.padding),
        dilation=tuple(int(d) for d in a.dilation),
        groups=int(a.groups),
    )


def _as_matrix(weight: np.ndarray, kind: str, groups: int = 1) -> np.ndarray:
    """Dense weights stay ``[K, N]``; OIHW convolution weights become ``[KH*KW*C, O]``.

    A grouped weight (``[O, C/groups, KH, KW]``) becomes the block-diagonal matrix of all
    ``C`` channels: zero where an output's group does not read the channel.
    """
    if kind == "dense":
        return np.ascontiguousarray(weight)
    o, cg, kh, kw = weight.shape
    taps = np.transpose(weight, (2, 3, 1, 0))  # KH, KW, C/groups, O
    if groups == 1:
        return np.ascontiguousarray(taps.reshape(-1, o))
    og = o // groups
    full = np.zeros((kh, kw, groups, cg, groups, og), dtype=weight.dtype)
    blocks = taps.reshape(kh, kw, cg, groups, og)
    for g in range(groups):
        full[:, :, g, :, g, :] = blocks[:, :, :, g, :]
    return full.reshape(kh * kw * groups * cg, o)


def _read_composite(fn: relax.Function, sources: list, region: str) -> CimOp:
    """One composite's operator; a failure names the operators of the composite."""
    try:
        return _CompositeReader(fn, sources, region).read()
    except CimError as exc:
        raise UnsupportedOperator(str(exc), anchor_names(fn)) from exc
    except Exception as exc:
        raise InternalCompilerError(exc, "reading", anchor_names(fn)) from exc


def read_region(name: str, fn: relax.Function, images: int | None = None) -> Region:
    """The operators of a ``Codegen="cim"`` function as the graph states them, in dataflow
    order; ``images`` is the graph's batch (``CimOp.images``), if known."""
    region = Region(name, [(_shape(p), str(p.ty.dtype)) for p in fn.params])
    env: dict = {p: ("param", i) for i, p in enumerate(fn.params)}
    local_fns: dict = {}
    for block in fn.body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Function):
                local_fns[binding.var] = value
                continue
            if isinstance(value, relax.Call) and value.op in local_fns:
                sources = [env[a] for a in value.args]
                op = _read_composite(local_fns[value.op], sources, name)
                op.images = images
                if op.stored is not None and "op" in (op.source[0], op.stored.source[0]):
                    raise UnsupportedOperator(
                        f"{op.name}: an activation-activation matmul reading another crossbar "
                        "operator's result in the same region is not mapped",
                        [op.name],
                    )
                region.ops.append(op)
                env[binding.var] = ("op", len(region.ops) - 1)
            elif isinstance(value, relax.Var):
                env[binding.var] = env[value]
            else:
                raise CimError(f"{name}: unexpected {type(value).__name__} binding in a region")
    for op in region.ops:  # codes a producer quantized here have the producer's width
        kind, index = op.source
        producer = region.ops[index] if kind == "op" else None
        if producer is not None and producer.output is not None and op.input is not None:
            op.input = replace(op.input, bits=producer.output.bits, signed=producer.output.signed)
    body = fn.body.body
    returned = body.fields if isinstance(body, relax.Tuple) else [body]
    for var in returned:
        kind, index = env[var]
        if kind != "op":
            raise CimError(f"{name}: a region returning its parameter is not supported")
        region.outputs.append(index)
    return region
