"""QONNX models (``Quant`` nodes with a bit-width input, as FINN and Brevitas write them) as
the QuantizeLinear -> Clip -> DequantizeLinear graphs TVM's ONNX frontend imports.

The conversion is qonnx's own (``QuantToQCDQ``); qonnx is imported only for a model that
has QONNX nodes, and is an optional dependency (``pip install tvm-cim[qonnx]``).
"""

from __future__ import annotations

from pathlib import Path

from tvm_cim.core.errors import CimError

#: ONNX domains of QONNX's quantization operators (``Quant``, ``BipolarQuant``, ``Trunc``).
QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")


def from_qonnx(model, path: Path):
    """``model`` with its QONNX ``Quant`` nodes as QuantizeLinear -> Clip -> DequantizeLinear.

    qonnx converts ``Quant`` nodes of 2..8 bits with a zero zero point; the quantize of a
    constant weight is then folded into integer codes, as a QCDQ export writes them. A
    wider ``Quant`` of a constant bias is folded into the real bias it computes. Any other
    QONNX node (``BipolarQuant``, ``Trunc``, a ``Quant`` qonnx cannot convert) is refused
    with its name.
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
        return "is a Trunc (a bit-width truncation), which has no QuantizeLinear form"
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
