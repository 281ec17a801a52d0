"""QONNX models (``Quant`` nodes with a bit-width input, as FINN and Brevitas write them) as
the QuantizeLinear -> Clip -> DequantizeLinear graphs TVM's ONNX frontend imports.

The conversion is qonnx's own (``QuantToQCDQ``); qonnx is imported only for a model that
has QONNX nodes, and is an optional dependency (``pip install tvm-cim[qonnx]``).
"""

from __future__ import annotations

from pathlib import Path

from tvm_cim.core.errors import CimError
from tvm_cim.core.quant import quant_range

#: ONNX domains of QONNX's quantization operators (``Quant``, ``BipolarQuant``, ``Trunc``).
QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")


def from_qonnx(model, path: Path):
    """``model`` with its QONNX ``Quant`` nodes as QuantizeLinear -> Clip -> DequantizeLinear.

    qonnx converts ``Quant`` nodes of 2..8 bits with a zero zero point; the quantize of a
    constant weight is then folded into integer codes, as a QCDQ export writes them. A
    wider ``Quant`` of a constant bias is folded into the real bias it computes. A
    ``Trunc`` becomes standard operators (``_truncs_as_standard_ops``). Any other QONNX node
    (``BipolarQuant``, a ``Quant`` or ``Trunc`` that cannot be converted) is refused with
    its name.
    """
    if not any(node.domain in QONNX_DOMAINS for node in model.graph.node):
        return model
    try:
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.fold_constants import FoldConstants, FoldConstantsFiltered
        from qonnx.transformation.infer_shapes import InferShapes
        from qonnx.transformation.qonnx_to_qcdq import QuantToQCDQ
    except ImportError:
        raise CimError(
            f"{path} is a QONNX model (Quant nodes); reading it needs the qonnx package "
            "(pip install qonnx)"
        ) from None
    _quant_defaults(model)
    kept = ["Quant", "BipolarQuant", "Trunc", "QuantizeLinear", "DequantizeLinear"]
    wrapper = ModelWrapper(model).transform(InferShapes()).transform(FoldConstants(kept))
    wrapper = _truncs_as_standard_ops(_constants_as_initializers(wrapper))
    wrapper = _constants_as_initializers(wrapper.transform(QuantToQCDQ()))
    wrapper = wrapper.transform(InferShapes())

    def foldable(wrapper, node):  # of those whose inputs are all constants
        if node.op_type == "QuantizeLinear":  # the codes of a constant weight
            return True
        return node.op_type == "Quant" and _is_bias(wrapper, node)

    wrapper = wrapper.transform(FoldConstantsFiltered(foldable))
    for index, node in enumerate(wrapper.graph.node):
        if node.domain in QONNX_DOMAINS:
            name = node.name or f"#{index}"
            raise CimError(f"{path}: QONNX node {name!r} {_qonnx_refusal(wrapper, node)}")
    return wrapper.model


#: Trunc's rounding modes and the ONNX operator that rounds the same way.
_ROUNDING_OPS = {"ROUND": "Round", "HALF_EVEN": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}


