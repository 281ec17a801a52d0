"""Put graph idioms into the forms the pattern table matches.

The ONNX frontend imports ``Clip`` with constant bounds as two opaque TIR calls
(``maximum`` then ``minimum``, each float bound guarded against NaN). Quantized models clip
an activation to its code range right before ``QuantizeLinear``, and QCDQ exports
(Brevitas, qonnx) state a width below 8 bits as an integer ``Clip`` of the 8-bit codes,
weights and activations alike. ``clips_from_min_max`` turns such pairs back into
``R.clip(x, lo, hi)``, which the patterns see and LegalizeOps lowers as before.

A ``Flatten`` or ``Reshape`` between an activation's ``DequantizeLinear`` and the ``Gemm``
reading it hides the dequantize from the patterns (and so do the ``expand`` and ``view``
that ``torch.export`` puts between a batched ``matmul`` and its operands);
``reshapes_before_dequantize`` moves the reshape above the per-tensor
quantize/clip/dequantize chain, where it changes nothing.

Producers such as onnxruntime share one QuantizeLinear/DequantizeLinear pair among all
readers of a tensor (a convolution and the residual ``Add`` beside it). A pattern cannot
take a value another operator also reads, so ``dedicated_qdq_pairs`` gives every reader
its own copy of the pair, as onnxruntime's ``DedicatedQDQPair`` option would: the same
values, computed once per reader.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def _constant(expr, bindings):
    """The scalar value of a constant expression (through NaN guards), else None."""
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    if hasattr(expr, "value") and hasattr(expr.value, "numpy"):
        value = expr.value.numpy()
        return float(value) if value.size == 1 else None
    op = getattr(getattr(expr, "op", None), "name", None)
    if op == "relax.where":  # where(isnan(c), +-inf, c)
        return _constant(expr.args[2], bindings)
    return None


def _tir_call(expr, name: str):
    """``(data, bound)`` of ``call_tir(<name>*, (data, bound))``, else None."""
    if getattr(getattr(expr, "op", None), "name", None) != "relax.call_tir":
        return None
    callee, args = expr.args[0], expr.args[1]
    if not isinstance(callee, tvm.ir.GlobalVar) or not callee.name_hint.startswith(name):
        return None
    fields = getattr(args, "fields", None)
    if fields is None or len(fields) != 2:
        return None
    return fields[0], fields[1]


@relax.expr_functor.mutator
class _ClipRewriter(relax.PyExprMutator):
    def __init__(self, mod, bindings):
        super().__init__(mod)
        self.bindings = bindings

    def visit_var_binding_(self, binding):
        value = binding.value
        upper = _tir_call(value, "minimum")
        lower = upper and _tir_call(self.bindings.get(upper[0]), "maximum")
        if upper and lower:
            lo, hi = _constant(lower[1], self.bindings), _constant(upper[1], self.bindings)
            bounds = _clip_bounds_of(lo, hi, str(binding.var.ty.dtype))
            if bounds is not None:
                x = self.visit_expr(lower[0])
                clipped = relax.op.clip(x, *bounds)
                self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, clipped))
                return
        super().visit_var_binding_(binding)


def _clip_bounds_of(lo, hi, dtype: str):
    """``R.clip`` bounds of constant min/max bounds on a ``dtype`` tensor, else None.

    Float tensors keep float bounds; integer tensors get integer bounds, which is exact
    only when both bounds are whole numbers (TIR compared them in the tensor's dtype).
    """
    if lo is None or hi is None:
        return None
    if dtype.startswith("float"):
        return lo, hi
    if dtype.startswith(("int", "uint")) and float(lo).is_integer() and float(hi).is_integer():
        return int(lo), int(hi)
    return None


def emit_like(builder, var, expr):
    """Bind ``expr`` to a new variable of ``var``'s kind (dataflow or output) and name."""
    emit = builder.emit if isinstance(var, relax.DataflowVar) else builder.emit_output
    return emit(expr, var.name)


def _rewrite_functions(mod: tvm.IRModule, mutator) -> tvm.IRModule:
    """Each Relax function through ``mutator(mod, bindings, fn)``, then dead code removed."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function):
            bindings = {b.var: b.value for block in fn.body.blocks for b in block.bindings}
            out[gv] = mutator(mod, bindings, fn).visit_expr(fn)
    return relax.transform.DeadCodeElimination()(out)


def clips_from_min_max(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite ``minimum(maximum(x, lo), hi)`` TIR call pairs with constant bounds to
    ``clip``, on float tensors and on integer codes."""
    return _rewrite_functions(mod, lambda mod, bindings, fn: _ClipRewriter(mod, bindings))


#: Operators a reshape moves above: elementwise, with scalar parameters.
_RESHAPE_COMMUTES = ("relax.dequantize", "relax.clip", "relax.quantize")


def _per_tensor(call) -> bool:
    """A ``clip``, or a ``(de)quantize`` with one scale and one zero point."""
    if op_name(call) == "relax.clip":
        return True
    return all(
        len(getattr(arg.ty, "shape", None) or ()) == 0 or all(int(d) == 1 for d in arg.ty.shape)
        for arg in call.args[1:3]
    )


def _identity_broadcast(call) -> bool:
    """A ``broadcast_to`` of a tensor to its own shape, as ``torch.export`` writes the
    ``expand`` of a batched ``matmul``'s operands."""
    if op_name(call) != "relax.broadcast_to":
        return False
    shapes = [getattr(e.ty, "shape", None) for e in (call.args[0], call)]
    return None not in shapes and [int(d) for d in shapes[0]] == [int(d) for d in shapes[1]]


def _elementwise_chain(data, bindings) -> list:
    """The per-tensor dequantize/clip/quantize calls above ``data``, outermost first
    (through broadcasts that change nothing, which the moved reshape drops)."""
    chain = []
    while isinstance(data, relax.Var) and data in bindings:
        value = bindings[data]
        if not chain and _identity_broadcast(value):
            data = value.args[0]
            continue
        if op_name(value) not in _RESHAPE_COMMUTES or not _per_tensor(value):
            break
        chain.append(value)
        data = value.args[0]
    return chain


def _rebuild(call, data):
    """``call`` on new ``data``; a per-tensor (de)quantize drops its channel axis."""
    name = op_name(call)
    if name == "relax.clip":
        return relax.op.clip(data, call.args[1], call.args[2])
    make = relax.op.quantize if name == "relax.quantize" else relax.op.dequantize
    return make(data, call.args[1], call.args[2], axis=-1, out_dtype=str(call.attrs.out_dtype))


@relax.expr_functor.mutator
class _ReshapeMover(relax.PyExprMutator):
    """Moves a reshape of dequantized activations above their per-tensor
    quantize/clip/dequantize chain."""

    def __init__(self, mod, bindings):
        super().__init__(mod)
        self.bindings = bindings

    def visit_var_binding_(self, binding):
        value = binding.value
        chain = []
        if op_name(value) == "relax.reshape":
            chain = _elementwise_chain(value.args[0], self.bindings)
        source = chain[-1].args[0] if chain else None
        if not chain or op_name(chain[0]) != "relax.dequantize" or _constant_tensor(source):
            super().visit_var_binding_(binding)
            return
        out = self.builder_.emit(relax.op.reshape(self.visit_expr(source), value.args[1]))
        for call in reversed(chain[1:]):
            out = self.builder_.emit(_rebuild(call, out))
        moved = _rebuild(chain[0], out)
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, moved))


