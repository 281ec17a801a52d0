"""The ``cim`` pattern table: which Relax subgraphs the crossbars run.

Three families, each for dense (``matmul``) and 2-D convolution, with an optional bias
(in either operand order) and an optional ReLU:

* float: ``cim.dense``, ``cim.dense_relu``, ``cim.conv2d``, ``cim.conv2d_relu``: float
  activations and constant float weights; quantized by a precision config and calibration.
* QDQ: ``cim.qdq.*``: ``dequantize`` around the activations and the constant weights, as
  the ONNX frontend imports QuantizeLinear/DequantizeLinear; the ``*_quantize`` forms also
  take the ``quantize`` of the result, so chains of quantized layers stay integer and merge.
* integer: ``cim.int.*``: ``astype``/``subtract``/``matmul(out_dtype="int32")`` as the ONNX
  frontend imports MatMulInteger and ConvInteger; computed bit-exactly.

A ``matmul`` whose both operands are activations (attention's ``Q @ Kᵀ`` and ``A @ V``, as
``torch.export`` writes ``nn.MultiheadAttention`` and ``scaled_dot_product_attention``, and
ONNX MatMul between two tensors imports) has its own entries in the three forms,
``cim.act_matmul``, ``cim.qdq.act_matmul`` and ``cim.int.act_matmul``: its second operand is
written into the crossbars at run time, one matrix per head (``act_matmul_reason`` gives
the limits).

Every pattern carries its form's check functions and the hardware limits all forms share;
an operator that fails one stays on the CPU. The shared limits are functions of the anchor
call that say why it breaks one (``anchor_reason``), so the reports give the very reason
that decided the partition.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.backend.pattern_registry import get_patterns_with_prefix, register_patterns
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.transform import PatternCheckContext

from ..sim.isa import MAX_COLUMNS

#: Anchor Relax operators and the operator kind they become.
ANCHORS = {"relax.matmul": "dense", "relax.nn.conv2d": "conv2d"}
#: Activation and weight dtypes of the float forms.
FLOAT_DTYPES = ("float16", "float32", "float64")
#: Dtypes of the integer codes the QDQ and integer forms take.
CODE_DTYPES = ("int8", "uint8")


def _clipped(pattern):
    return is_op("relax.clip")(pattern, wildcard(), wildcard()) | pattern


def _const_or_reshaped():
    return is_const() | is_op("relax.reshape")(is_const(), wildcard())


def _dequantized_const():
    # Constant codes, or constant codes through an integer clip that states their width.
    codes = is_const() | is_op("relax.clip")(is_const(), wildcard(), wildcard())
    return is_op("relax.dequantize")(codes, is_const(), is_const())


def _int_operand(source):
    """``astype(v)`` or ``astype(v) - zero_point``, as MatMulInteger imports."""
    cast = is_op("relax.astype")(source)
    zero_point = is_const() | is_op("relax.astype")(is_const())
    return is_op("relax.subtract")(cast, zero_point) | cast


def _operands(form: str, kind: str):
    """``(input, weight)`` patterns of a family."""
    if form == "float":
        x = wildcard()
        w = is_const()
        if kind == "dense":
            w = w | is_op("relax.permute_dims")(is_const())
    elif form == "qdq":
        # The activation's own quantize (after an optional clip, and before an optional
        # integer clip of its codes) when no producer took it.
        leading = is_op("relax.quantize")(_clipped(wildcard()), is_const(), is_const())
        x = is_op("relax.dequantize")(_clipped(leading) | wildcard(), is_const(), is_const())
        w = _dequantized_const()
        if kind == "dense":
            w = w | is_op("relax.permute_dims")(_dequantized_const())
    else:
        x = _int_operand(wildcard()) | wildcard()
        w = _int_operand(is_const()) | is_const()
        if kind == "dense":
            w = w | is_op("relax.permute_dims")(w)
    return x, w


def _activation_operand(form: str):
    """One operand of an activation-activation matmul in ``form``."""
    if form == "float":  # real values, but not dequantized codes: those are the QDQ form's
        return ~is_op("relax.dequantize")(wildcard(), wildcard(), wildcard())
    if form == "qdq":
        leading = is_op("relax.quantize")(_clipped(wildcard()), is_const(), is_const())
        return is_op("relax.dequantize")(_clipped(leading) | wildcard(), is_const(), is_const())
    return is_op("relax.astype")(wildcard())


def make_act_pattern(form: str):
    """``(pattern, annotations)`` of the activation-activation matmul of ``form``: the
    driven operand ``input`` and the ``stored`` one, which the crossbars hold."""
    x, stored = _activation_operand(form), _activation_operand(form)
    anchor = is_op("relax.matmul")(x, stored)
    return anchor, {"anchor": anchor, "input": x, "stored": stored}


def make_pattern(form: str, kind: str, relu: bool, quantize: bool, code_clip: bool = False):
    """``(pattern, annotations)`` of one table entry; ``code_clip`` takes an integer clip of
    the output codes as well."""
    x, w = _operands(form, kind)
    op = "relax.matmul" if kind == "dense" else "relax.nn.conv2d"
    anchor = is_op(op)(x, w)
    out = anchor
    if form != "int":
        bias = _const_or_reshaped()
        if form == "qdq":
            bias = bias | _dequantized_const()
            bias = bias | is_op("relax.reshape")(_dequantized_const(), wildcard())
        out = is_op("relax.add")(anchor, bias) | is_op("relax.add")(bias, anchor) | anchor
    if relu:
        out = is_op("relax.nn.relu")(out)
    annotations = {"anchor": anchor, "input": x, "weight": w}
    if quantize:
        out = is_op("relax.quantize")(_clipped(out), is_const(), is_const())
        annotations["output"] = out
        if code_clip:  # the codes' own width, as an integer clip after the quantize
            out = is_op("relax.clip")(out, wildcard(), wildcard())
            annotations["output_clip"] = out
    return out, annotations


# ------------------------------------------------- the limits every form shares


def _static(expr) -> bool:
    shape = getattr(expr.ty, "shape", None)
    return shape is not None and all(hasattr(d, "value") for d in shape)


def shape_reason(anchor) -> str | None:
    """Programs are compiled for fixed tensor widths."""
    if not all(_static(e) for e in (*anchor.args, anchor)):
        return "dynamic shapes"
    return None


def conv_layout_reason(anchor) -> str | None:
    """One crossbar matmul per output pixel and group set: NCHW/OIHW, groups that split
    the input and output channels evenly (grouped and depthwise convolutions included)."""
    if anchor.op.name != "relax.nn.conv2d":
        return None
    a = anchor.attrs
    groups = int(a.groups)
    if groups != 1 and (str(a.data_layout), str(a.kernel_layout)) == ("NCHW", "OIHW"):
        channels = int(anchor.args[0].ty.shape[1])
        outputs = int(anchor.args[1].ty.shape[0])
        if groups < 1 or channels % groups or outputs % groups:
            return (
                f"grouped convolution (groups={groups}) does not split {channels} input "
                f"and {outputs} output channels evenly"
            )
    if (str(a.data_layout), str(a.kernel_layout)) != ("NCHW", "OIHW"):
        return f"layout {a.data_layout}/{a.kernel_layout} is not NCHW/OIHW"
    if str(a.out_layout) != "NCHW":
        return f"output layout {a.out_layout} is not NCHW"
    return None


def matmul_shape_reason(anchor) -> str | None:
    """The weight is one ``[K, N]`` matrix; the input may carry leading batch dimensions."""
    if anchor.op.name != "relax.matmul":
        return None
    x, w = anchor.args
    if len(w.ty.shape) != 2:
        return "batched matmul weights are not one matrix"
    if len(x.ty.shape) < 2:
        return f"a matmul input of rank {len(x.ty.shape)} is not mapped"
    return None


def dimension_reason(anchor) -> str | None:
    """Column and row counts are 16-bit fields of the instructions."""
    w_shape = [int(d) for d in anchor.args[1].ty.shape]
    if anchor.op.name == "relax.matmul":
        k, n = w_shape
    else:
        n, c, kh, kw = w_shape  # c: the channels of one group
        k = c * kh * kw
        channels = int(anchor.args[0].ty.shape[1])
        if channels > MAX_COLUMNS:
            return f"{channels} input channels exceed {MAX_COLUMNS} columns"
    if k > MAX_COLUMNS or n > MAX_COLUMNS:
        return f"weight matrix {k}x{n} exceeds {MAX_COLUMNS} rows or columns"
    return None


def computed_from_constants(expr, bindings) -> bool:
    """``expr`` is a constant, or computed from constants alone (``bindings``: the
    function's variables and the values bound to them)."""
    while isinstance(expr, relax.Var) and expr in bindings:
        expr = bindings[expr]
    if isinstance(expr, relax.Var):
        return False
    if isinstance(expr, relax.Call):
        return all(
            computed_from_constants(a, bindings)
            for a in expr.args
            if not isinstance(a, relax.ShapeExpr)
        )
    if isinstance(expr, relax.Tuple):
        return all(computed_from_constants(f, bindings) for f in expr.fields)
    if isinstance(expr, relax.TupleGetItem):
        return computed_from_constants(expr.tuple_value, bindings)
    return hasattr(expr, "value")


def act_matmul_reason(anchor) -> str | None:
    """Why an activation-activation ``matmul`` cannot run on the crossbars, else None: the
    operands are ``[..., L, K]`` and ``[..., K, N]`` with the same leading dimensions (the
    heads), ``K`` and ``N`` within a crossbar instruction's fields, and every head side by
    side in one buffer."""
    reason = shape_reason(anchor)
    if reason is not None:
        return reason
    x, s = ([int(d) for d in a.ty.shape] for a in anchor.args)
    if len(x) < 2 or len(s) != len(x):
        return f"operands of ranks {len(x)} and {len(s)}: only equal ranks of 2 or more are mapped"
    if x[:-2] != s[:-2]:
        return f"operands broadcast over their leading dimensions {x[:-2]} and {s[:-2]}"
    heads = 1
    for d in x[:-2]:
        heads *= d
    k, n = s[-2:]
    if heads * max(k, n) > MAX_COLUMNS:
        return f"{heads} heads of a {k}x{n} operand exceed {MAX_COLUMNS} buffer columns"
    return None


#: The shared limits, in the order they are checked (each assumes the ones before hold).
ANCHOR_LIMITS = (shape_reason, conv_layout_reason, matmul_shape_reason, dimension_reason)


def anchor_reason(anchor) -> str | None:
    """The first shared limit the anchor ``matmul``/``conv2d`` call breaks, else None."""
    for limit in ANCHOR_LIMITS:
        reason = limit(anchor)
        if reason is not None:
            return reason
    return None


# ------------------------------------------------------------ one check per form


def _anchor(ctx: PatternCheckContext):
    return ctx.annotated_expr["anchor"]


def _check_anchor_limits(ctx: PatternCheckContext) -> bool:
    # The limits every form shares.
    return anchor_reason(_anchor(ctx)) is None


def _check_float_dtypes(ctx: PatternCheckContext) -> bool:
    # Float forms quantize float activations; other dtypes are not theirs.
    return all(str(a.ty.dtype) in FLOAT_DTYPES for a in _anchor(ctx).args)


def _check_int_dtypes(ctx: PatternCheckContext) -> bool:
    # Integer forms take 8-bit codes in and an int32 accumulator out.
    anchor = _anchor(ctx)
    if str(anchor.ty.dtype) != "int32":
        return False
    for operand in (ctx.annotated_expr["input"], ctx.annotated_expr["weight"]):
        source = operand
        while True:
            if source in ctx.matched_bindings:  # a variable bound inside the match
                source = ctx.matched_bindings[source]
            elif hasattr(source, "op") and getattr(source.op, "name", None) in (
                "relax.astype",
                "relax.subtract",
                "relax.permute_dims",
            ):
                source = source.args[0]
            else:
                break
        if str(source.ty.dtype) not in CODE_DTYPES:
            return False
    return True


def _check_qdq_codes(ctx: PatternCheckContext) -> bool:
    # Dequantized codes must be 8-bit or narrower integers.
    x = ctx.annotated_expr["input"]
    return str(x.args[0].ty.dtype) in CODE_DTYPES


def _check_clip_alignment(ctx: PatternCheckContext) -> bool:
    # A clip before a quantize must cut exactly at a code range, and so must an integer
    # clip of its codes: then the codes are that narrower width (a ReLU6-like clip, or a
    # narrow code range, stays on the CPU instead).
    from .canonicalize import clip_bounds, quantized_code_range

    for q, after in _quantized_codes(ctx):
        before = ctx.matched_bindings.get(q.args[0], q.args[0])
        before = before if _op_is(before, "relax.clip") else None
        if before is None and after is None:
            continue
        scale, zp = (a.value.numpy() for a in q.args[1:3])
        if scale.size != 1 or zp.size != 1:
            return False
        bounds = (clip_bounds(c) if c is not None else None for c in (before, after))
        if quantized_code_range(str(q.ty.dtype), float(scale), int(zp), *bounds) is None:
            return False
    return True


def _op_is(expr, name: str) -> bool:
    return getattr(getattr(expr, "op", None), "name", None) == name


def _quantized_codes(ctx: PatternCheckContext) -> list:
    """``(quantize, integer clip of its codes or None)`` of the match's output and of its
    activation operand, where the match quantizes them."""
    found = []
    if ctx.annotated_expr.get("output") is not None:
        found.append((ctx.annotated_expr["output"], ctx.annotated_expr.get("output_clip")))
    x = ctx.annotated_expr["input"]
    source = ctx.matched_bindings.get(x.args[0], x.args[0])
    after = None
    if _op_is(source, "relax.clip"):
        after, source = source, ctx.matched_bindings.get(source.args[0], source.args[0])
    if _op_is(source, "relax.quantize"):
        found.append((source, after))
    return found


def weight_clip(weight, bindings) -> tuple | None:
    """The integer clip the weight operand's constant codes pass through, else None."""
    expr = weight
    while True:
        expr = bindings.get(expr, expr)
        if _op_is(expr, "relax.clip"):
            return expr
        if not any(_op_is(expr, n) for n in ("relax.permute_dims", "relax.dequantize")):
            return None
        expr = expr.args[0]


def weight_clip_reason(weight, bindings) -> str | None:
    """Why an integer clip of the weight codes states no width the crossbars map."""
    from .canonicalize import clip_bounds, weight_clip_bits

    clip = weight_clip(weight, bindings)
    if clip is None:
        return None
    lo, hi = clip_bounds(clip)
    if weight_clip_bits(lo, hi) is None:
        return (
            f"weight codes pass through an integer clip [{lo:g}, {hi:g}] that is not a "
            "signed code range of 2..8 bits"
        )
    return None


def activation_clip_reason(x, bindings) -> str | None:
    """Why an integer clip of the activation codes ``x`` dequantizes states no width the
    crossbars take exactly (a narrow or partial code range), else None."""
    from .canonicalize import clip_bounds, quantized_code_range

    dq = bindings.get(x, x)
    clip = bindings.get(dq.args[0], dq.args[0]) if _op_is(dq, "relax.dequantize") else None
    q = bindings.get(clip.args[0], clip.args[0]) if _op_is(clip, "relax.clip") else None
    if not _op_is(q, "relax.quantize"):
        return None
    scale, zp = (getattr(a, "value", None) for a in q.args[1:3])
    if not (hasattr(scale, "numpy") and hasattr(zp, "numpy")):
        return None
    scale, zp = scale.numpy(), zp.numpy()
    if scale.size != 1 or zp.size != 1:
        return None
    before = bindings.get(q.args[0], q.args[0])
    before = clip_bounds(before) if _op_is(before, "relax.clip") else None
    lo, hi = clip_bounds(clip)
    if quantized_code_range(str(q.ty.dtype), float(scale), int(zp), before, (lo, hi)) is None:
        return (
            f"activation codes are clipped to [{lo:g}, {hi:g}], not the full range of a code "
            "width (crossbar inputs clamp to full ranges only)"
        )
    return None


def _check_weight_clip(ctx: PatternCheckContext) -> bool:
    # Clipped weight codes have the width the clip states, which must be one of ours.
    return weight_clip_reason(ctx.annotated_expr["weight"], ctx.matched_bindings) is None


def _check_self_contained(ctx: PatternCheckContext) -> bool:
    # A value computed inside the match that the rest of the graph also reads (a
    # quantize/dequantize pair shared with a residual add) would make the composite return
    # a tuple: refuse the match, so that the graph keeps computing that value.
    result = ctx.value_to_bound_var.get(ctx.matched_expr)
    inside = set(ctx.matched_bindings.keys())
    for var in inside:
        if result is not None and var.same_as(result):
            continue
        if any(user not in inside for user in ctx.var_usages.get(var, [])):
            return False
    return True


def _act_operands(ctx: PatternCheckContext) -> list:
    return [ctx.annotated_expr["input"], ctx.annotated_expr["stored"]]


def _check_act_limits(ctx: PatternCheckContext) -> bool:
    # The limits of a run-time crossbar write (a constant operand is a weight: the weight
    # patterns take it first, and partition refuses one computed from constants).
    return act_matmul_reason(_anchor(ctx)) is None


def _check_act_float(ctx: PatternCheckContext) -> bool:
    # Real activations, quantized by the precision and calibration.
    return all(str(a.ty.dtype) in FLOAT_DTYPES for a in _anchor(ctx).args)


def _check_act_qdq(ctx: PatternCheckContext) -> bool:
    # 8-bit codes with zero point 0 on both sides: a zero point on the driven side would
    # need every run-time column sum of the stored operand, which no instruction makes.
    for dq in _act_operands(ctx):
        codes = dq.args[0]
        if str(codes.ty.dtype) not in CODE_DTYPES:
            return False
        zero_point = getattr(dq.args[2], "value", None)
        if zero_point is None or bool((zero_point.numpy() != 0).any()):
            return False
        if activation_clip_reason(dq, ctx.matched_bindings) is not None:
            return False
    return True


def _check_act_int(ctx: PatternCheckContext) -> bool:
    # Integer codes cast for an int32 accumulator, zero point 0 (no subtract).
    if str(_anchor(ctx).ty.dtype) != "int32":
        return False
    return all(str(a.args[0].ty.dtype) in CODE_DTYPES for a in _act_operands(ctx))


def _act_checker(form: str):
    checks = (
        {"float": _check_act_float, "qdq": _check_act_qdq, "int": _check_act_int}[form],
        _check_act_limits,
        _check_self_contained,
    )

    def check(ctx: PatternCheckContext) -> bool:
        return all(c(ctx) for c in checks)

    check.__name__ = f"check_act_{form}"
    return check


_FORM_CHECKS = {
    "float": (_check_float_dtypes,),
    "qdq": (_check_qdq_codes, _check_clip_alignment, _check_weight_clip),
    "int": (_check_int_dtypes,),
}


def _checker(form: str):
    checks = (*_FORM_CHECKS[form], _check_anchor_limits, _check_self_contained)

    def check(ctx: PatternCheckContext) -> bool:
        return all(c(ctx) for c in checks)

    check.__name__ = f"check_{form}"
    return check


def pattern_entries() -> list[tuple]:
    """The table, lowest priority first (``register_patterns`` favours later entries)."""
    entries = []
    for form in ("float", "int", "qdq"):
        prefix = "cim." if form == "float" else f"cim.{form}."
        entries.append((prefix + "act_matmul", *make_act_pattern(form), _act_checker(form)))
    for form in ("float", "int", "qdq"):
        prefix = "cim." if form == "float" else f"cim.{form}."
        for kind in ("dense", "conv2d"):
            variants = [(False, False, False)]
            if form != "int":
                variants += [(True, False, False)]
            if form == "qdq":
                variants += [(False, True, False), (True, True, False)]
                # Above the plain quantize forms, so that they take the clip of the codes.
                variants += [(False, True, True), (True, True, True)]
            for relu, quantize, code_clip in variants:
                name = prefix + kind + ("_relu" if relu else "") + ("_quantize" if quantize else "")
                name += "_clip" if code_clip else ""
                pattern = make_pattern(form, kind, relu, quantize, code_clip)
                entries.append((name, *pattern, _checker(form)))
    return entries


def register() -> None:
    """Register the table with TVM's pattern registry (idempotent)."""
    if not get_patterns_with_prefix("cim."):
        register_patterns(pattern_entries())


def cim_patterns():
    """The registered ``cim`` patterns, highest priority first."""
    register()
    return get_patterns_with_prefix("cim.")


register()
