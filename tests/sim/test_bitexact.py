"""Lowered matmuls compute exactly ``x @ W`` (lossless ADC) or a per-read ADC model.

The exhaustive grid covers every weight width, activation width, cell width, DAC
width, mapping and input signedness on a small crossbar, so that every matrix spans
several row and column tiles. The finite-ADC model below is written from the
definitions (logical cell matrix, tiling, bit-serial steps, per-read ADC, shift-add)
without using the codegen's own mapping code.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import extreme_inputs, extreme_weights, random_inputs, random_weights, simulate
from tvm_cim import CimArch, CimError
from tvm_cim.codegen import lower_matmul
from tvm_cim.core.arch import MAPPINGS
from tvm_cim.core.quant import Requantize, adc_read

BITS = range(1, 9)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------ independent model


def logical_cells(weight: np.ndarray, w_bits: int, cell_bits: int, mapping: str):
    """The logical cell matrix of ``weight`` and what each logical column means.

    Returns ``(top, bottom, recombine)``: ``top`` is ``[K, L]`` cell values, ``bottom``
    the cells of the negative rows (differential-row) or None, and ``recombine`` an
    ``[L, N]`` integer matrix: a column's reading times ``recombine[col]`` is its
    contribution to the outputs (slice significance, polarity, offset correction).
    """
    k, n = weight.shape
    slices = ceil_div(w_bits, cell_bits)
    mask = (1 << cell_bits) - 1

    def piece(values, s):
        return (values >> (s * cell_bits)) & mask

    top, bottom, terms = [], [], []  # terms: per column, a length-N row of recombine
    eye = np.eye(n, dtype=np.int64)
    if mapping == "offset":
        offset = 1 << (w_bits - 1)
        for s in range(slices):
            top.append(piece(weight + offset, s))
            terms.append(eye << (s * cell_bits))
        top.append(np.ones((k, 1), dtype=np.int64))
        terms.append(np.full((1, n), -offset, dtype=np.int64))
    elif mapping == "differential-column":
        for s in range(slices):
            for sign, part in ((1, np.maximum(weight, 0)), (-1, np.maximum(-weight, 0))):
                top.append(piece(part, s))
                terms.append(sign * (eye << (s * cell_bits)))
    else:
        for s in range(slices):
            top.append(piece(np.maximum(weight, 0), s))
            bottom.append(piece(np.maximum(-weight, 0), s))
            terms.append(eye << (s * cell_bits))
    return (
        np.hstack(top).astype(np.int64),
        np.hstack(bottom).astype(np.int64) if bottom else None,
        np.vstack(terms),
    )


def dac_step(x: np.ndarray, bit: int, dac_bits: int, sign_extend: bool) -> np.ndarray:
    """The ``dac_bits`` input bits starting at ``bit``; the top step sign-extends."""
    chunk = (x >> bit) & ((1 << dac_bits) - 1)
    if sign_extend:
        chunk = np.where(chunk >= 1 << (dac_bits - 1), chunk - (1 << dac_bits), chunk)
    return chunk


def adc_model(weight, x, *, w_bits, a_bits, signed, arch: CimArch, program) -> np.ndarray:
    """Per-read ADC quantization of every tile and input step, then shift-add.

    The ADC step (shift) and code range (signed) of each read come from the program's
    ``adc`` instructions, which appear once per tile and step; tiles are dealt to the
    crossbars round-robin, row-major, and each crossbar's reads keep that order.
    """
    top, bottom, recombine = logical_cells(weight, w_bits, arch.cell_bits, arch.mapping)
    k, width = top.shape
    rows_per_tile = arch.rows // 2 if bottom is not None else arch.rows
    steps = ceil_div(a_bits, arch.dac_bits)
    reads = [[] for _ in range(arch.crossbars)]
    for m, ops in program.instructions():
        if m == "adc":
            reads[ops["xb"]].append(ops)
    reads = [iter(on_crossbar) for on_crossbar in reads]
    tile_index = 0
    y = np.zeros((x.shape[0], weight.shape[1]), dtype=np.int64)
    for r0 in range(0, k, rows_per_tile):
        r1 = min(r0 + rows_per_tile, k)
        for c0 in range(0, width, arch.cols):
            c1 = min(c0 + arch.cols, width)
            tile = top[r0:r1, c0:c1]
            if bottom is not None:
                tile = tile - bottom[r0:r1, c0:c1]
            on_crossbar = reads[tile_index % arch.crossbars]
            tile_index += 1
            for step in range(steps):
                bit = step * arch.dac_bits
                chunk = dac_step(x[:, r0:r1], bit, arch.dac_bits, signed and step == steps - 1)
                sums = chunk @ tile
                ops = next(on_crossbar)
                assert (ops["col"], ops["ncols"]) == (0, c1 - c0)
                read = adc_read(sums, arch.adc_bits, ops["shift"], bool(ops["signed"]))
                y += (read << bit) @ recombine[c0:c1]
    for on_crossbar in reads:
        assert next(on_crossbar, None) is None, "the program reads the ADC more than the model"
    return y


def run_matmul(weight, x, *, w_bits, a_bits, signed, arch, backend, **kw):
    program = lower_matmul(
        weight, w_bits=w_bits, a_bits=a_bits, arch=arch, signed_input=signed, **kw
    )
    y = simulate(program, {"x": x}, backend).outputs["y"]
    return program, y


# ------------------------------------------------------------- exhaustive grid


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("dac_bits", [1, 2])
@pytest.mark.parametrize("cell_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_lossless_grid(mapping, cell_bits, dac_bits, signed, backend):
    """Every ``w_bits`` x ``a_bits`` in 1..8, extreme values included, several tiles."""
    rng = np.random.default_rng([MAPPINGS.index(mapping), cell_bits, dac_bits, int(signed)])
    for w_bits in BITS:
        for a_bits in BITS:
            k = 17 + (3 * w_bits + a_bits) % 6  # 17..22 inputs: 2 row tiles (3 for dr)
            n = 2 + (w_bits + 2 * a_bits) % 3  # 2..4 outputs: up to 4 column tiles
            arch = CimArch(
                rows=16,
                cols=24,
                cell_bits=cell_bits,
                dac_bits=dac_bits,
                mapping=mapping,
                crossbars=1 + (w_bits + a_bits) % 2,
            )
            weight = extreme_weights(rng, k, n, w_bits)
            x = extreme_inputs(rng, 4, k, a_bits, signed)
            _, y = run_matmul(
                weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, backend=backend
            )
            expected = x @ weight
            assert np.array_equal(y, expected), (w_bits, a_bits, k, n)
            assert np.iinfo(y.dtype).min <= expected.min()
            assert expected.max() <= np.iinfo(y.dtype).max


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_lossless_worst_case_magnitudes(mapping, backend):
    """All weights at ``-2**(w-1)`` and all inputs at the extreme: the largest sums."""
    for w_bits, a_bits, signed in [(8, 8, False), (8, 8, True), (1, 1, False), (1, 1, True)]:
        lo = -(1 << (w_bits - 1))
        for x_value in ((1 << a_bits) - 1,) if not signed else (-(1 << (a_bits - 1)),):
            arch = CimArch(rows=16, cols=24, cell_bits=3, mapping=mapping, crossbars=2)
            weight = np.full((40, 7), lo, dtype=np.int64)
            x = np.full((2, 40), x_value, dtype=np.int64)
            _, y = run_matmul(
                weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, backend=backend
            )
            assert np.array_equal(y, x @ weight)
            assert y[0, 0] == 40 * lo * x_value


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize(("rows", "cols"), [(256, 256), (16, 24), (2, 1), (4, 3)])
def test_lossless_crossbar_shapes(mapping, rows, cols, backend):
    rng = np.random.default_rng([rows, cols, MAPPINGS.index(mapping)])
    arch = CimArch(rows=rows, cols=cols, cell_bits=2, dac_bits=2, mapping=mapping, crossbars=3)
    for k, n in [(1, 1), (5, 3), (rows + 1, 2)]:
        weight = random_weights(rng, k, n, 5)
        x = random_inputs(rng, 3, k, 6, True)
        _, y = run_matmul(weight, x, w_bits=5, a_bits=6, signed=True, arch=arch, backend=backend)
        assert np.array_equal(y, x @ weight)


def test_paper_preset_bitexact(backend):
    """The CIM-AQ configuration itself, across a crossbar boundary."""
    rng = np.random.default_rng(11)
    for preset in ("rram-4b", "rram-2b"):
        arch = CimArch.preset(preset)
        weight = random_weights(rng, 300, 40, 8)
        x = extreme_inputs(rng, 3, 300, 8, False)
        _, y = run_matmul(weight, x, w_bits=8, a_bits=8, signed=False, arch=arch, backend=backend)
        assert np.array_equal(y, x @ weight)


# ------------------------------------------------------------ property test

arch_strategy = st.builds(
    CimArch,
    rows=st.integers(4, 20).map(lambda r: 2 * r),
    cols=st.integers(6, 40),
    cell_bits=st.integers(1, 8),
    dac_bits=st.integers(1, 8),
    mapping=st.sampled_from(MAPPINGS),
    crossbars=st.integers(1, 4),
    adc_bits=st.none() | st.integers(1, 14),
)


@given(
    arch=arch_strategy,
    k=st.integers(1, 40),
    n=st.integers(1, 8),
    batch=st.integers(1, 4),
    w_bits=st.integers(1, 8),
    a_bits=st.integers(1, 8),
    signed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_property(arch, k, n, batch, w_bits, a_bits, signed, seed, backend):
    """Random shapes and arches: exact with a lossless ADC, else the per-read model."""
    rng = np.random.default_rng(seed)
    weight = random_weights(rng, k, n, w_bits)
    x = random_inputs(rng, batch, k, a_bits, signed)
    program, y = run_matmul(
        weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, backend=backend
    )
    model = adc_model(
        weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, program=program
    )
    assert np.array_equal(y, model)
    if arch.adc_bits is None:
        assert np.array_equal(y, x @ weight)


# --------------------------------------------------------------- finite ADC


def test_model_is_exact_when_lossless():
    """The test's own ADC model reduces to ``x @ W`` with a lossless ADC."""
    rng = np.random.default_rng(5)
    for mapping in MAPPINGS:
        arch = CimArch(rows=8, cols=10, cell_bits=3, dac_bits=2, mapping=mapping)
        weight = extreme_weights(rng, 19, 5, 7)
        x = extreme_inputs(rng, 4, 19, 5, True)
        program = lower_matmul(weight, w_bits=7, a_bits=5, arch=arch, signed_input=True)
        y = adc_model(weight, x, w_bits=7, a_bits=5, signed=True, arch=arch, program=program)
        assert np.array_equal(y, x @ weight)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("dac_bits", [1, 2, 3])
