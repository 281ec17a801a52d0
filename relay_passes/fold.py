"""Fold the constant subgraphs that compute weights, biases and shapes before partitioning.

Exporters compute weights from constants (``ConstantOfShape`` then ``Expand``, a transpose
of an initializer, a bias times Gemm's ``beta``); the patterns take only constant weights,
so ``fold_constants`` evaluates such subgraphs first, with ``relax.transform.FoldConstant``.

That pass alone would also evaluate every weight ``dequantize`` into floats and every
widening of integer codes into int32, and the quantized patterns would lose the integer
weights they read. So the values the quantized forms read stay as they are:

* every argument of a ``relax.dequantize`` (codes, scale, zero point), and the data of a
  ``relax.clip`` that is such an argument (weight codes clipped to a narrower range);
* the 8-bit integer constant of an ``astype`` to a wider integer, as MatMulInteger and
  ConvInteger widen codes.

An argument that is a ``quantize`` of a float constant (a float weight behind a
QuantizeLinear) is not kept: it folds to the integer codes, leaving ``dequantize(codes)``.

The kept values are hidden from the pass: each constant a kept value is made of becomes a
parameter of the function, one per use, the pass runs, and ``relax.transform.BindParams``
binds the constants back. The pass rebuilds calls with their spans, so the operator names
``name_operators`` put on the anchors survive.

Around the pass, numpy evaluates the layout operators on constants (``broadcast_to``,
``reshape``, ``permute_dims``: the pass would build one kernel per distinct shape, which
made a model-zoo graph take half a minute), reads items of constant tuples (a folded
``split``) and substitutes constants for the variables bound to them, so the patterns
see constants. The float forms (``float_forms``) follow, folding Gemm's ``alpha`` and an
inference BatchNormalization into the constant weights.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .canonicalize import op_name
from .float_forms import fold_float_forms
from .patterns import CODE_DTYPES


def _is_constant(expr) -> bool:
    """A tensor constant (scalar immediates such as clip bounds fold nothing)."""
    return isinstance(expr, tvm.ir.GenericConst)


def _widens_codes(cast: relax.Call) -> bool:
    """``astype`` of an 8-bit integer constant to another integer type (MatMulInteger)."""
    data = cast.args[0]
    return (
        _is_constant(data)
        and str(data.ty.dtype) in CODE_DTYPES
        and str(cast.ty.dtype).startswith(("int", "uint"))
    )


class _KeptUses:
    """The constant arguments, per binding, that make up a value the quantized forms read."""

    def __init__(self, bindings: dict):
        self.bindings = bindings
        self.uses: dict = {}  # binding var -> indices of the constant arguments to keep

    def keep(self, owner, index: int) -> None:
        """Keep argument ``index`` of the call ``owner`` binds, and what it is made of."""
        arg = self.bindings[owner].args[index]
        if _is_constant(arg):
            self.uses.setdefault(owner, set()).add(index)
            return
        value = self.bindings.get(arg) if isinstance(arg, relax.Var) else None
        if not isinstance(value, relax.Call) or op_name(value) == "relax.quantize":
            return  # an activation, or codes a quantize of a constant folds to
        if op_name(value) == "relax.clip":
            self.keep(arg, 0)
        for i, inner in enumerate(value.args):
            if _is_constant(inner):
                self.uses.setdefault(arg, set()).add(i)

    @classmethod
    def of(cls, fn: relax.Function) -> dict:
        bindings = {b.var: b.value for block in fn.body.blocks for b in block.bindings}
        kept = cls(bindings)
        for var, value in bindings.items():
            op = op_name(value)
            if op == "relax.dequantize":
                for i in range(len(value.args)):
                    kept.keep(var, i)
            elif op == "relax.astype" and _widens_codes(value):
                kept.keep(var, 0)
        return kept.uses


@relax.expr_functor.mutator
class _Lifter(relax.PyExprMutator):
    """Replaces each kept constant argument by a fresh variable, remembering the constant."""

    def __init__(self, mod, uses: dict):
        super().__init__(mod)
        self.uses = uses
        self.lifted: dict = {}  # new variable -> the constant it stands for

    def visit_var_binding_(self, binding):
        indices = self.uses.get(binding.var)
        if not indices:
            super().visit_var_binding_(binding)
            return
        value = binding.value
        args = [self.visit_expr(a) for a in value.args]
        for i in sorted(indices):
            var = relax.Var(f"cim_kept_{len(self.lifted)}", value.args[i].ty)
            self.lifted[var] = value.args[i]
            args[i] = var
        call = relax.Call(value.op, args, value.attrs, value.ty_args, value.span)
        emit = (
            self.builder_.emit
            if isinstance(binding.var, relax.DataflowVar)
            else self.builder_.emit_output
        )
        self.set_var_remap(binding.var, emit(call, binding.var.name))


def _static_shape(ty) -> list[int] | None:
    shape = getattr(ty, "shape", None)
    if shape is None or not all(hasattr(d, "value") for d in shape):
        return None
    return [int(d) for d in shape]


def _layout_value(call: relax.Call) -> np.ndarray | None:
    """The value of a layout operator on a constant, computed by numpy, else None."""
    op = op_name(call)
    if op not in _LAYOUT_OPS or not _is_constant(call.args[0]):
        return None
    shape = _static_shape(call.ty)
    if shape is None:
        return None
    value = call.args[0].value.numpy()
    if op == "relax.permute_dims":
        axes = call.attrs.axes
        return np.transpose(value, None if axes is None else [int(a) for a in axes])
    return np.broadcast_to(value, shape) if op == "relax.broadcast_to" else value.reshape(shape)


#: Operators ``_LayoutFolder`` evaluates itself: they only copy the data, and
#: ``FoldConstant`` would build one kernel per distinct shape.
_LAYOUT_OPS = ("relax.broadcast_to", "relax.reshape", "relax.permute_dims")


@relax.expr_functor.mutator
class _LayoutFolder(relax.PyExprMutator):
    """Replaces each layout operator on a constant by its value, and each item of a
    constant tuple (``FoldConstant`` folds ``split`` to one) by that constant."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        value = _layout_value(call)
        return call if value is None else relax.const(np.ascontiguousarray(value))

    def __init__(self, mod):
        super().__init__(mod)
        self.constants: dict = {}  # dataflow variable -> the constant it was bound to

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        if isinstance(binding.var, relax.DataflowVar) and _is_constant(value):
            self.constants[binding.var] = value  # read as the constant: patterns see it
            return
        super().visit_var_binding_(binding)

    def visit_dataflow_var_(self, var):
        return self.constants.get(var) or super().visit_dataflow_var_(var)

    def visit_tuple_getitem_(self, op):
        tup = self.visit_expr(op.tuple_value)
        value = self.lookup_binding(tup) if isinstance(tup, relax.Var) else tup
        if isinstance(value, relax.Tuple) and all(_is_constant(f) for f in value.fields):
            return value.fields[op.index]
        return relax.TupleGetItem(tup, op.index)


