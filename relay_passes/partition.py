"""Partitioning a Relax module for ``cim`` and rewriting the offloaded calls.

``partition_for_cim`` names every dense and convolution operator, fuses the pattern
table's matches into composite functions, merges adjacent ones into ``Codegen="cim"``
functions and gives each a symbol unique to the build. ``rewrite_offloaded_calls`` then
replaces every call of such a function with whatever the caller makes of it: the runtime
call that carries the crossbar program, or a calibration hook.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Collection, Sequence

import tvm
from tvm import relax

from .canonicalize import (
    clips_from_min_max,
    dedicated_qdq_pairs,
    emit_like,
    reshapes_before_dequantize,
)
from .fold import fold_constants
from .patterns import ANCHORS, cim_patterns, computed_from_constants

_build_ids = itertools.count()

#: Source-name prefix of the span that carries an operator's name through partitioning.
OPERATOR_SPAN_PREFIX = "cim-op:"


def operator_name(call: relax.Call) -> str | None:
    """The name ``name_operators`` gave an anchor call, if any."""
    source = getattr(getattr(call, "span", None), "source_name", None)
    text = getattr(source, "name", None)
    if text and str(text).startswith(OPERATOR_SPAN_PREFIX):
        return str(text)[len(OPERATOR_SPAN_PREFIX) :]
    return None


def anchor_names(fn: relax.Function) -> list[str]:
    """The names of the anchor operators inside ``fn`` and its local functions."""
    found: list[str] = []

    @relax.expr_functor.visitor
    class _Anchors(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            if getattr(call.op, "name", None) in ANCHORS:
                found.append(operator_name(call) or str(call.op.name))

    _Anchors().visit_expr(fn)
    return found


@relax.expr_functor.mutator
class _AnchorNamer(relax.PyExprMutator):
    """Rebinds every anchor operator to a variable carrying the operator's name."""

    def __init__(self, mod, names: Sequence[str] | None):
        super().__init__(mod)
        self.names = list(names) if names is not None else None
        self.count = 0

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        op = getattr(value, "op", None)
        kind = ANCHORS.get(getattr(op, "name", None))
        if kind is None:
            super().visit_var_binding_(binding)
            return
        if self.names is not None and self.count < len(self.names):
            name = self.names[self.count]
        else:
            name = f"{kind}_{self.count}"
        self.count += 1
        # The span survives fusion and merging, unlike variable names.
        span = tvm.ir.Span(tvm.ir.SourceName(OPERATOR_SPAN_PREFIX + name), 0, 0, 0, 0)
        value = relax.Call(value.op, value.args, value.attrs, value.ty_args, span)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(value, name)
        else:
            new_var = self.builder_.emit_output(value, name)
        self.set_var_remap(binding.var, new_var)


def name_operators(mod: tvm.IRModule, names: Sequence[str] | None = None) -> tvm.IRModule:
    """Name the variable each ``matmul``/``conv2d`` binds: ``names`` in binding order
    (ONNX node names), else ``dense_<i>`` / ``conv2d_<i>``."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function) and not _is_offloaded(fn):
            out[gv] = _AnchorNamer(mod, names).visit_expr(fn)
    return out


def _is_offloaded(fn) -> bool:
    return isinstance(fn, relax.Function) and fn.attrs is not None and "Codegen" in fn.attrs


def offloaded_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The ``Codegen="cim"`` functions, in the order ``main`` calls them."""
    found = {gv: fn for gv, fn in mod.functions.items() if _is_offloaded(fn)}
    order: list = []

    @relax.expr_functor.visitor
    class _Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            super().visit_call_(call)
            if call.op in found and call.op not in order:
                order.append(call.op)

    for fn in mod.functions.values():
        if isinstance(fn, relax.Function) and not _is_offloaded(fn):
            _Calls().visit_expr(fn)
    order += [gv for gv in found if gv not in order]
    return [(gv, found[gv]) for gv in order]


def partition(
    mod: tvm.IRModule, names: Sequence[str] | None = None, refused: Collection[str] = ()
) -> tvm.IRModule:
    """Name operators, fuse the table's matches and merge them into ``cim`` functions.

    Operators named in ``refused`` stay on the CPU whatever the table says.
    """
    mod = clips_from_min_max(name_operators(mod, names))
    mod = fold_constants(dedicated_qdq_pairs(reshapes_before_dequantize(mod)))
    order = _anchor_order(mod)
    patterns = _run_time_operands_only(_refusing(cim_patterns(), set(refused)), mod)
    mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=True, annotate_codegen=False)(
        mod
    )
    mod = relax.transform.MergeCompositeFunctions()(_one_composite_per_call(mod, order))
    build = next(_build_ids)
    for gv, fn in offloaded_functions(mod):
        symbol = re.sub(r"\W", "_", str(fn.attrs["global_symbol"]))
        mod[gv] = fn.with_attr("global_symbol", f"{symbol}_b{build}")
    return mod


#: Attribute naming the operator of a composite function, one function per call site.
OPERATOR_ATTR = "cim.operator"


def _anchor_order(mod: tvm.IRModule) -> list[str]:
    """The operator names of ``main``'s anchor calls, in binding order."""
    return [
        operator_name(b.value) or b.var.name
        for block in mod["main"].body.blocks
        for b in block.bindings
        if getattr(getattr(b.value, "op", None), "name", None) in ANCHORS
    ]


def _is_composite(fn) -> bool:
    return isinstance(fn, relax.Function) and fn.attrs is not None and "Composite" in fn.attrs