@pytest.mark.parametrize("adc_bits", [1, 3, 6])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_finite_adc_matches_model(mapping, adc_bits, dac_bits, signed, backend):
    rng = np.random.default_rng([adc_bits, dac_bits, int(signed), MAPPINGS.index(mapping)])
    for w_bits, a_bits, cell_bits in [(8, 8, 2), (4, 6, 4), (3, 5, 1), (7, 3, 3)]:
        arch = CimArch(
            rows=16,
            cols=24,
            cell_bits=cell_bits,
            dac_bits=dac_bits,
            adc_bits=adc_bits,
            mapping=mapping,
            crossbars=2,
        )
        weight = extreme_weights(rng, 37, 6, w_bits)
        x = extreme_inputs(rng, 5, 37, a_bits, signed)
        program, y = run_matmul(
            weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, backend=backend
        )
        shifts = [ops["shift"] for m, ops in program.instructions() if m == "adc"]
        model = adc_model(
            weight, x, w_bits=w_bits, a_bits=a_bits, signed=signed, arch=arch, program=program
        )
        assert np.array_equal(y, model), (w_bits, a_bits, cell_bits)
        if adc_bits <= 2 and w_bits >= 4:
            assert max(shifts) > 0  # the ADC really quantizes here


def test_wide_adc_is_exact(backend):
    """An ADC wide enough for every column sum needs no step and loses nothing."""
    rng = np.random.default_rng(9)
    for mapping in MAPPINGS:
        arch = CimArch(rows=16, cols=24, cell_bits=4, dac_bits=2, adc_bits=16, mapping=mapping)
        weight = extreme_weights(rng, 40, 9, 8)
        x = extreme_inputs(rng, 4, 40, 8, True)
        program, y = run_matmul(
            weight, x, w_bits=8, a_bits=8, signed=True, arch=arch, backend=backend
        )
        assert all(ops["shift"] == 0 for m, ops in program.instructions() if m == "adc")
        assert np.array_equal(y, x @ weight)


