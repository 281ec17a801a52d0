"""Put graph idioms into the forms the pattern table matches.

The ONNX frontend imports ``Clip`` with constant bounds as two opaque TIR calls
(``maximum`` then ``minimum``, each bound guarded against NaN). Quantized models clip an
activation to its code range right before ``QuantizeLinear``, so this pass turns such
pairs back into ``R.clip(x, lo, hi)``, which the patterns see and LegalizeOps lowers as
before.
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
                emit = (
                    self.builder_.emit
                    if isinstance(binding.var, relax.DataflowVar)
                    else self.builder_.emit_output
                )
                self.set_var_remap(binding.var, emit(clipped, binding.var.name))
                return
        super().visit_var_binding_(binding)


def clips_from_min_max(mod: tvm.IRModule) -> tvm.IRModule:
    """Rewrite ``minimum(maximum(x, lo), hi)`` TIR call pairs with constant bounds to ``clip``."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if not isinstance(fn, relax.Function):
            continue
        bindings = {b.var: b.value for block in fn.body.blocks for b in block.bindings}
        out[gv] = _ClipRewriter(mod, bindings).visit_expr(fn)
    out = relax.transform.DeadCodeElimination()(out)
    return out


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