class _Subgraph:
    """ONNX nodes and constants written in place of one node, with names prefixed by it."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.constants = prefix, [], {}

    def const(self, name: str, value, dtype=None) -> str:
        import numpy as np

        self.constants[f"{self.prefix}_{name}"] = np.asarray(value, dtype=dtype or np.float32)
        return f"{self.prefix}_{name}"

    def op(self, op_type: str, inputs: list, name: str, outputs: list | None = None) -> str:
        from onnx import helper

        outputs = outputs or [f"{self.prefix}_{name}"]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0]))
        return outputs[0]


def _trunc_subgraph(wrapper, node) -> _Subgraph | None:
    """The standard operators computing ``node`` (a Trunc), or None if they cannot."""
    import numpy as np
    from onnx import helper

    values = [wrapper.get_initializer(i) for i in node.input[1:]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("rounding_mode", b"FLOOR")
    mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
    if any(v is None for v in values) or mode not in _ROUNDING_OPS:
        return None
    if len(values) == 5:  # version 2: ..., output scale, output bit width
        scale, zero_point, _, out_scale, out_bits = values
        trunc_scale = 2.0 ** np.round(np.log2(out_scale / scale))
        real_scale, out_zero = out_scale, np.asarray(zero_point) / trunc_scale
    else:  # version 1: ..., input bit width, output bit width; no clamp
        scale, zero_point, in_bits, out_bits = values
        trunc_scale = 2.0 ** (in_bits - out_bits)
        out_scale, real_scale, out_zero = None, scale, zero_point
    signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
    bits = int(np.asarray(out_bits).reshape(-1)[0])
    lo, hi = quant_range(bits, signed, narrow)

    g = _Subgraph(f"{node.name or node.output[0]}_as_onnx")
    codes = g.op("Div", [node.input[0], g.const("scale", scale)], "div")
    codes = g.op("Round", [g.op("Add", [codes, g.const("zp", zero_point)], "add")], "round")
    codes = g.op("Div", [codes, g.const("trunc_scale", trunc_scale)], "shift")
    if out_scale is not None:
        codes = g.op("Clip", [codes, g.const("lo", lo), g.const("hi", hi)], "clamp")
    codes = g.op(_ROUNDING_OPS[mode], [codes], "rounded")
    qdq = (
        out_scale is not None
        and np.all(np.asarray(zero_point) == 0)
        and np.asarray(out_scale).size == 1
        and bits <= 8
    )
    if qdq:
        code_type = np.int8 if signed else np.uint8
        s, z = g.const("s", np.asarray(out_scale).reshape(())), g.const("z", 0, code_type)
        q = g.op("QuantizeLinear", [g.op("Mul", [codes, s], "real"), s, z], "q")
        q = g.op("Clip", [q, g.const("qlo", lo, code_type), g.const("qhi", hi, code_type)], "qclip")
        g.op("DequantizeLinear", [q, s, z], "dq", outputs=list(node.output))
    else:
        centred = g.op("Sub", [codes, g.const("out_zp", out_zero)], "centred")
        g.op("Mul", [centred, g.const("s", real_scale)], "out", outputs=list(node.output))
    return g


def _truncs_as_standard_ops(wrapper):
    """Every ``Trunc`` whose parameters are constants as standard ONNX operators.

    A Trunc (Brevitas's ``TruncAvgPool2d`` writes one after an ``AveragePool``) takes the
    codes of its input at ``scale``, divides them by a power of two, clamps them to the
    output width (version 2, six inputs) and rounds them by its rounding mode. Version 2
    with a zero zero point, a per-tensor output scale and at most 8 output bits ends as
    QuantizeLinear -> integer Clip -> DequantizeLinear of the (integer) result, exactly
    the QCDQ form a following layer's patterns read its input width from; otherwise the
    arithmetic stays in float operators.
    """
    graph = wrapper.graph
    for node in [n for n in graph.node if n.domain in QONNX_DOMAINS and n.op_type == "Trunc"]:
        subgraph = _trunc_subgraph(wrapper, node)
        if subgraph is None:
            continue  # refused by name once the conversion is done
        for name, value in subgraph.constants.items():
            wrapper.set_initializer(name, value)
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(subgraph.nodes):
            graph.node.insert(index + offset, new)
    return wrapper


#: The attributes of a QONNX ``Quant`` and their defaults, which qonnx's rewrite needs written.
_QUANT_DEFAULTS = {"signed": 1, "narrow": 0, "rounding_mode": "ROUND"}


def _quant_defaults(model) -> None:
    """Write each ``Quant`` node's omitted attributes with their QONNX defaults."""
    from onnx import helper

    for node in model.graph.node:
        if node.domain in QONNX_DOMAINS and node.op_type == "Quant":
            present = {a.name for a in node.attribute}
            for name, value in _QUANT_DEFAULTS.items():
                if name not in present:
                    node.attribute.append(helper.make_attribute(name, value))


def _constants_as_initializers(wrapper):
    """``Constant`` nodes (the scales and bounds qonnx writes) as initializers."""
    from onnx import numpy_helper

    for node in [n for n in wrapper.graph.node if n.op_type == "Constant"]:
        values = [a.t for a in node.attribute if a.name == "value"]
        if values:
            wrapper.set_initializer(node.output[0], numpy_helper.to_array(values[0]))
            wrapper.graph.node.remove(node)
    return wrapper


def _is_bias(wrapper, node) -> bool:
    """Every reader of ``node`` takes it as the bias of a Conv or Gemm."""
    readers = wrapper.find_consumers(node.output[0]) or []
    return bool(readers) and all(
        r.op_type in ("Conv", "Gemm") and list(r.input).index(node.output[0]) == 2 for r in readers
    )


def _qonnx_refusal(wrapper, node) -> str:
    """Why a QONNX node stays unconverted, in words."""
    if node.op_type == "BipolarQuant":
        return "is a BipolarQuant (1-bit +-1 codes), which has no QuantizeLinear form"
    if node.op_type == "Trunc":
        return "is a Trunc with parameters that are not constants or an unknown rounding mode"
    if node.op_type != "Quant":
        return f"is a {node.op_type}, which is not a quantization operator ONNX defines"
    values = [wrapper.get_initializer(i) for i in node.input[1:4]]
    if any(v is None for v in values):
        return "is a Quant whose scale, zero point or bit width is not a constant"
    scale, zero_point, bits = values
    if bits.size != 1 or not 2 <= float(bits) <= 8:
        return f"is a Quant of {bits.reshape(-1)[0]:g} bits; QuantizeLinear takes 2..8"
    if (zero_point != 0).any():
        return "is a Quant with a nonzero zero point, which qonnx does not convert"
    if scale.squeeze().ndim > 1:
        return f"is a Quant with a scale of shape {list(scale.shape)}, not per tensor or channel"
    return "is a Quant that qonnx could not convert to QuantizeLinear (rounding mode?)"
