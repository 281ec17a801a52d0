"""Integer quantization semantics, defined once for the whole project.

Rounding, clamping, requantization, the bit-serial input chunks a DAC applies and the
per-read ADC quantization live here and nowhere else: the simulator (both backends),
the codegen and training-time fake quantization all call these functions, so what a
model computes in training is what the crossbars compute.

Every integer function works on numpy integer arrays and wraps like two's-complement int64
arithmetic on overflow (the Cython simulator core reproduces exactly that).
Rounding is round-half-to-even everywhere, the rule of ``numpy.round`` and
``torch.round``. The scale rules (``weight_scales``, ``activation_scale``) are written over
the array API (``array-api-compat``), so QAT's torch tensors get the very float32 scales
the compiler computes with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj, is_numpy_namespace

#: Largest right shift a requantization or ADC read may use; keeps every shift
#: well-defined for int64 arithmetic.
MAX_SHIFT = 62


def quant_range(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Smallest and largest integer of a ``bits``-wide (un)signed code; ``narrow`` drops
    the most negative signed code (a range symmetric about zero) or the largest unsigned
    one, as Brevitas and QONNX define narrow range."""
    if signed:
        return -(1 << (bits - 1)) + int(narrow), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1 - int(narrow)


def rounding_right_shift(x: np.ndarray, shift) -> np.ndarray:
    """``x / 2**shift`` rounded half to even, for int64 ``x`` and shifts in 0..62.

    ``shift`` is a scalar or an array that broadcasts against ``x``.
    """
    x = np.asarray(x, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if not shift.any():
        return x.copy()
    floor = x >> shift
    remainder = x - (floor << shift)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), np.int64(1) << 62)
    round_up = (remainder > half) | ((remainder == half) & ((floor & 1) == 1))
    return floor + round_up.astype(np.int64)


def dac_chunk(x: np.ndarray, bit: int, dac_bits: int, signed: bool) -> np.ndarray:
    """The ``dac_bits``-wide chunk of ``x`` starting at ``bit``, as a DAC drives it.

    Unsigned chunks are the plain bits. A signed chunk (the top step of a
    two's-complement input) sign-extends its top bit, so summing
    ``chunk << bit`` over all steps rebuilds the signed input exactly.
    """
    mask = (1 << dac_bits) - 1
    chunk = (np.asarray(x, dtype=np.int64) >> bit) & mask
    if signed:
        chunk = chunk - (((chunk >> (dac_bits - 1)) & 1) << dac_bits)
    return chunk


def adc_read(values: np.ndarray, adc_bits: int | None, shift: int, signed: bool) -> np.ndarray:
    """One ADC conversion of column sums, in the units of the column sums.

    A lossless ADC (``adc_bits=None``) returns the sums. A finite ADC divides by
    ``2**shift`` (its step, chosen by the compiler from the column's range), rounds
    half to even, saturates to its ``adc_bits`` code range and scales back.
    """
    values = np.asarray(values, dtype=np.int64)
    if adc_bits is None:
        return values.copy()
    lo, hi = quant_range(adc_bits, signed)
    codes = np.clip(rounding_right_shift(values, shift), lo, hi)
    return codes << np.int64(shift)


def requantize(
    acc: np.ndarray,
    bias: np.ndarray,
    multiplier: np.ndarray,
    shift: np.ndarray,
    zero_point: int,
    qmin: int,
    qmax: int,
) -> np.ndarray:
    """Fixed-point requantization of int64 accumulators, per output channel.

    ``clamp(round((acc + bias) * multiplier / 2**shift) + zero_point, qmin, qmax)``,
    where ``bias``, ``multiplier`` and ``shift`` broadcast along the last axis.
    """
    acc = np.asarray(acc, dtype=np.int64)
    scaled = (acc + np.asarray(bias, dtype=np.int64)) * np.asarray(multiplier, dtype=np.int64)
    rounded = rounding_right_shift(scaled, shift) + np.int64(zero_point)
    return np.clip(rounded, qmin, qmax)


