"""Why a dense or convolution operator stayed on the CPU, in words for reports.

The shared hardware limits are the pattern table's own (``patterns.anchor_reason``), so a
report names the check that kept the operator off the crossbars.
"""

from __future__ import annotations

from tvm import relax

from .patterns import CODE_DTYPES, FLOAT_DTYPES, anchor_reason, shape_reason

#: Operand dtypes some pattern form takes (the integer forms accumulate in int32).
_FORM_DTYPES = {*FLOAT_DTYPES, *CODE_DTYPES, "int32"}


def _is_constant(expr, bindings) -> bool:
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    if isinstance(expr, relax.Var):
        return False
    if isinstance(expr, relax.Call):
        return all(
            _is_constant(a, bindings) for a in expr.args if not isinstance(a, relax.ShapeExpr)
        )
    return hasattr(expr, "value")


def unsupported_reason(call: relax.Call, block) -> str:
    """The first crossbar limit the anchor ``call`` (bound in ``block``) breaks."""
    bindings = {b.var: b.value for b in block.bindings}
    x, w = call.args[:2]
    reason = shape_reason(call)
    if reason is None and not _is_constant(w, bindings):
        reason = "weights are not constants"
    reason = reason or anchor_reason(call)
    if reason is not None:
        return reason
    dtypes = {str(x.ty.dtype), str(w.ty.dtype)}
    if not dtypes <= _FORM_DTYPES:
        return f"unsupported dtypes {sorted(dtypes)}"
    if _shared_dequantize(x, block):
        # ``patterns._check_self_contained`` refuses a match that would swallow it.
        return (
            "its input's quantize/dequantize pair is shared with other operators of the graph "
            "(quantize with dedicated pairs, e.g. onnxruntime's DedicatedQDQPair=True)"
        )
    return "no cim pattern matched its operand form (dtypes or quantization)"


def _shared_dequantize(x, block) -> bool:
    """Whether ``x`` is a dequantize (or a quantize/dequantize pair) another binding reads."""
    bindings = {b.var: b.value for b in block.bindings}
    users: dict = {}
    for b in block.bindings:
        for arg in getattr(b.value, "args", ()):
            if isinstance(arg, relax.Var):
                users[arg] = users.get(arg, 0) + 1
    value = bindings.get(x)
    if getattr(getattr(value, "op", None), "name", None) != "relax.dequantize":
        return False
    if users.get(x, 0) > 1:
        return True
    source = value.args[0]
    return isinstance(source, relax.Var) and users.get(source, 0) > 1