def test_adc_shift_is_smallest_that_fits():
    """Every read's range fits its ADC code range, and one step finer would not."""
    from tvm_cim.core.quant import quant_range, rounding_right_shift

    rng = np.random.default_rng(21)
    for mapping in MAPPINGS:
        arch = CimArch(rows=16, cols=24, cell_bits=2, dac_bits=2, adc_bits=4, mapping=mapping)
        weight = extreme_weights(rng, 30, 5, 6)
        program = lower_matmul(weight, w_bits=6, a_bits=4, arch=arch, signed_input=True)
        reads = 0
        for mnemonic, ops in program.instructions():
            if mnemonic == "prog":
                folded = program.images[ops["image"]].folded()
            elif mnemonic == "mvm":
                chunk_lo, chunk_hi = quant_range(arch.dac_bits, bool(ops["signed"]))
            elif mnemonic == "adc":
                hi = np.maximum(folded * chunk_lo, folded * chunk_hi).sum(axis=0).max()
                lo = np.minimum(folded * chunk_lo, folded * chunk_hi).sum(axis=0).min()
                qmin, qmax = quant_range(arch.adc_bits, bool(ops["signed"]))
                assert bool(ops["signed"]) == (lo < 0)

                def fits(shift, lo=lo, hi=hi, qmin=qmin, qmax=qmax):
                    return (
                        qmin <= rounding_right_shift(lo, shift)
                        and rounding_right_shift(hi, shift) <= qmax
                    )

                assert fits(ops["shift"])
                assert ops["shift"] == 0 or not fits(ops["shift"] - 1)
                reads += 1
        assert reads > 0