def _lift(mod: tvm.IRModule, gv: tvm.ir.GlobalVar, lifted: dict) -> relax.Function:
    """``mod[gv]`` with its kept constants as extra parameters (recorded in ``lifted``)."""
    fn = mod[gv]
    lifter = _Lifter(mod, _KeptUses.of(fn))
    new = lifter.visit_expr(fn)
    if not lifter.lifted:
        return new
    lifted.update(lifter.lifted)
    params = [*new.params, *lifter.lifted]
    return relax.Function(params, new.body, new.ret_ty, new.is_pure, new.attrs, new.span)


def _relax_functions(mod: tvm.IRModule) -> list[tvm.ir.GlobalVar]:
    """The Relax functions of ``mod`` not yet offloaded."""
    return [
        gv
        for gv, fn in mod.functions.items()
        if isinstance(fn, relax.Function) and not (fn.attrs and "Codegen" in fn.attrs)
    ]


def _fold_layouts(mod: tvm.IRModule) -> tvm.IRModule:
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv in _relax_functions(mod):
        out[gv] = _LayoutFolder(mod).visit_expr(mod[gv])
    return out


def fold_constants(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold constant subgraphs, keeping what the quantized patterns read, then the float
    forms (``float_forms.fold_float_forms``)."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    lifted: dict = {}  # per function: new parameter -> its constant
    for gv in _relax_functions(mod):
        lifted[gv] = {}
        out[gv] = _lift(mod, gv, lifted[gv])
    out = _fold_layouts(relax.transform.FoldConstant()(_fold_layouts(out)))
    for gv, params in lifted.items():
        if params:
            out = relax.transform.BindParams(gv.name_hint, params)(out)
    return fold_float_forms(out)