@relax.expr_functor.mutator
class _AnchorRenamer(relax.PyExprMutator):
    """Gives the anchor call of a composite function the span of another operator name."""

    def __init__(self, name: str):
        super().__init__()
        self.span = tvm.ir.Span(tvm.ir.SourceName(OPERATOR_SPAN_PREFIX + name), 0, 0, 0, 0)

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", None) in ANCHORS:
            return relax.Call(call.op, call.args, call.attrs, call.ty_args, self.span)
        return call


def _one_composite_per_call(mod: tvm.IRModule, order: list[str]) -> tvm.IRModule:
    """Give every call of a composite function a function of its own, named for its operator.

    Fusion shares one function among structurally equal matches (layers with equal
    weights, as tied weights or constant-filled test models have), which would make those
    layers one operator: one name, one precision, counted once in the reports. A function
    attribute with the operator's name keeps them apart through merging. The names come
    from the spans, except for the calls of a shared function, whose span names only the
    first: those take their operator's place in ``order``, which holds when the sequence
    of anchors and composite calls in ``main`` lines up with it (checked on every
    unshared one).
    """
    main = mod["main"]
    sites = []  # (binding var, GlobalVar or None for an anchor left in main, span name)
    for block in main.body.blocks:
        for b in block.bindings:
            op = getattr(b.value, "op", None)
            if isinstance(op, tvm.ir.GlobalVar) and _is_composite(mod[op]):
                sites.append((b.var, op, anchor_names(mod[op])[0]))
            elif getattr(op, "name", None) in ANCHORS:
                sites.append((b.var, None, operator_name(b.value) or b.var.name))
    calls: dict = {}
    for _, gv, _ in sites:
        if gv is not None:
            calls[gv] = calls.get(gv, 0) + 1
    if all(count == 1 for count in calls.values()):
        return mod
    aligned = len(sites) == len(order) and all(
        name == expected
        for (_, gv, name), expected in zip(sites, order)
        if gv is None or calls[gv] == 1
    )
    copies: dict = {}  # binding var -> the composite function of its own
    for i, (var, gv, name) in enumerate(sites):
        if gv is not None and calls[gv] > 1:
            name = order[i] if aligned else name
            fn = _AnchorRenamer(name).visit_expr(mod[gv]).with_attr(OPERATOR_ATTR, name)
            copies[var] = (relax.utils.copy_with_new_vars(fn), f"{gv.name_hint}_{i}")

    @relax.expr_functor.mutator
    class _Redirect(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var not in copies:
                super().visit_var_binding_(binding)
                return
            fn, name = copies[binding.var]
            value = binding.value
            args = [self.visit_expr(a) for a in value.args]
            call = relax.Call(self.builder_.add_func(fn, name), args, value.attrs, value.ty_args)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, call))

    redirect = _Redirect(mod)
    new_main = redirect.visit_expr(main)
    out = redirect.builder_.get()
    out[out.get_global_var("main")] = new_main
    return relax.transform.DeadCodeElimination()(out)


def _refusing(patterns: list, refused: set[str]) -> list:
    """``patterns`` with checks that also refuse the anchors named in ``refused``."""
    if not refused:
        return patterns

    def guarded(check):
        def guarded_check(ctx) -> bool:
            return operator_name(ctx.annotated_expr["anchor"]) not in refused and check(ctx)

        return guarded_check

    return [
        relax.transform.FusionPattern(
            p.name, p.pattern, dict(p.annotation_patterns), guarded(p.check)
        )
        for p in patterns
    ]


def _run_time_operands_only(patterns: list, mod: tvm.IRModule) -> list:
    """``patterns`` whose activation-activation matmuls refuse an operand computed from
    constants alone: that is a weight constant folding left (the reports say why it stays
    on the CPU), not a value to write into the crossbars for every image."""
    bindings = {b.var: b.value for block in mod["main"].body.blocks for b in block.bindings}

    def guarded(check):
        def run_time_operands(ctx) -> bool:
            operands = (ctx.annotated_expr["input"], ctx.annotated_expr["stored"])
            return not any(computed_from_constants(e, bindings) for e in operands) and check(ctx)

        return run_time_operands

    return [
        relax.transform.FusionPattern(
            p.name, p.pattern, dict(p.annotation_patterns), guarded(p.check)
        )
        if "stored" in p.annotation_patterns
        else p
        for p in patterns
    ]


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod, rewrite):
        super().__init__(mod)
        self.mod_ = mod
        self.rewrite = rewrite

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if isinstance(call.op, tvm.ir.GlobalVar) and _is_offloaded(self.mod_[call.op]):
            return self.rewrite(call.op, self.mod_[call.op], call)
        return call


def rewrite_offloaded_calls(
    mod: tvm.IRModule, rewrite: Callable[[tvm.ir.GlobalVar, relax.Function, relax.Call], relax.Expr]
) -> tvm.IRModule:
    """Replace each call of a ``cim`` function by ``rewrite(gv, fn, call)``; drop the functions."""
    out = tvm.IRModule({}, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if _is_offloaded(fn):
            continue
        if isinstance(fn, relax.Function):
            fn = _CallRewriter(mod, rewrite).visit_expr(fn)
        out[gv] = fn
    return out


def call_packed(symbol: str, args: list, call: relax.Call) -> relax.Call:
    """``call_dps_packed(symbol, args)`` with the output types of ``call``."""
    ty = call.ty
    out = list(ty.fields) if isinstance(ty, relax.TupleType) else ty
    return relax.call_dps_packed(symbol, args, out)
