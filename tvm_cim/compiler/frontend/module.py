"""What the frontends read back from an imported Relax module."""

from __future__ import annotations

from tvm_cim.core.errors import CimError


def count_anchors(mod) -> int:
    """Number of bindings of ``relax.matmul``/``relax.nn.conv2d`` in ``mod["main"]``."""
    from tvm import relax

    from tvm_cim.relay_passes.patterns import ANCHORS

    count = 0

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_var_binding_(self, binding):
            nonlocal count
            op = getattr(binding.value, "op", None)
            if getattr(op, "name", None) in ANCHORS:
                count += 1
            super().visit_var_binding_(binding)

    _Counter().visit_expr(mod["main"])
    return count


def main_inputs(mod) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of each parameter of ``mod["main"]``.

    Raises
    ------
    CimError
        A parameter that is not a tensor of static shape.
    """
    out = []
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or not all(hasattr(d, "value") for d in shape):
            raise CimError(f"input {param.name!r} has no static shape ({param.ty})")
        out.append((param.name, tuple(int(d.value) for d in shape), str(param.ty.dtype)))
    return out