# ---------------------------------------------------------------- requantize

REQUANTS = {
    "signed8": Requantize(
        multiplier=np.array([1 << 14, 3 << 12, 23456, 1, 7]),
        shift=np.array([20, 19, 22, 0, 3]),
        zero_point=3,
        out_bits=8,
        signed=True,
        bias=np.array([0, -100, 5000, 7, -3]),
    ),
    "signed8-relu": Requantize(multiplier=12345, shift=21, zero_point=-5, signed=True, relu=True),
    "signed16": Requantize(multiplier=30000, shift=16, zero_point=-200, out_bits=16, signed=True),
    "unsigned4-relu": Requantize(multiplier=9000, shift=20, zero_point=2, out_bits=4, relu=True),
    "unsigned8": Requantize(multiplier=20000, shift=20, zero_point=100, out_bits=8),
    "unsigned16": Requantize(multiplier=1 << 16, shift=10, zero_point=1000, out_bits=16),
}


@pytest.mark.parametrize(
    "name",
    sorted(REQUANTS),
)
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_requantize_matches_reference(mapping, name, backend):
    rq = REQUANTS[name]
    rng = np.random.default_rng(len(name))
    arch = CimArch(rows=16, cols=24, cell_bits=2, mapping=mapping, crossbars=2)
    weight = extreme_weights(rng, 35, 5, 6)
    x = extreme_inputs(rng, 6, 35, 7, True)
    program, y = run_matmul(
        weight, x, w_bits=6, a_bits=7, signed=True, arch=arch, backend=backend, requant=rq
    )
    expected = rq.apply(x @ weight)
    qmin, qmax = rq.clamp_range()
    assert len(np.unique(expected)) > 2  # the scale spreads the outputs over the code range
    assert np.iinfo(y.dtype).min <= qmin and qmax <= np.iinfo(y.dtype).max, (
        f"output dtype {y.dtype} cannot hold {qmin}..{qmax}"
    )
    assert np.array_equal(y.astype(np.int64), expected)
    assert program.outputs[0].bits == rq.out_bits
    assert program.outputs[0].signed == rq.signed


# -------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("weight", "kwargs", "match"),
    [
        (np.full((3, 2), 8), {"w_bits": 4}, "outside signed 4-bit"),
        (np.full((3, 2), -9), {"w_bits": 4}, "outside signed 4-bit"),
        (np.array([[1, -2]]), {"w_bits": 1}, "outside signed 1-bit"),
        (np.ones((3, 2)) * 0.5, {}, "integers"),
        (np.ones((3, 2), dtype=np.float32), {}, "integers"),
        (np.ones((3, 2)), {}, "integers"),
        (np.ones((3, 2), dtype=int), {"w_bits": 0}, "w_bits"),
        (np.ones((3, 2), dtype=int), {"w_bits": 9}, "w_bits"),
        (np.ones((3, 2), dtype=int), {"a_bits": 0}, "a_bits"),
        (np.ones((3, 2), dtype=int), {"a_bits": 9}, "a_bits"),
        (np.ones((3, 2), dtype=int), {"a_bits": 4.0}, "a_bits"),
        (np.ones((3, 2), dtype=int), {"w_bits": "4"}, "w_bits"),
        (np.ones(3, dtype=int), {}, r"\[K, N\]"),
        (np.ones((0, 2), dtype=int), {}, r"\[K, N\]"),
        (np.ones((2, 3, 4), dtype=int), {}, r"\[K, N\]"),
    ],
)
def test_lowering_rejects_bad_arguments(weight, kwargs, match):
    args = {"w_bits": 4, "a_bits": 4, "arch": CimArch(rows=16, cols=24), **kwargs}
    with pytest.raises(CimError, match=match):
        lower_matmul(weight, **args)