@dataclass(frozen=True)
class Requantize:
    """How integer accumulators become the next operator's integer inputs.

    Attributes
    ----------
    multiplier, shift
        Per-output-channel fixed-point scale ``multiplier / 2**shift``
        (``multiplier`` fits int32, ``shift`` in 0..62); scalars broadcast.
    zero_point
        Added after scaling.
    out_bits, signed
        Code range of the result.
    relu
        Clamp below at the zero point as well.
    bias
        Per-channel integer bias added to the accumulator before scaling.
    """

    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zero_point: int = 0
    out_bits: int = 8
    signed: bool = False
    relu: bool = False
    bias: np.ndarray | int = 0

    def clamp_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` after ReLU."""
        qmin, qmax = quant_range(self.out_bits, self.signed)
        if self.relu:
            qmin = max(qmin, self.zero_point)
        return qmin, qmax

    def params(self, channels: int) -> np.ndarray:
        """The ``[3, channels]`` int64 table of bias, multiplier and shift."""
        table = np.empty((3, channels), dtype=np.int64)
        for row, value in enumerate((self.bias, self.multiplier, self.shift)):
            table[row] = np.broadcast_to(np.asarray(value, dtype=np.int64), (channels,))
        return table

    def apply(self, acc: np.ndarray) -> np.ndarray:
        """Requantize ``acc`` (``[..., channels]``) with these parameters."""
        bias, multiplier, shift = self.params(np.shape(acc)[-1])
        return requantize(acc, bias, multiplier, shift, self.zero_point, *self.clamp_range())


def quantize(
    x: np.ndarray, scale, zero_point: int, bits: int, signed: bool, dtype=np.int64
) -> np.ndarray:
    """Real values to integer codes: ``clamp(round(x / scale) + zero_point)``.

    The division happens in float32, as in the graph's ``quantize`` and in training-time
    fake quantization; rounding is half to even. Clamping happens before the cast to
    ``dtype``, so out-of-range values saturate instead of wrapping.
    """
    qmin, qmax = quant_range(bits, signed)
    codes = np.round(np.asarray(x, dtype=np.float32) / np.asarray(scale, dtype=np.float32))
    codes += np.float32(zero_point)
    np.clip(codes, qmin, qmax, out=codes)
    return codes.astype(dtype)


def weight_qmax(bits: int) -> int:
    """Largest code of a symmetric ``bits``-wide weight: ``2**(bits-1) - 1``.

    Symmetric weights keep ``-qmax..qmax`` (the code ``-2**(bits-1)`` stays unused) so
    that negating a weight never overflows; they therefore need at least 2 bits.
    """
    if bits < 2:
        raise ValueError("symmetric weights need at least 2 bits")
    return (1 << (bits - 1)) - 1


def _namespace(x):
    """The array namespace of ``x``: its own for arrays and tensors, numpy's for numbers."""
    return array_namespace(x) if is_array_api_obj(x) else array_namespace(np.empty(0))


def _scale_of_absmax(xp, absmax, qmax: int):
    """``absmax / qmax`` in float32, and 1 wherever that is not positive.

    This is the scale rule of weights and activations alike. A tensor that is all zero (or
    was always zero in calibration) quantizes to code 0 at any scale; 1 keeps the bias grid
    (input scale times weight scale) as coarse as a unit scale, so biases still fit the
    int32 accumulator, where a tiny scale would saturate them.
    """
    scale = xp.asarray(absmax, dtype=xp.float32) / xp.asarray(qmax, dtype=xp.float32)
    return xp.where(scale > 0, scale, xp.ones_like(scale))


def weight_scales(weight, bits: int, axis: int = -1):
    """Per-output-channel scales of symmetric ``bits``-wide weights.

    The one definition of a weight scale, for numpy arrays and torch tensors alike (QAT
    calls it on its weights): ``max|w| / weight_qmax(bits)`` per channel in float32, and 1
    for an all-zero channel.

    Parameters
    ----------
    weight
        Weights with output channels along ``axis``: a numpy array or a torch tensor
        (detached).
    bits
        Weight width, at least 2.
    axis
        Axis of the output channels.

    Returns
    -------
    numpy.ndarray or torch.Tensor
        float32 scales, one per output channel, of the input's kind.
    """
    xp = _namespace(weight)
    w = xp.moveaxis(xp.asarray(weight, dtype=xp.float32), axis, -1)
    absmax = xp.max(xp.abs(xp.reshape(w, (-1, w.shape[-1]))), axis=0)
    return _scale_of_absmax(xp, absmax, weight_qmax(bits))


def activation_scale(absmax, bits: int, signed: bool):
    """Scale mapping ``[-absmax, absmax]`` (or ``[0, absmax]``) onto ``bits``-wide codes.

    The one definition of an activation scale, for numbers and torch tensors alike (QAT
    calls it on its running maximum): ``absmax / qmax`` in float32, where ``qmax`` is the
    largest code (1 for signed 1-bit codes, whose only non-zero code is -1), and 1 when
    ``absmax`` is not positive (an activation that was always 0).

    Parameters
    ----------
    absmax
        Largest magnitude seen: a number or a 0-d torch tensor.
    bits, signed
        Code width and signedness.

    Returns
    -------
    float or torch.Tensor
        A Python float for a number or numpy value, a 0-d float32 tensor for a tensor.
    """
    xp = _namespace(absmax)
    scale = _scale_of_absmax(xp, absmax, max(quant_range(bits, signed)[1], 1))
    return float(scale) if is_numpy_namespace(xp) else scale


def fixed_point(real: np.ndarray, precision_bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """``(multiplier, shift)`` with ``multiplier / 2**shift`` closest to each ``real`` value.

    Multipliers are below ``2**precision_bits`` and shifts in 0..MAX_SHIFT; a value too
    small for the shift range becomes 0, one too large saturates the multiplier.
    """
    real = np.asarray(real, dtype=np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ValueError("requantization scales must be finite and non-negative")
    mantissa, exponent = np.frexp(real)  # real = mantissa * 2**exponent, mantissa in [0.5, 1)
    shift = np.clip(precision_bits - exponent, 0, MAX_SHIFT).astype(np.int64)
    multiplier = np.round(np.ldexp(real, shift)).astype(np.int64)
    limit = (1 << precision_bits) - 1
    multiplier = np.where(real == 0, 0, np.minimum(multiplier, limit))
    return multiplier.astype(np.int64), np.where(real == 0, 0, shift).astype(np.int64)
