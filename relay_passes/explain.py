"""Why a dense or convolution operator stayed on the CPU, in words for reports."""

from __future__ import annotations

from tvm import relax

from ..sim.isa import MAX_COLUMNS


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
    """The first crossbar limit ``call`` breaks."""
    bindings = {b.var: b.value for b in block.bindings}
    x, w = call.args[:2]
    shapes = [getattr(a.ty, "shape", None) for a in (x, w, call)]
    if any(s is None or not all(hasattr(d, "value") for d in s) for s in shapes):
        return "dynamic shapes"
    if not _is_constant(w, bindings):
        return "weights are not constants"
    if call.op.name == "relax.nn.conv2d":
        a = call.attrs
        if int(a.groups) != 1:
            return f"grouped convolution (groups={int(a.groups)}) is not mapped"
        if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW"):
            return f"layout {a.data_layout}/{a.kernel_layout} is not NCHW/OIHW"
        n, c, kh, kw = (int(d) for d in w.ty.shape)
        k = c * kh * kw
    else:
        if len(w.ty.shape) != 2:
            return "batched matmul weights are not one matrix"
        k, n = (int(d) for d in w.ty.shape)
    if k > MAX_COLUMNS or n > MAX_COLUMNS:
        return f"weight matrix {k}x{n} exceeds {MAX_COLUMNS} rows or columns"
    dtypes = {str(x.ty.dtype), str(w.ty.dtype)}
    if not dtypes <= {"float16", "float32", "float64", "int8", "uint8", "int32"}:
        return f"unsupported dtypes {sorted(dtypes)}"
    return "no cim pattern matched its operand form (dtypes or quantization)"
