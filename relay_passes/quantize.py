"""Quantization rewrite: graph operators become the codegen's integer operators.

Float operators get symmetric per-output-channel weights of ``w_bits`` and activations of
``a_bits``, unsigned where calibration never saw a negative input (after a ReLU) and
signed otherwise, with scales from the calibration ranges. Quantized (QDQ) and integer
operators keep the codes and scales their graph states. Every rounding and clamping comes
from ``tvm_cim.core.quant``, the definition the simulator and training share.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import W8A8, Bits
from tvm_cim.core.quant import activation_scale, quant_range, quantize, weight_qmax, weight_scales

from ..codegen.layers import CimOp, Codes, Region
from ..codegen.mapping import placeholder_weight
from .extract import GraphOp, GraphRegion


def code_bits(codes: np.ndarray) -> int:
    """Fewest signed bits holding every value of ``codes``."""
    lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
    bits = 1
    while not (quant_range(bits, True)[0] <= lo and hi <= quant_range(bits, True)[1]):
        bits += 1
    return bits


def _input_codes(op: GraphOp, bits: Bits | None, ranges: dict | None) -> Codes:
    if op.input_codes is not None:
        if bits is None:
            return op.input_codes
        return Codes(
            bits.a_bits, op.input_codes.signed, op.input_codes.scale, op.input_codes.zero_point
        )
    a_bits = (bits or W8A8).a_bits
    if ranges is None:  # cost only: the scale does not change the instruction stream
        return Codes(a_bits, False, 1.0, 0)
    if op.name not in ranges:
        raise CimError(
            f"{op.name}: a float operator needs calibration data (or a QDQ model) to set its "
            f"activation scale"
        )
    lo, hi = ranges[op.name]
    signed = lo < 0
    if signed and a_bits < 2:
        raise CimError(f"{op.name}: signed activations need at least 2 bits, got a_bits={a_bits}")
    return Codes(a_bits, signed, activation_scale(max(abs(lo), abs(hi)), a_bits, signed), 0)


def _weights(op: GraphOp, bits: Bits | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    if op.weight_float is not None:
        w_bits = (bits or W8A8).w_bits
        if w_bits < 2:
            raise CimError(f"{op.name}: symmetric weights need at least 2 bits, got w_bits=1")
        scale = weight_scales(op.weight_float, w_bits, axis=-1)
        qmax = weight_qmax(w_bits)
        codes = quantize(op.weight_float, scale, 0, w_bits, True, dtype=np.int8)
        np.clip(codes, -qmax, qmax, out=codes)
        return codes, scale, w_bits
    needed = code_bits(op.weight_codes)
    w_bits = needed if bits is None else bits.w_bits
    if needed > w_bits:
        raise CimError(
            f"{op.name}: its weight codes need {needed} bits but the precision says w_bits={w_bits}"
        )
    if w_bits > 8:
        raise CimError(f"{op.name}: weight codes need {w_bits} bits; at most 8 are supported")
    return op.weight_codes, op.weight_scale, w_bits


def _placeholder_weights(op: GraphOp, bits: Bits | None):
    if op.weight_float is not None:
        k, n = op.weight_float.shape
        w_bits = (bits or W8A8).w_bits
    else:
        k, n = op.weight_codes.shape
        w_bits = code_bits(op.weight_codes) if bits is None else bits.w_bits
    return placeholder_weight(k, n), np.ones(n, np.float32), w_bits


def to_cim_op(op: GraphOp, bits: Bits | None, ranges: dict | None) -> CimOp:
    """The integer form of one graph operator; ``ranges`` None lowers for cost only."""
    if ranges is None:
        codes, scale, w_bits = _placeholder_weights(op, bits)
    else:
        codes, scale, w_bits = _weights(op, bits)
    x = _input_codes(op, bits, ranges)
    if ranges is None and x.scale is None:
        x = Codes(x.bits, x.signed, 1.0, x.zero_point)
    if (x.scale is None) != (scale is None):
        raise CimError(f"{op.name}: mixes integer and real-valued operands")
    int_bias = -int(x.zero_point) * codes.sum(axis=0, dtype=np.int64) if x.zero_point else None
    return CimOp(
        name=op.name,
        kind=op.kind,
        source=op.source,
        weight=codes,
        w_bits=w_bits,
        input=x,
        weight_scale=scale,
        int_bias=int_bias,
        real_bias=op.real_bias,
        relu=op.relu,
        output=op.output,
        conv=op.conv,
        in_shape=op.in_shape,
        out_shape=op.out_shape,
    )


def quantize_region(
    region: GraphRegion, bits: dict[str, Bits | None], ranges: dict | None
) -> Region:
    """``Region`` of integer operators.

    ``ranges`` maps float operators to their input (min, max); None lowers for cost only,
    with placeholder weights that take no memory and give the same instruction stream.
    """
    ops = [to_cim_op(op, bits.get(op.name), ranges) for op in region.ops]
    return Region(region.name, region.params, ops, list(region.outputs))
