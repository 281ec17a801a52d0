"""Quantization: a region's operators as the graph states them become integer operators.

Float operators get symmetric per-output-channel weights of ``w_bits`` and activations of
``a_bits``, unsigned where calibration never saw a negative input (after a ReLU) and
signed otherwise, with scales from the calibration ranges. Quantized (QDQ) and integer
operators keep the codes and scales their graph states. Every rounding and clamping comes
from ``tvm_cim.core.quant``, the definition the simulator and training share.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import W8A8, Bits
from tvm_cim.core.quant import activation_scale, quant_range, quantize, weight_qmax, weight_scales

from .layers import CimOp, Codes, Region
from .mapping import placeholder_weight

#: Calibration ranges: each float operator's input ``(min, max)``, by operator name (the
#: stored operand of an activation-activation matmul under ``stored_range_key``).
Ranges = dict[str, tuple[float, float]]


def stored_range_key(name: str) -> str:
    """The calibration key of the stored operand of matmul ``name``."""
    return f"{name}/stored"


def code_bits(codes: np.ndarray) -> int:
    """Fewest signed bits holding every value of ``codes``."""
    lo, hi = int(codes.min(initial=0)), int(codes.max(initial=0))
    bits = 1
    while not (quant_range(bits, True)[0] <= lo and hi <= quant_range(bits, True)[1]):
        bits += 1
    return bits


def _input_codes(op: CimOp, bits: Bits | None, ranges: Ranges | None) -> Codes:
    a_bits = None if bits is None else bits.a_bits
    return _activation_codes(op.name, op.input, a_bits, ranges, op.name, "a_bits", False)


def _stored_codes(op: CimOp, bits: Bits | None, ranges: Ranges | None) -> Codes:
    """The codes of a matmul's stored operand: ``w_bits`` wide."""
    w_bits = None if bits is None else bits.w_bits
    key = stored_range_key(op.name)
    return _activation_codes(op.name, op.stored.codes, w_bits, ranges, key, "w_bits", True)


def _activation_codes(
    name: str,
    stated: Codes | None,
    bits: int | None,
    ranges: Ranges | None,
    key: str,
    what: str,
    cost_signed: bool,
) -> Codes:
    """Codes of an activation: those the graph states (at ``bits`` when given), else from
    the calibration range under ``key`` (``bits`` or 8; ``what`` names the width in
    errors); a cost-only lowering needs no scale, and takes ``cost_signed`` codes for real
    values."""
    if stated is not None:
        codes = stated if bits is None else replace(stated, bits=bits)
        if ranges is None and codes.scale is None:  # cost only: any scale gives the stream
            codes = replace(codes, scale=1.0)
        return codes
    bits = bits or W8A8.a_bits
    if ranges is None:  # cost only: the scale does not change the instruction stream
        return Codes(bits, cost_signed, 1.0, 0)
    if key not in ranges:
        raise CimError(
            f"{name}: a float operator needs calibration data (or a QDQ model) to set its "
            f"activation scale"
        )
    lo, hi = ranges[key]
    signed = lo < 0
    if signed and bits < 2:
        raise CimError(f"{name}: signed activations need at least 2 bits, got {what}={bits}")
    return Codes(bits, signed, activation_scale(max(abs(lo), abs(hi)), bits, signed), 0)


def _quantize_act_matmul(op: CimOp, bits: Bits | None, ranges: Ranges | None) -> CimOp:
    """An activation-activation matmul: both operands' codes, no weight."""
    x = _input_codes(op, bits, ranges)
    stored = _stored_codes(op, bits, ranges)
    if (x.scale is None) != (stored.scale is None):
        raise CimError(f"{op.name}: mixes integer and real-valued operands")
    if stored.bits > 8 or x.bits > 8:
        raise CimError(f"{op.name}: operand codes of {stored.bits} and {x.bits} bits; 1..8 map")
    return replace(op, input=x, w_bits=stored.bits, stored=replace(op.stored, codes=stored))


def _weight_bits(op: CimOp, bits: Bits | None) -> int:
    """The weight width: the precision's, else W8A8 for real weights, and for codes the
    width the graph states (``op.w_bits``, from a clip of the codes) or the codes' own."""
    if op.is_float:
        return (bits or W8A8).w_bits
    if bits is not None:
        return bits.w_bits
    return code_bits(op.weight) if op.w_bits is None else op.w_bits


def _weights(op: CimOp, bits: Bits | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    w_bits = _weight_bits(op, bits)
    if op.is_float:
        if w_bits < 2:
            raise CimError(f"{op.name}: symmetric weights need at least 2 bits, got w_bits=1")
        scale = weight_scales(op.weight, w_bits, axis=-1)
        qmax = weight_qmax(w_bits)
        codes = quantize(op.weight, scale, 0, w_bits, True, dtype=np.int8)
        np.clip(codes, -qmax, qmax, out=codes)
        return codes, scale, w_bits
    needed = code_bits(op.weight)
    if needed > w_bits:
        raise CimError(
            f"{op.name}: its weight codes need {needed} bits but the precision says w_bits={w_bits}"
        )
    if w_bits > 8:
        raise CimError(f"{op.name}: weight codes need {w_bits} bits; at most 8 are supported")
    return op.weight, op.weight_scale, w_bits


def _placeholder_weights(op: CimOp, bits: Bits | None):
    k, n = op.weight.shape
    return placeholder_weight(k, n), np.ones(n, np.float32), _weight_bits(op, bits)


def quantize_op(op: CimOp, bits: Bits | None, ranges: Ranges | None) -> CimOp:
    """The integer form of one operator as the graph states it.

    Parameters
    ----------
    op
        The operator as the graph reader filled it.
    bits
        Its widths, or None for the graph's own codes (W8A8 for a float operator).
    ranges
        Calibration ranges; None lowers for cost only, with a placeholder weight that
        takes no memory and gives the same instruction stream.

    Raises
    ------
    CimError
        A float operator without a calibration range, or widths its codes do not fit,
        naming the operator.
    """
    if op.stored is not None:
        return _quantize_act_matmul(op, bits, ranges)
    if ranges is None:
        codes, scale, w_bits = _placeholder_weights(op, bits)
    else:
        codes, scale, w_bits = _weights(op, bits)
    x = _input_codes(op, bits, ranges)
    if (x.scale is None) != (scale is None):
        raise CimError(f"{op.name}: mixes integer and real-valued operands")
    int_bias = -int(x.zero_point) * codes.sum(axis=0, dtype=np.int64) if x.zero_point else None
    return replace(op, weight=codes, w_bits=w_bits, input=x, weight_scale=scale, int_bias=int_bias)


def quantize_region(region: Region, bits: dict[str, Bits | None], ranges: Ranges | None) -> Region:
    """``region`` with every operator in integer form (see ``quantize_op``).

    ``bits`` maps operator names to their widths; a name it lacks takes the graph's codes.
    """
    ops = [quantize_op(op, bits.get(op.name), ranges) for op in region.ops]
    return replace(region, ops=ops, outputs=list(region.outputs))