def _constant_tensor(expr) -> bool:
    """Constants (weights, biases) keep their own forms; only activations are moved."""
    return isinstance(expr, tvm.ir.Constant)


def reshapes_before_dequantize(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite ``reshape(dequantize(clip(quantize(x))))`` (each of quantize and clip
    optional, all per tensor) to ``dequantize(clip(quantize(reshape(x))))``.

    Exact: every moved operator works on each element alone with the same scalar
    parameters, so it commutes with a reshape. Flatten imports as this reshape, and the
    patterns then see the dequantize right before the matmul that reads it.
    """
    return _rewrite_functions(mod, lambda mod, bindings, fn: _ReshapeMover(mod, bindings))


def clip_bounds(call) -> tuple[float, float]:
    """``(lo, hi)`` of an ``R.clip`` call."""
    return tuple(float(np.float32(a.value)) for a in call.args[1:3])


def clipped_code_range(lo: float, hi: float, scale: float, zero_point: int, dtype: str):
    """``(bits, signed)`` when clipping to ``[lo, hi]`` then quantizing to ``dtype`` gives
    exactly the full range of ``bits``-wide codes, else None.

    Only then does a narrow code width reproduce the graph: ``quantize`` clamps to that
    range, which equals clipping at its bounds.
    """
    from tvm_cim.core.quant import quant_range, quantize

    signed = dtype == "int8"
    qlo, qhi = (int(v) for v in quantize(np.array([lo, hi]), scale, zero_point, 8, signed))
    for bits in range(1, 9):
        if (qlo, qhi) == quant_range(bits, signed):
            return bits, signed
    return None


def integer_code_range(lo: int, hi: int) -> tuple[int, bool, bool] | None:
    """``(bits, signed, narrow)`` when integer clip bounds ``[lo, hi]`` are the full range
    of ``bits``-wide codes, or their narrow range (signed ``[-(2**(b-1)-1), 2**(b-1)-1]``,
    unsigned ``[0, 2**b-2]``, 2 bits or more), else None."""
    from tvm_cim.core.quant import quant_range

    for bits in range(1, 9):
        for signed in (True, False):
            if (lo, hi) == quant_range(bits, signed):
                return bits, signed, False
            if bits >= 2 and (lo, hi) == quant_range(bits, signed, narrow=True):
                return bits, signed, True
    return None


#: Widths of weight codes the crossbars map.
WEIGHT_CLIP_BITS = range(2, 9)


def weight_clip_bits(lo: float, hi: float) -> int | None:
    """The width integer weight codes clipped to ``[lo, hi]`` state: a signed full or
    narrow code range of 2..8 bits; else None."""
    if not (float(lo).is_integer() and float(hi).is_integer()):
        return None
    found = integer_code_range(int(lo), int(hi))
    if found is None or not found[1] or found[0] not in WEIGHT_CLIP_BITS:
        return None
    return found[0]


def quantized_code_range(
    dtype: str, scale: float, zero_point: int, before=None, after=None
) -> tuple[int, bool] | None:
    """``(bits, signed)`` of the codes ``[clip(before) ->] quantize [-> clip(after)]``
    gives, when they are exactly the full range of ``bits``-wide codes, else None.

    ``before`` is a real-valued clip ahead of the quantize (see ``clipped_code_range``),
    ``after`` an integer clip of its codes. A narrow range is None: the crossbars' inputs
    and requantization clamp to full code ranges only, so a narrow one would not reproduce
    the graph.
    """
    if after is None:
        if before is None:
            return _DTYPE_CODES.get(dtype)
        return clipped_code_range(*before, scale, zero_point, dtype)
    from tvm_cim.core.quant import quant_range, quantize

    signed = dtype == "int8"
    lo, hi = quant_range(8, signed)
    if before is not None:
        qlo, qhi = (int(v) for v in quantize(np.array(before), scale, zero_point, 8, signed))
        lo, hi = max(lo, qlo), min(hi, qhi)
    if not (float(after[0]).is_integer() and float(after[1]).is_integer()):
        return None
    lo, hi = max(lo, int(after[0])), min(hi, int(after[1]))
    found = integer_code_range(lo, hi)
    if found is None or found[2]:
        return None
    return found[0], found[1]


#: The codes of an 8-bit dtype.
_DTYPE_CODES = {"int8": (8, True), "uint8": (8, False)}


def op_name(expr) -> str | None:
    """The name of the Relax operator ``expr`` calls, else None."""
    return getattr(getattr(expr, "op", None), "name", None)


def _readers(fn: relax.Function) -> dict:
    """How many times each variable is read by the bindings and the result of ``fn``."""
    counts: dict = {}

    def count(expr):
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                count(field)
        elif isinstance(expr, relax.Call):
            for arg in expr.args:
                count(arg)
        elif isinstance(expr, relax.TupleGetItem):
            count(expr.tuple_value)

    for block in fn.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(fn.body.body)
    return counts


@relax.expr_functor.mutator
class _PairCopier(relax.PyExprMutator):
    """Rebuilds every reader of a shared dequantize on its own [clip ->] quantize ->
    dequantize chain."""

    #: The chains a copy follows up from the dequantize: its codes' integer clip (QCDQ)
    #: is optional, and so is the real-valued clip before the quantize.
    _CHAINS = (
        ("relax.dequantize", "relax.clip", "relax.quantize", "relax.clip"),
        ("relax.dequantize", "relax.quantize", "relax.clip"),
    )

    def __init__(self, mod, bindings, readers):
        super().__init__(mod)
        self.bindings = bindings
        self.shared = {
            var
            for var, value in bindings.items()
            if op_name(value) == "relax.dequantize" and readers.get(var, 0) > 1
        }

    def _copy(self, var, path: tuple = ()):
        """A fresh binding computing ``var`` (and the rest of its chain)."""
        value = self.bindings.get(var)
        path = (*path, op_name(value))
        if not any(chain[: len(path)] == path for chain in self._CHAINS):
            return self.visit_expr(var)
        first = value.args[0]
        source = self._copy(first, path) if isinstance(first, relax.Var) else first
        call = relax.Call(value.op, [source, *value.args[1:]], value.attrs, value.ty_args)
        return self.builder_.emit(call)

    def _argument(self, arg):
        if isinstance(arg, relax.Var) and arg in self.shared:
            return self._copy(arg)
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([self._argument(field) for field in arg.fields])
        return self.visit_expr(arg)

    def visit_var_binding_(self, binding):
        value = binding.value
        if not isinstance(value, relax.Call) or binding.var in self.shared:
            super().visit_var_binding_(binding)
            return
        args = list(value.args)
        if not any(self._reads_shared(a) for a in args):
            super().visit_var_binding_(binding)
            return
        call = relax.Call(
            value.op, [self._argument(a) for a in args], value.attrs, value.ty_args, value.span
        )
        self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, call))

    def _reads_shared(self, arg) -> bool:
        if isinstance(arg, relax.Tuple):
            return any(self._reads_shared(f) for f in arg.fields)
        return isinstance(arg, relax.Var) and arg in self.shared


def dedicated_qdq_pairs(mod: tvm.IRModule) -> tvm.IRModule:
    """Give each reader of a shared ``dequantize`` its own quantize/dequantize chain."""
    return _rewrite_functions(
        mod, lambda mod, bindings, fn: _PairCopier(mod, bindings, _readers(fn))
    )
