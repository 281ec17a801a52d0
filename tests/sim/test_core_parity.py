"""The Cython core against the numpy reference: bit-exact outputs and identical stats."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_cim.codegen import lower_matmul
from tvm_cim.core.arch import CimArch
from tvm_cim.core.quant import Requantize
from tvm_cim.sim import ProgramBuilder, Simulator, TensorDesc, _core, estimate, isa

INT64_MIN, INT64_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max
STORE_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "int64")


def assert_parity(program, inputs, batch=None):
    """Both backends agree on every output and every count, as does the static model."""
    ref = Simulator(backend="numpy").run(program, inputs, batch=batch)
    core = Simulator(backend="cython").run(program, inputs, batch=batch)
    assert list(core.outputs) == list(ref.outputs)
    for name, expected in ref.outputs.items():
        got = core.outputs[name]
        assert got.dtype == expected.dtype, name
        assert np.array_equal(got, expected), name
    assert core.stats.counts() == ref.stats.counts()
    assert core.stats.counts() == estimate(program, ref.stats.batch).counts()
    timing_only = Simulator(backend="cython").run(program, inputs, functional=False, batch=batch)
    assert timing_only.stats.counts() == ref.stats.counts()
    for out in timing_only.outputs.values():
        assert not out.any()
    return core


def timed_arch(**fields) -> CimArch:
    """An arch whose every operation class costs time, so the schedule is not trivial."""
    return CimArch(
        write_latency_us=3.0,
        mvm_latency_us=0.7,
        adc_latency_us=0.11,
        shift_add_latency_us=0.013,
        requant_latency_us=0.05,
        load_store_latency_us=0.021,
        **fields,
    )


def random_requant(rng, n: int) -> Requantize:
    return Requantize(
        multiplier=rng.integers(1, 1 << 24, n),
        shift=rng.integers(0, 40, n),
        zero_point=int(rng.integers(-5, 6)),
        out_bits=int(rng.integers(2, 12)),
        signed=bool(rng.integers(2)),
        relu=bool(rng.integers(2)),
        bias=rng.integers(-5000, 5000, n),
    )


@pytest.mark.parametrize("dac_bits", [1, 2])
@pytest.mark.parametrize("cell_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("mapping", ["offset", "differential-column", "differential-row"])
def test_lowered_matmuls(mapping, cell_bits, dac_bits):
    rng = np.random.default_rng([cell_bits, dac_bits, len(mapping)])
    for adc_bits in (None, int(rng.integers(3, 8))):
        for crossbars in (1, 3):
            arch = timed_arch(
                rows=int(rng.choice([6, 10, 16])),
                cols=int(rng.choice([5, 9, 13])),
                cell_bits=cell_bits,
                dac_bits=dac_bits,
                adc_bits=adc_bits,
                mapping=mapping,
                crossbars=crossbars,
            )
            k, n = (int(v) for v in rng.integers(1, 30, 2))
            w_bits, a_bits = (int(v) for v in rng.integers(2, 9, 2))
            signed = bool(rng.integers(2))
            wmax = 1 << (w_bits - 1)
            weight = rng.integers(-wmax, wmax, (k, n))
            requant = random_requant(rng, n) if rng.integers(2) else None
            program = lower_matmul(
                weight,
                w_bits=w_bits,
                a_bits=a_bits,
                arch=arch,
                signed_input=signed,
                requant=requant,
            )
            batch = int(rng.choice([1, 3, 9, 20]))
            lo, hi = (-(1 << (a_bits - 1)), 1 << (a_bits - 1)) if signed else (0, 1 << a_bits)
            x = rng.integers(lo, hi, (batch, k))
            core = assert_parity(program, {"x": x})
            if adc_bits is None and requant is None:
                assert np.array_equal(core.outputs["y"], x @ weight)


def test_more_than_256_crossbars_and_buffers():
    """Indices past the 8-bit fields of format version 2: 600 crossbars, 1,200 buffers."""
    rng = np.random.default_rng(11)
    arch = timed_arch(rows=4, cols=4, cell_bits=2, mapping="differential-column", crossbars=600)
    weight = rng.integers(-8, 8, (80, 60))
    program = lower_matmul(weight, w_bits=4, a_bits=3, arch=arch)
    assert len(program.buffers) > 1000
    assert int(program.code[program.code[:, 0] == isa.OP["MVM"], 1].max()) >= 512
    x = rng.integers(0, 8, (5, 80))
    core = assert_parity(program, {"x": x})
    assert np.array_equal(core.outputs["y"], x @ weight)
    assert sum(b > 0 for b in core.stats.busy_ps) > 512


def test_float64_column_sums():
    """Column sums past 2**31, which float32 (and int32) cannot hold: 8-bit cells and DAC."""
    rng = np.random.default_rng(7)
    for adc_bits in (None, 12):
        arch = timed_arch(
            rows=60000, cols=8, cell_bits=8, dac_bits=8, adc_bits=adc_bits, mapping="offset"
        )
        weight = rng.integers(80, 128, (59999, 3))  # offset cells 208..255
        program = lower_matmul(weight, w_bits=8, a_bits=8, arch=arch)
        x = rng.integers(200, 256, (10, 59999))
        core = assert_parity(program, {"x": x})
        if adc_bits is None:
            assert np.array_equal(core.outputs["y"], x @ weight)


@pytest.mark.parametrize("tile", [1, 4, 9])
def test_row_tiles(monkeypatch, tile):
    """Running the program tile by tile gives the values of one pass over the batch."""
    monkeypatch.setattr(_core, "_TILE_BYTES", 1)
    monkeypatch.setattr(_core, "_MIN_TILE", tile)
    rng = np.random.default_rng(tile)
    arch = timed_arch(rows=8, cols=12, cell_bits=2, dac_bits=2, adc_bits=5, crossbars=2)
    weight = rng.integers(-8, 8, (19, 7))
    requant = random_requant(rng, 7)
    program = lower_matmul(
        weight, w_bits=4, a_bits=6, arch=arch, signed_input=True, requant=requant
    )
    x = rng.integers(-32, 32, (23, 19))
    assert_parity(program, {"x": x})


@pytest.mark.parametrize("tile", [1, 2, 64])
def test_prog_folds_the_image_a_crossbar_holds(monkeypatch, tile):
    """Crossbars re-programmed within and across row tiles, twice in a row with one
    image, and one programmed but never read."""
    monkeypatch.setattr(_core, "_TILE_BYTES", 1)
    monkeypatch.setattr(_core, "_MIN_TILE", tile)
    rng = np.random.default_rng(tile)
    arch = timed_arch(rows=6, cols=5, cell_bits=3, dac_bits=2, crossbars=3)
    b = ProgramBuilder(arch, "reprogram")
    x = b.input(TensorDesc("x", 6, "uint8", 4, False))
    xs, read, acc = b.buffer(6), b.buffer(5), b.buffer(5)
    plain = b.image(rng.integers(0, 8, (5, 5)))
    diff = b.image(rng.integers(0, 8, (6, 4)), differential_rows=True)
    narrow = b.image(rng.integers(0, 8, (2, 3)))
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=6)
    b.emit("prog", xb=2, image=plain)
    sequence = [(0, plain), (0, diff), (0, diff), (1, narrow), (0, plain), (1, diff), (1, narrow)]
    for xb, image in sequence:
        cols = b.images[image].cols
        b.emit("prog", xb=xb, image=image)
        for bit in (0, 2):
            b.emit("mvm", xb=xb, src=xs, src_col=1, bit=bit, signed=0)
            b.emit("adc", dst=read, dst_col=0, xb=xb, col=0, ncols=cols, signed=1)
            b.emit("shadd", dst=acc, dst_col=0, src=read, src_col=0, ncols=cols, shift=bit)
    y = b.output(TensorDesc("y", 5, "int64", 64, True))
    b.emit("store", tensor=y, dst_col=0, src=acc, src_col=0, ncols=5)
    b.emit("halt")
    program = b.build()
    x = rng.integers(0, 16, (7, 6))
    core = assert_parity(program, {"x": x})
    expected = np.zeros((7, 5), dtype=np.int64)
    for _, i in sequence:
        img = b.images[i]
        expected[:, : img.cols] += x[:, 1 : 1 + img.in_rows] @ img.folded()
    assert np.array_equal(core.outputs["y"], expected)


def variants(cells: np.ndarray) -> list[np.ndarray]:
    """Read-only views of ``cells`` with other strides (the simulator shares them)."""

    def frozen(a):
        return np.frombuffer(a.tobytes(), np.uint8).reshape(a.shape)

    return [
        frozen(cells[:, ::-1])[:, ::-1],  # negative column stride
        frozen(cells.T).T,  # column-major
        frozen(np.repeat(cells, 3, axis=1))[:, ::3],  # every third column
    ]


@pytest.mark.parametrize("mapping", ["offset", "differential-row"])
def test_images_with_any_strides(mapping):
    rng = np.random.default_rng(len(mapping))
    arch = timed_arch(rows=10, cols=9, cell_bits=3, dac_bits=2, mapping=mapping, crossbars=2)
    weight = rng.integers(-8, 8, (23, 11))
    program = lower_matmul(weight, w_bits=4, a_bits=5, arch=arch)
    x = rng.integers(0, 32, (6, 23))
    expected = x @ weight
    for i in range(3):
        for img in program.images:
            img.cells = variants(np.ascontiguousarray(img.cells))[i]
        core = assert_parity(program, {"x": x})
        assert np.array_equal(core.outputs["y"], expected)
    # broadcast cells: one column, or one row, repeated
    for repeat in (lambda c: c[:, :1], lambda c: c[:1]):
        for img in program.images:
            img.cells = np.broadcast_to(repeat(np.ascontiguousarray(img.cells)), img.cells.shape)
        assert_parity(program, {"x": x})


def test_prepared_program_reruns_with_other_batches():
    rng = np.random.default_rng(3)
    arch = timed_arch(rows=16, cols=16, cell_bits=4, adc_bits=6)
    program = lower_matmul(rng.integers(-128, 128, (40, 6)), w_bits=8, a_bits=8, arch=arch)
    ref, core = Simulator(backend="numpy"), Simulator(backend="cython")
    prepared = core.prepare(program)
    for batch in (5, 1, 12, 5):
        x = rng.integers(0, 256, (batch, 40))
        a, b = ref.run(prepared, {"x": x}), core.run(prepared, {"x": x})
        assert np.array_equal(a.outputs["y"], b.outputs["y"])
        assert a.stats.counts() == b.stats.counts()


def overflow_program():
    """int64 wrap-around in shadd, acc and req; overlapping operands; every store dtype."""
    b = ProgramBuilder(CimArch(rows=4, cols=4, shift_add_latency_us=0.01), "overflow")
    x = b.input(TensorDesc("x", 4, "int64", 64, True))
    xs, acc, out = b.buffer(4), b.buffer(4), b.buffer(4)
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=4)
    b.emit("shadd", dst=acc, dst_col=0, src=xs, src_col=0, ncols=4, shift=62)
    b.emit("shadd", dst=acc, dst_col=0, src=xs, src_col=0, ncols=4, shift=61, neg=1)
    b.emit("shadd", dst=acc, dst_col=0, src=xs, src_col=2, ncols=4, shift=3, bcast=1)
    b.emit("shadd", dst=acc, dst_col=0, src=acc, src_col=1, ncols=4, shift=60, neg=1, bcast=1)
    b.emit("acc", dst=acc, dst_col=0, src=xs, src_col=0, ncols=4)
    # Source and destination overlap in one buffer, shifted either way.
    b.emit("shadd", dst=xs, dst_col=1, src=xs, src_col=0, ncols=3, shift=1)
    b.emit("acc", dst=xs, dst_col=0, src=xs, src_col=1, ncols=3)
    params = np.array(
        [
            [INT64_MAX, -7, 1 << 40, INT64_MIN],
            [3, INT64_MAX, -(1 << 30), 1 << 31],
            [0, 62, 1, 33],
        ]
    )
    c = b.constant(params)
    b.emit(
        "req", dst=out, dst_col=0, src=acc, src_col=0, ncols=4, params=c, zp=-3, bits=31, signed=1
    )
    b.emit("req", dst=acc, dst_col=1, src=acc, src_col=0, ncols=3, params=c, zp=2, bits=7, relu=1)
    # relu with the zero point above the code range: np.clip gives the top of the range.
    b.emit("req", dst=out, dst_col=3, src=xs, src_col=3, ncols=1, params=c, zp=200, bits=4, relu=1)
    for dtype in STORE_DTYPES:
        t = b.output(TensorDesc(f"y_{dtype}", 12, dtype, 8, dtype.startswith("int")))
        for j, src in enumerate((xs, acc, out)):
            b.emit("store", tensor=t, dst_col=4 * j, src=src, src_col=0, ncols=4)
    b.output(TensorDesc("untouched", 3, "int16", 16, True))
    b.emit("halt")
    return b.build()


def test_int64_wrap_and_store_casts():
    rng = np.random.default_rng(11)
    program = overflow_program()
    extremes = np.array(
        [[INT64_MIN, INT64_MAX, -1, 0], [INT64_MAX, INT64_MIN, 1, -(1 << 62)], [7, -7, 3, 2]]
    )
    random = rng.integers(INT64_MIN, INT64_MAX, (40, 4), endpoint=True)
    for x in (extremes, random, random[:1]):
        core = assert_parity(program, {"x": x})
        assert not core.outputs["untouched"].any()


@pytest.mark.parametrize(
    ("adc_bits", "rows", "cell_bits", "dac_bits"),
    [(3, 8, 4, 2), (32, 8, 4, 2), (10, 400, 8, 8)],  # the last needs float64 column sums
)
def test_adc_rounding_and_saturation(adc_bits, rows, cell_bits, dac_bits):
    """Signed chunks into differential rows; ADC steps from 1 to 2**62, both code ranges."""
    rng = np.random.default_rng(adc_bits)
    arch = CimArch(
        rows=rows, cols=6, cell_bits=cell_bits, dac_bits=dac_bits, adc_bits=adc_bits, crossbars=2
    )
    b = ProgramBuilder(arch, "adc")
    width = rows // 2 + 1
    x = b.input(TensorDesc("x", width, "int8", 8, True))
    xs, read = b.buffer(width), b.buffer(6)
    diff = b.image(rng.integers(0, 1 << cell_bits, (rows, 6)), differential_rows=True)
    plain = b.image(rng.integers(0, 1 << cell_bits, (width, 3)))
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=width)
    b.emit("prog", xb=0, image=diff)
    b.emit("prog", xb=1, image=plain)
    outputs = []
    for bit, signed in [(0, 0), (6, 1), (2, 1)]:
        b.emit("mvm", xb=0, src=xs, src_col=1, bit=bit, signed=signed)
        b.emit("mvm", xb=1, src=xs, src_col=0, bit=bit, signed=signed)
        for shift in (0, 1, 2, 5, 31, 40, 62):
            for adc_signed in (0, 1):
                t = b.output(TensorDesc(f"y{len(outputs)}", 9, "int64", 64, True))
                outputs.append(t)
                b.emit(
                    "adc", dst=read, dst_col=0, xb=0, col=0, ncols=6, shift=shift, signed=adc_signed
                )
                b.emit("store", tensor=t, dst_col=0, src=read, src_col=0, ncols=6)
                b.emit(
                    "adc", dst=read, dst_col=2, xb=1, col=1, ncols=2, shift=shift, signed=adc_signed
                )
                b.emit("store", tensor=t, dst_col=6, src=read, src_col=1, ncols=3)
    b.emit("halt")
    program = b.build()
    assert_parity(program, {"x": rng.integers(-128, 128, (13, width))})
    assert_parity(program, {"x": np.resize([-128, 127, -1, 0, 85], (1, width))})


def test_halt_only():
    b = ProgramBuilder(CimArch(), "empty")
    b.output(TensorDesc("y", 3, "uint16", 16, False))
    b.emit("halt")
    core = assert_parity(b.build(), {}, batch=4)
    assert core.outputs["y"].shape == (4, 3)


def test_latencies_beyond_int64():
    """Times past int64 still come out exact (Python integers)."""
    rng = np.random.default_rng(5)
    arch = CimArch(rows=8, cols=8, write_latency_us=1e13, mvm_latency_us=1e12)
    program = lower_matmul(rng.integers(-8, 8, (12, 3)), w_bits=4, a_bits=4, arch=arch)
    core = assert_parity(program, {"x": rng.integers(0, 16, (6, 12))})
    assert core.stats.latency_ps > 1 << 63


@pytest.mark.parametrize("mapping", ["offset", "differential-column", "differential-row"])
def test_bit_serial_groups(mapping):
    """With a lossless ADC the core runs each crossbar's chunk steps as one product; the
    adc's buffer read after a run keeps that run out of any group."""
    rng = np.random.default_rng(len(mapping) + 3)
    arch = timed_arch(rows=10, cols=9, cell_bits=2, dac_bits=1, mapping=mapping)
    weight = rng.integers(-8, 8, (23, 11))
    program = lower_matmul(weight, w_bits=4, a_bits=5, arch=arch, signed_input=True)
    groups = _core.bit_serial_groups(Simulator().prepare(program))
    assert groups and all(g[9] for g in groups)
    x = rng.integers(-16, 16, (6, 23))
    core = assert_parity(program, {"x": x})
    assert np.array_equal(core.outputs["y"], x @ weight)
    # the adc's last read, stored: no run may leave it out
    b = ProgramBuilder(arch, "read-after")
    xs_in = b.input(TensorDesc("x", 4, "uint8", 3, False))
    xs, read, acc = b.buffer(4), b.buffer(5), b.buffer(5)
    image = b.image(rng.integers(0, 4, (4, 5)))
    b.emit("load", dst=xs, dst_col=0, tensor=xs_in, src_col=0, ncols=4)
    b.emit("prog", xb=0, image=image)
    for bit in range(3):
        b.emit("mvm", xb=0, src=xs, src_col=0, bit=bit, signed=0)
        b.emit("adc", dst=read, dst_col=0, xb=0, col=0, ncols=5, signed=0)
        b.emit("shadd", dst=acc, dst_col=0, src=read, src_col=0, ncols=5, shift=bit)
    y, z = (
        b.output(TensorDesc("y", 5, "int64", 64, True)),
        b.output(TensorDesc("z", 5, "int64", 64, True)),
    )
    b.emit("store", tensor=y, dst_col=0, src=acc, src_col=0, ncols=5)
    b.emit("store", tensor=z, dst_col=0, src=read, src_col=0, ncols=5)
    b.emit("halt")
    program = b.build()
    assert not _core.bit_serial_groups(Simulator().prepare(program))
    assert_parity(program, {"x": rng.integers(0, 8, (3, 4))})
