"""Integer quantization semantics against exact Python-integer references."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_cim.core import quant
from tvm_cim.core.quant import (
    MAX_SHIFT,
    Requantize,
    adc_read,
    dac_chunk,
    quant_range,
    requantize,
    rounding_right_shift,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
int64s = st.integers(INT64_MIN, INT64_MAX)
shifts = st.integers(0, MAX_SHIFT)


def ref_shift(x: int, shift: int) -> int:
    """``x / 2**shift`` rounded half to even, exactly (``round`` of a Fraction)."""
    return round(Fraction(x, 1 << shift))


def interesting_values() -> list[int]:
    """Ties, neighbours of ties, powers of two and the int64 ends, both signs."""
    values = set(range(-70, 71))
    for s in range(64):
        for base in (1 << s, 3 << s, (1 << s) - 1, (1 << s) + 1, 5 << s):
            values.update((base, -base))
    values.update((INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1))
    return sorted(v for v in values if INT64_MIN <= v <= INT64_MAX)


VALUES = np.array(interesting_values(), dtype=np.int64)


# ------------------------------------------------------- rounding_right_shift


@pytest.mark.parametrize("shift", range(MAX_SHIFT + 1))
def test_rounding_right_shift_against_fractions(shift):
    got = rounding_right_shift(VALUES, shift)
    assert got.dtype == np.int64
    expected = [ref_shift(int(v), shift) for v in VALUES]
    assert got.tolist() == expected


def test_rounding_right_shift_ties_go_to_even():
    x = np.array([1, 3, 5, 7, -1, -3, -5, -7, 2, 6, -2, -6], dtype=np.int64)
    assert rounding_right_shift(x, 1).tolist() == [0, 2, 2, 4, 0, -2, -2, -4, 1, 3, -1, -3]
    # round() on floats follows the same rule, and numpy.round too
    assert rounding_right_shift(x, 1).tolist() == [round(v / 2) for v in x.tolist()]
    assert rounding_right_shift(x, 1).tolist() == np.round(x / 2).astype(int).tolist()
    x = np.array([6, 10, 14, -6, -10, -14, 12, 13], dtype=np.int64)  # x / 4
    assert rounding_right_shift(x, 2).tolist() == [2, 2, 4, -2, -2, -4, 3, 3]


def test_rounding_right_shift_array_shifts():
    """Per-element shifts, including a mix of zero and non-zero ones."""
    rng = np.random.default_rng(0)
    x = rng.integers(INT64_MIN, INT64_MAX, size=(50, 8), dtype=np.int64, endpoint=True)
    s = rng.integers(0, MAX_SHIFT + 1, size=8)
    s[0] = 0
    got = rounding_right_shift(x, s)
    expected = [[ref_shift(int(v), int(k)) for v, k in zip(row, s)] for row in x]
    assert got.tolist() == expected
    col = np.array([0, 1, 2, 62])[:, None]
    assert rounding_right_shift(np.array([[5, -5]]), col).tolist() == [
        [5, -5],
        [2, -2],
        [1, -1],
        [0, 0],
    ]


def test_rounding_right_shift_zero_returns_a_copy():
    x = np.array([1, -2, 3], dtype=np.int64)
    y = rounding_right_shift(x, 0)
    assert y.tolist() == [1, -2, 3] and y is not x
    y[0] = 9
    assert x[0] == 1
    assert rounding_right_shift(x, np.zeros(3, dtype=np.int64)).tolist() == [1, -2, 3]


@given(x=int64s, shift=shifts)
def test_rounding_right_shift_property(x, shift):
    assert int(rounding_right_shift(np.int64(x), shift)) == ref_shift(x, shift)


@given(x=st.lists(int64s, min_size=1, max_size=20), shift=st.lists(shifts, min_size=1, max_size=1))
def test_rounding_right_shift_vector_property(x, shift):
    got = rounding_right_shift(np.array(x, dtype=np.int64), np.array(shift))
    assert got.tolist() == [ref_shift(v, shift[0]) for v in x]


# ---------------------------------------------------------------- quant_range


@pytest.mark.parametrize("bits", range(1, 64))
def test_quant_range(bits):
    assert quant_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert quant_range(bits, False) == (0, 2**bits - 1)
    lo, hi = quant_range(bits, True)
    assert hi - lo + 1 == 2**bits


def test_quant_range_small():
    assert quant_range(1, True) == (-1, 0)
    assert quant_range(1, False) == (0, 1)
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)


# ------------------------------------------------------------------- dac_chunk


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("dac_bits", range(1, 9))
@pytest.mark.parametrize("a_bits", range(1, 9))
def test_dac_chunks_rebuild_the_input(a_bits, dac_bits, signed):
    lo, hi = quant_range(a_bits, signed)
    x = np.arange(lo, hi + 1, dtype=np.int64)
    steps = -(-a_bits // dac_bits)
    total = np.zeros_like(x)
    for step in range(steps):
        top = signed and step == steps - 1
        chunk = dac_chunk(x, step * dac_bits, dac_bits, top)
        clo, chi = quant_range(dac_bits, top)
        assert clo <= chunk.min() and chunk.max() <= chi
        # a plain chunk is the bits themselves
        if not top:
            assert np.array_equal(chunk, (x >> (step * dac_bits)) & ((1 << dac_bits) - 1))
        total += chunk << (step * dac_bits)
    assert np.array_equal(total, x)


def test_dac_chunk_examples():
    x = np.array([-1, -2, 5, -128, 127], dtype=np.int64)
    assert dac_chunk(x, 0, 1, False).tolist() == [1, 0, 1, 0, 1]
    assert dac_chunk(x, 7, 1, True).tolist() == [-1, -1, 0, -1, 0]
    assert dac_chunk(x, 6, 2, True).tolist() == [-1, -1, 0, -2, 1]
    assert dac_chunk(np.array([0b1101]), 2, 2, False).tolist() == [0b11]


@given(x=st.integers(-(2**31), 2**31 - 1), dac_bits=st.integers(1, 8))
def test_dac_chunks_rebuild_wide_signed_values(x, dac_bits):
    steps = -(-32 // dac_bits)
    total = 0
    for step in range(steps):
        chunk = int(dac_chunk(np.int64(x), step * dac_bits, dac_bits, step == steps - 1))
        total += chunk << (step * dac_bits)
    assert total == x


# --------------------------------------------------------------------- adc_read


def ref_adc(v: int, bits: int | None, shift: int, signed: bool) -> int:
    if bits is None:
        return v
    lo, hi = quant_range(bits, signed)
    return min(max(ref_shift(v, shift), lo), hi) << shift


def test_adc_lossless_is_identity():
    v = np.array([-(10**12), -1, 0, 1, 10**12], dtype=np.int64)
    out = adc_read(v, None, 0, True)
    assert out.tolist() == v.tolist() and out is not v
    assert adc_read(v, None, 0, False).tolist() == v.tolist()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("shift", [0, 1, 2, 3, 5, 10])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_adc_read_against_reference(bits, shift, signed):
    reach = 3 << (bits + shift)  # well past saturation on both sides
    if reach <= 5000:
        v = np.arange(-reach, reach + 1, dtype=np.int64)
    else:  # every tie (odd multiple of half a step) and its neighbours
        half = np.arange(-reach >> (shift - 1), (reach >> (shift - 1)) + 1) << (shift - 1)
        v = (half[:, None] + np.array([-1, 0, 1])).ravel()
    got = adc_read(v, bits, shift, signed)
    assert got.tolist() == [ref_adc(int(x), bits, shift, signed) for x in v]


def test_adc_read_saturates_and_rounds():
    # 3-bit signed codes -4..3, step 4: -16..12
    v = np.array([-100, -18, -17, -16, -10, -6, -2, 0, 2, 6, 10, 13, 14, 100])
    assert adc_read(v, 3, 2, True).tolist() == [
        -16,
        -16,
        -16,
        -16,
        -8,
        -8,
        0,
        0,
        0,
        8,
        8,
        12,
        12,
        12,
    ]
    # 2-bit unsigned codes 0..3, step 2: 0..6; negatives clamp to 0
    v = np.array([-5, -1, 0, 1, 2, 3, 4, 5, 6, 7, 50])
    assert adc_read(v, 2, 1, False).tolist() == [0, 0, 0, 0, 2, 4, 4, 4, 6, 6, 6]


@given(
    v=st.integers(-(2**40), 2**40),
    bits=st.integers(1, 32),
    shift=st.integers(0, 20),
    signed=st.booleans(),
)
def test_adc_read_property(v, bits, shift, signed):
    assert int(adc_read(np.int64(v), bits, shift, signed)) == ref_adc(v, bits, shift, signed)


# ------------------------------------------------------------------- requantize


def ref_requant(acc, bias, mult, shift, zp, qmin, qmax) -> int:
    return min(max(ref_shift((acc + bias) * mult, shift) + zp, qmin), qmax)


@given(
    acc=st.lists(st.integers(-(2**31), 2**31), min_size=1, max_size=6),
    bias=st.integers(-(2**20), 2**20),
    mult=st.integers(-(2**31), 2**31 - 1),
    shift=shifts,
    zp=st.integers(-(2**15), 2**15 - 1),
    bits=st.integers(1, 31),
    signed=st.booleans(),
)
def test_requantize_property(acc, bias, mult, shift, zp, bits, signed):
    qmin, qmax = quant_range(bits, signed)
    got = requantize(np.array(acc), np.int64(bias), np.int64(mult), np.int64(shift), zp, qmin, qmax)
    assert got.tolist() == [ref_requant(a, bias, mult, shift, zp, qmin, qmax) for a in acc]


def test_requantize_per_channel():
    rng = np.random.default_rng(3)
    acc = rng.integers(-(10**6), 10**6, size=(20, 5))
    bias = np.array([0, 1, -7, 1000, -1000])
    mult = np.array([1, 3, 12345, 1 << 20, -(1 << 10)])
    shift = np.array([0, 1, 14, 26, 9])
    got = requantize(acc, bias, mult, shift, -3, -128, 127)
    expected = [
        [
            ref_requant(int(a), int(b), int(m), int(s), -3, -128, 127)
            for a, b, m, s in zip(row, bias, mult, shift)
        ]
        for row in acc
    ]
    assert got.tolist() == expected
    assert got.min() == -128 and got.max() == 127  # both ends clamp


@pytest.mark.parametrize(
    "rq",
    [
        Requantize(multiplier=3, shift=4),
        Requantize(multiplier=3, shift=4, zero_point=7, relu=True),
        Requantize(
            multiplier=[1, 2, 3], shift=[0, 1, 2], zero_point=-5, out_bits=6, signed=True, relu=True
        ),
        Requantize(
            multiplier=np.array([1 << 30] * 3),
            shift=31,
            bias=[10, -10, 0],
            out_bits=16,
            signed=True,
        ),
        Requantize(multiplier=1, shift=0, out_bits=1, signed=True),
    ],
)
def test_requantize_class(rq):
    rng = np.random.default_rng(4)
    acc = rng.integers(-5000, 5000, size=(30, 3))
    qmin, qmax = quant_range(rq.out_bits, rq.signed)
    if rq.relu:
        qmin = max(qmin, rq.zero_point)
    assert rq.clamp_range() == (qmin, qmax)
    table = rq.params(3)
    assert table.shape == (3, 3) and table.dtype == np.int64
    b, m, s = (np.broadcast_to(np.asarray(v), (3,)) for v in (rq.bias, rq.multiplier, rq.shift))
    assert table.tolist() == [b.tolist(), m.tolist(), s.tolist()]
    got = rq.apply(acc)
    expected = [
        [
            ref_requant(int(a), int(b[c]), int(m[c]), int(s[c]), rq.zero_point, qmin, qmax)
            for c, a in enumerate(row)
        ]
        for row in acc
    ]
    assert got.tolist() == expected
    assert got.min() >= qmin and got.max() <= qmax


def test_relu_clamps_at_the_zero_point():
    rq = Requantize(multiplier=1, shift=0, zero_point=10, out_bits=8, relu=True)
    assert rq.apply(np.array([[-50, -10, 0, 5, 300]])).tolist() == [[10, 10, 10, 15, 255]]


def test_arithmetic_wraps_like_int64():
    """Overflow wraps (what the compiled core does); no exception, no float rounding."""
    big = np.array([INT64_MAX], dtype=np.int64)
    with np.errstate(over="ignore"):
        got = requantize(big, np.int64(1), np.int64(1), np.int64(0), 0, INT64_MIN, INT64_MAX)
    assert got.tolist() == [INT64_MIN]
    assert rounding_right_shift(np.array([INT64_MIN]), 62).tolist() == [-2]
    assert rounding_right_shift(np.array([INT64_MAX]), 62).tolist() == [2]
    assert quant.MAX_SHIFT == 62
