"""Put the float layers other exporters write into the forms the float patterns match.

Run after constant folding, when weights are constants:

* Gemm's ``alpha``: TVM's ONNX frontend scales the input, ``matmul(multiply(x, alpha),
  W)``; the scalar moves into the constant weight, ``matmul(x, alpha * W)``.
* BatchNormalization in inference mode right after a convolution (with or without a
  bias) whose output nothing else reads: the per-channel scale moves into the weight and
  the shift into a bias, ``add(conv2d(x, W * s), b)``, as a fused conv-BN layer computes
  it. A BatchNormalization in training mode, or after anything but such a convolution,
  stays as it is (on the CPU).

Each rewritten anchor keeps its call's span, so its operator name survives.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .canonicalize import op_name
from .patterns import FLOAT_DTYPES


def _array(expr) -> np.ndarray | None:
    """The value of a float constant, else None."""
    if isinstance(expr, tvm.ir.GenericConst) and str(expr.ty.dtype) in FLOAT_DTYPES:
        return expr.value.numpy()
    return None


def _const(value: np.ndarray, like) -> relax.Expr:
    return relax.const(value.astype(str(like.ty.dtype)))


def _rebuilt(call: relax.Call, args) -> relax.Call:
    """``call`` on new arguments, with its attributes and span."""
    return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)


@relax.expr_functor.mutator
class _FloatForms(relax.PyExprMutator):
    def __init__(self, mod, fn: relax.Function):
        super().__init__(mod)
        self.bindings = relax.analysis.get_var2val(fn)
        self.users: dict = {}
        for block in fn.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                self.users.update(relax.analysis.udchain(block))
        self.tuples: dict = {}  # folded batch_norm var -> the fields of its result

    def _sole_reader(self, var, reader) -> bool:
        """``var`` is a dataflow value that only ``reader`` reads."""
        users = self.users.get(var, [])
        return isinstance(var, relax.DataflowVar) and len(users) == 1 and users[0].same_as(reader)

    def _emit(self, var, expr):
        emit = (
            self.builder_.emit if isinstance(var, relax.DataflowVar) else self.builder_.emit_output
        )
        new = emit(expr, var.name)
        self.set_var_remap(var, new)
        return new

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value in self.tuples:
            field = self.tuples[value.tuple_value][value.index]
            if isinstance(binding.var, relax.DataflowVar):
                self.set_var_remap(binding.var, field)  # no alias: patterns see the add
            else:
                self._emit(binding.var, field)
            return
        op = op_name(value)
        if op == "relax.matmul" and self._fold_alpha(binding):
            return
        if op == "relax.nn.batch_norm" and self._fold_batch_norm(binding):
            return
        super().visit_var_binding_(binding)

    def _fold_alpha(self, binding) -> bool:
        """``matmul(multiply(x, c), W)`` with scalar ``c`` -> ``matmul(x, c * W)``."""
        call = binding.value
        x, w = call.args
        weight = _array(w)
        scaled = self.bindings.get(x)
        if weight is None or weight.ndim != 2 or op_name(scaled) != "relax.multiply":
            return False
        for data, factor in (scaled.args, scaled.args[::-1]):
            alpha = _array(factor)
            if alpha is not None and alpha.size == 1 and isinstance(data, relax.Var):
                new_w = _const(weight * alpha.reshape(()), w)
                self._emit(binding.var, _rebuilt(call, [self.visit_expr(data), new_w]))
                return True
        return False

    def _conv_and_bias(self, var, reader):
        """``(conv2d call, bias array or None)`` of a convolution with constant weights
        (and an optional constant bias) whose result only ``reader`` reads, else None."""
        if not self._sole_reader(var, reader):
            return None
        value = self.bindings.get(var)
        bias = None
        if op_name(value) == "relax.add":
            for conv_var, b in (value.args, value.args[::-1]):
                bias = _array(b)
                if bias is not None and isinstance(conv_var, relax.Var):
                    break
            else:
                return None
            if not self._sole_reader(conv_var, var):
                return None
            value = self.bindings.get(conv_var)
        if op_name(value) != "relax.nn.conv2d" or _array(value.args[1]) is None:
            return None
        if str(value.attrs.kernel_layout) != "OIHW" or str(value.attrs.out_layout) != "NCHW":
            return None
        channels = int(value.args[1].ty.shape[0])
        if bias is not None and bias.size != channels:
            return None
        return value, None if bias is None else bias.reshape(channels)

    def _fold_batch_norm(self, binding) -> bool:
        """``batch_norm(conv2d(x, W) [+ b])`` in inference mode -> ``conv2d(x, W*s) + b'``."""
        bn = binding.value
        attrs = bn.attrs
        stats = [_array(a) for a in bn.args[1:]]
        if attrs.training or int(attrs.axis) != 1 or any(s is None for s in stats):
            return False
        found = self._conv_and_bias(bn.args[0], binding.var)
        if found is None:
            return False
        conv, bias = found
        gamma, beta, mean, var = (s.astype(np.float64) for s in stats)
        scale = (gamma if attrs.scale else 1.0) / np.sqrt(var + float(attrs.epsilon))
        shift = (beta if attrs.center else 0.0) + ((0.0 if bias is None else bias) - mean) * scale
        weight = _array(conv.args[1]).astype(np.float64) * scale.reshape(-1, 1, 1, 1)
        x = self.visit_expr(conv.args[0])
        out = self.builder_.emit(_rebuilt(conv, [x, _const(weight, conv.args[1])]))
        shift = _const(shift.reshape(1, -1, 1, 1), conv.args[1])
        out = self.builder_.emit(relax.op.add(out, shift))
        fields = (out, *(self.visit_expr(a) for a in bn.args[3:5]))
        self.tuples[binding.var] = fields
        self._emit(binding.var, relax.Tuple(fields))  # for readers of the whole tuple
        return True


def fold_float_forms(mod: tvm.IRModule) -> tvm.IRModule:
    """Fold Gemm's ``alpha`` and inference BatchNormalization after a convolution into the
    constant weights and biases."""
    out = tvm.IRModule(mod.functions, attrs=mod.attrs)
    for gv, fn in mod.functions.items():
        if isinstance(fn, relax.Function) and not (fn.attrs and "Codegen" in fn.attrs):
            out[gv] = _FloatForms(mod, fn).visit_expr(fn)
    return relax.transform.DeadCodeElimination()(out)
