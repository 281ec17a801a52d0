"""Why a dense or convolution operator stayed on the CPU, in words for reports.

The shared hardware limits are the pattern table's own (``patterns.anchor_reason``), so a
report names the check that kept the operator off the crossbars.
"""

from __future__ import annotations

from tvm import relax

from .patterns import (
    CODE_DTYPES,
    FLOAT_DTYPES,
    act_matmul_reason,
    activation_clip_reason,
    anchor_reason,
    computed_from_constants,
    shape_reason,
    weight_clip_reason,
)

#: Operand dtypes some pattern form takes (the integer forms accumulate in int32).
_FORM_DTYPES = {*FLOAT_DTYPES, *CODE_DTYPES, "int32"}


#: Operators the quantized weight forms keep between the integer codes and the anchor;
#: constant folding leaves every other computation of constants folded.
_KEPT_WEIGHT_OPS = ("relax.dequantize", "relax.clip", "relax.astype", "relax.subtract")


def _unfolded_reason(w, bindings) -> str | None:
    """A weight still computed from constants by an operator folding could not evaluate."""
    while isinstance(w, relax.Var) and w in bindings:
        w = bindings[w]
    if isinstance(w, relax.TupleGetItem):
        w = bindings.get(w.tuple_value, w.tuple_value)
    op = getattr(getattr(w, "op", None), "name", None)
    if op is None or op in _KEPT_WEIGHT_OPS or op == "relax.permute_dims":
        return None
    return f"weights are computed from constants by {op}, which constant folding left"


def unsupported_reason(call: relax.Call, block) -> str:
    """The first crossbar limit the anchor ``call`` (bound in ``block``) breaks."""
    bindings = {b.var: b.value for b in block.bindings}
    x, w = call.args[:2]
    reason = shape_reason(call)
    if reason is None and not computed_from_constants(w, bindings):
        if call.op.name != "relax.matmul":
            return "weights are not constants"
        # Both operands activations: the stored one is written into crossbars at run time.
        reason = act_matmul_reason(call) or activation_clip_reason(x, bindings)
        reason = reason or activation_clip_reason(w, bindings)
        return reason or (
            "activation-activation matmul in no form the crossbars take (float, or 8-bit "
            "codes with zero point 0 on both operands)"
        )
    reason = reason or _unfolded_reason(w, bindings)
    reason = reason or anchor_reason(call) or weight_clip_reason(w, bindings)
    reason = reason or activation_clip_reason(x, bindings)
    if reason is not None:
        return reason
    dtypes = {str(x.ty.dtype), str(w.ty.dtype)}
    if not dtypes <= _FORM_DTYPES:
        return f"unsupported dtypes {sorted(dtypes)}"
    return "no cim pattern matched its operand form (dtypes or quantization)"
