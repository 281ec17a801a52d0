"""Put graph idioms into the forms the pattern table matches.

The ONNX frontend imports ``Clip`` with constant bounds as two opaque TIR calls
(``maximum`` then ``minimum``, each bound guarded against NaN). Quantized models clip an
activation to its code range right before ``QuantizeLinear``, so ``clips_from_min_max``
turns such pairs back into ``R.clip(x, lo, hi)``, which the patterns see and LegalizeOps
lowers as before.

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
            dtype = str(binding.var.ty.dtype)
            if lo is not None and hi is not None and dtype.startswith("float"):
                x = self.visit_expr(lower[0])
                clipped = relax.op.clip(x, lo, hi)
                self.set_var_remap(binding.var, _emit_like(self.builder_, binding.var, clipped))
                return
        super().visit_var_binding_(binding)


def _emit_like(builder, var, expr):
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
    """Rewrite ``minimum(maximum(x, lo), hi)`` TIR call pairs with constant bounds to ``clip``."""
    return _rewrite_functions(mod, lambda mod, bindings, fn: _ClipRewriter(mod, bindings))


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


def _op_name(expr) -> str | None:
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

    _CHAIN = ("relax.dequantize", "relax.quantize", "relax.clip")

    def __init__(self, mod, bindings, readers):
        super().__init__(mod)
        self.bindings = bindings
        self.shared = {
            var
            for var, value in bindings.items()
            if _op_name(value) == "relax.dequantize" and readers.get(var, 0) > 1
        }

    def _copy(self, var, depth: int = 0):
        """A fresh binding computing ``var`` (and the rest of its chain)."""
        value = self.bindings.get(var)
        if depth >= len(self._CHAIN) or _op_name(value) != self._CHAIN[depth]:
            return self.visit_expr(var)
        first = value.args[0]
        source = self._copy(first, depth + 1) if isinstance(first, relax.Var) else first
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
        self.set_var_remap(binding.var, _emit_like(self.builder_, binding.var, call))

    def _reads_shared(self, arg) -> bool:
        if isinstance(arg, relax.Tuple):
            return any(self._reads_shared(f) for f in arg.fields)
        return isinstance(arg, relax.Var) and arg in self.shared


def dedicated_qdq_pairs(mod: tvm.IRModule) -> tvm.IRModule:
    """Give each reader of a shared ``dequantize`` its own quantize/dequantize chain."""
    return _rewrite_functions(
        mod, lambda mod, bindings, fn: _PairCopier(mod, bindings, _readers(fn))
    )
