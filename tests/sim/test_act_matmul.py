"""Matmuls whose stored operand is an activation: ``progb`` and ``codegen.actmatmul``.

Each item writes its own operand into the crossbars at run time; the results are checked
against plain numpy integer matmuls, the finite-ADC reads against a model written from
the definitions (the logical cells of ``test_bitexact``), and the cost against the CIM-AQ
formula computed here.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tests.conftest import simulate
from tests.sim.test_bitexact import dac_step, logical_cells
from tvm_cim import CimArch, CimError
from tvm_cim.codegen.actmatmul import emit_act_matmul, lower_act_matmul
from tvm_cim.core import cells
from tvm_cim.core.arch import MAPPINGS
from tvm_cim.core.errors import InputError, ProgramError
from tvm_cim.core.quant import adc_read, quant_range
from tvm_cim.sim import (
    ProgramBuilder,
    Simulator,
    TensorDesc,
    assemble,
    disassemble,
    estimate,
    isa,
    progb_params,
    simulator,
    verify,
)

WRITE_PS = 56_000_000
EXEC_PS = 1_400_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------- helpers


def operands(rng, batch, heads, rows, k, n, *, s_bits, a_bits, signed_input, signed_stored):
    """``x`` ``[batch, rows, heads*k]`` and ``S`` ``[batch, heads, k, n]`` codes; item 0's
    operand sits at its code range's low end, item 1's at its high end, and the first
    two input rows at the input range's ends."""
    x = rng.integers(*plus_one(quant_range(a_bits, signed_input)), (batch, rows, heads * k))
    lo, hi = quant_range(s_bits, signed_stored)
    s = rng.integers(lo, hi + 1, (batch, heads, k, n))
    s[0] = lo
    if batch > 1:
        s[1] = hi
    x[:, 0] = quant_range(a_bits, signed_input)[1]
    if rows > 1:
        x[:, 1] = quant_range(a_bits, signed_input)[0]
    return x, s


def plus_one(bounds):
    return bounds[0], bounds[1] + 1


def stored(s: np.ndarray, transpose: bool) -> np.ndarray:
    """The ``s`` input of ``lower_act_matmul``: per item ``k`` rows of ``heads*n`` (head
    ``h`` at columns ``h*n``), or transposed ``n`` rows of ``heads*k``."""
    batch, heads, k, n = s.shape
    if transpose:
        return s.transpose(0, 3, 1, 2).reshape(batch * n, heads * k)
    return s.transpose(0, 2, 1, 3).reshape(batch * k, heads * n)


def expected(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``y[b, r, h*n + j] = sum_i x[b, r, h*k + i] * S[b, h, i, j]`` in int64."""
    batch, heads, k, n = s.shape
    rows = x.shape[1]
    xh = x.reshape(batch, rows, heads, k).astype(np.int64)
    y = np.einsum("brhi,bhij->brhj", xh, s.astype(np.int64))
    return y.reshape(batch * rows, heads * n)


def run(program, x, s, transpose, backend, **kw):
    inputs = {"x": x.reshape(-1, x.shape[-1]), "s": stored(s, transpose)}
    return simulate(program, inputs, backend, **kw)


def adc_model(x, s, *, s_bits, a_bits, signed, arch, program):
    """Per item, head, tile and input step: the column sums of the tile's cells, read as
    the program's adc instructions read them, then recombined. Tiles are dealt to the
    crossbars round-robin, head after head, row-major within a head; each crossbar's
    reads keep that order. Returns ``(y, saturated)``: whether some read was off by more
    than half its ADC step."""
    batch, heads, k, n = s.shape
    rows = x.shape[1]
    reads = [[] for _ in range(arch.crossbars)]
    for mnemonic, ops in program.instructions():
        if mnemonic == "adc":
            reads[ops["xb"]].append(ops)
    steps = ceil_div(a_bits, arch.dac_bits)
    y = np.zeros((batch, rows, heads * n), dtype=np.int64)
    saturated = False
    for b in range(batch):
        on = [iter(r) for r in reads]
        dealt = 0
        for h in range(heads):
            top, bottom, recombine = logical_cells(s[b, h], s_bits, arch.cell_bits, arch.mapping)
            per_tile = arch.rows // 2 if bottom is not None else arch.rows
            xh = x[b][:, h * k : (h + 1) * k]
            for r0 in range(0, k, per_tile):
                r1 = min(r0 + per_tile, k)
                for c0 in range(0, top.shape[1], arch.cols):
                    c1 = min(c0 + arch.cols, top.shape[1])
                    tile = top[r0:r1, c0:c1]
                    if bottom is not None:
                        tile = tile - bottom[r0:r1, c0:c1]
                    mine = on[dealt % arch.crossbars]
                    dealt += 1
                    for step in range(steps):
                        bit = step * arch.dac_bits
                        top_step = signed and step == steps - 1
                        sums = dac_step(xh[:, r0:r1], bit, arch.dac_bits, top_step) @ tile
                        ops = next(mine)
                        read = adc_read(sums, arch.adc_bits, ops["shift"], bool(ops["signed"]))
                        saturated |= bool(np.any(np.abs(read - sums) > (1 << ops["shift"]) // 2))
                        y[b, :, h * n : (h + 1) * n] += (read << bit) @ recombine[c0:c1]
    for mine in on:
        assert next(mine, None) is None, "the program reads the ADC more than the model"
    return y.reshape(batch * rows, heads * n), saturated


def core_row_tiles(monkeypatch, backend: str, tile: int | None) -> None:
    """Make the compiled core run ``tile``-vector row tiles (None: leave it)."""
    if tile is None:
        return
    if backend != "cython":
        pytest.skip("row tiles are the compiled core's")
    monkeypatch.setattr(simulator._core, "_TILE_BYTES", 1)
    monkeypatch.setattr(simulator._core, "_MIN_TILE", tile)


def progbs(program) -> list[tuple[int, dict]]:
    return [(i, ops) for i, (m, ops) in enumerate(program.instructions()) if m == "progb"]


def geometry(program, ops) -> dict[str, int]:
    return dict(zip(isa.PROGB_PARAMS, (int(v) for v in program.constants[ops["params"]][0])))


# ----------------------------------------------------------- the shared cells


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_column_bounds_are_the_cells_range(mapping):
    """Over every value of each width, each logical column's folded cells span exactly
    the bounds the ADC setting is chosen from; a batch maps item by item."""
    for bits in range(1, 10):
        for cell_bits in (1, 2, 3, 4):
            lo, hi = quant_range(bits, True)
            values = np.arange(lo, hi + 1)[:, None].repeat(2, axis=1)  # [2**bits, N=2]
            pos, neg = cells.map_cells(values, bits, cell_bits, mapping)
            folded = pos.astype(np.int64) - (0 if neg is None else neg)
            top, bottom, _ = logical_cells(values, bits, cell_bits, mapping)
            assert np.array_equal(pos, top) and (neg is None) == (bottom is None)
            low, high = cells.layout(2, bits, cell_bits, mapping).column_bounds()
            assert np.array_equal(folded.min(axis=0), low), (bits, cell_bits)
            assert np.array_equal(folded.max(axis=0), high), (bits, cell_bits)
    rng = np.random.default_rng(3)
    batch = rng.integers(-8, 8, (3, 5, 4))
    pos, neg = cells.map_cells(batch, 4, 2, mapping)
    for item in range(3):
        one, other = cells.map_cells(batch[item], 4, 2, mapping)
        assert np.array_equal(pos[item], one)
        assert neg is None or np.array_equal(neg[item], other)


# -------------------------------------------------------------- bit-exactness


def configurations(mapping: str, cell_bits: int):
    """Eight per mapping and cell width: every stored width, every input width across
    them, and each combination of signed inputs, transpose and three heads once."""
    i = 3 * MAPPINGS.index(mapping) + (1, 2, 4).index(cell_bits)
    for s_bits in range(1, 9):
        j = s_bits + i
        yield {
            "s_bits": s_bits,
            "a_bits": (3 * s_bits + i) % 8 + 1,
            "signed_input": bool(j & 1),
            "transpose": bool(j & 2),
            "heads": 3 if j & 4 else 1,
            "signed_stored": j % 4 != 1,
            "batch": 3 if (7 * s_bits + i) % 3 else 1,
            "crossbars": 4 if (5 * s_bits + i) % 2 else 1,
            "adc_bits": 16 if j % 5 == 0 else None,  # wide enough: needs no step
            "k": 17 + j % 5,  # 16 x 8 crossbars: 2 row tiles (3 for differential rows)
            "n": 2 + (s_bits + 2 * i) % 4,
            "rows": 1 + s_bits % 3,
        }


@pytest.mark.parametrize("cell_bits", [1, 2, 4])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_matches_numpy_matmul(mapping, cell_bits, backend):
    rng = np.random.default_rng([MAPPINGS.index(mapping), cell_bits])
    column_tiles = 1
    for c in configurations(mapping, cell_bits):
        arch = CimArch(
            rows=16,
            cols=8,
            cell_bits=cell_bits,
            mapping=mapping,
            crossbars=c["crossbars"],
            adc_bits=c["adc_bits"],
        )
        program = lower_act_matmul(
            heads=c["heads"],
            rows=c["rows"],
            k=c["k"],
            n=c["n"],
            transpose=c["transpose"],
            s_bits=c["s_bits"],
            a_bits=c["a_bits"],
            arch=arch,
            signed_input=c["signed_input"],
            signed_stored=c["signed_stored"],
        )
        x, s = operands(
            rng,
            c["batch"],
            c["heads"],
            c["rows"],
            c["k"],
            c["n"],
            s_bits=c["s_bits"],
            a_bits=c["a_bits"],
            signed_input=c["signed_input"],
            signed_stored=c["signed_stored"],
        )
        result = run(program, x, s, c["transpose"], backend)
        assert np.array_equal(result.outputs["y"], expected(x, s)), c
        tiles = {(g["r0"], g["c0"]) for g in (geometry(program, o) for _, o in progbs(program))}
        assert len({r for r, _ in tiles}) > 1
        column_tiles = max(column_tiles, len({c for _, c in tiles}))
        if c["adc_bits"]:
            assert all(o["shift"] == 0 for m, o in program.instructions() if m == "adc")
    assert column_tiles > 1


@pytest.mark.parametrize("adc_bits", [4, 7])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_finite_adc_never_saturates(mapping, adc_bits, backend):
    """Operands at their extremes through a narrow ADC: every read is the model's, none
    saturates, and the ADC does quantize."""
    rng = np.random.default_rng([adc_bits, MAPPINGS.index(mapping)])
    shifts = []
    for s_bits, a_bits, cell_bits, dac_bits, signed in [(8, 8, 2, 1, True), (5, 3, 4, 2, False)]:
        arch = CimArch(
            rows=16,
            cols=16,
            cell_bits=cell_bits,
            dac_bits=dac_bits,
            adc_bits=adc_bits,
            mapping=mapping,
            crossbars=2,
        )
        program = lower_act_matmul(
            heads=2, rows=3, k=21, n=3, transpose=True, s_bits=s_bits, a_bits=a_bits,
            arch=arch, signed_input=signed,
        )  # fmt: skip
        x, s = operands(
            rng, 3, 2, 3, 21, 3, s_bits=s_bits, a_bits=a_bits, signed_input=signed,
            signed_stored=True,
        )  # fmt: skip
        y = run(program, x, s, True, backend).outputs["y"]
        model, saturated = adc_model(
            x, s, s_bits=s_bits, a_bits=a_bits, signed=signed, arch=arch, program=program
        )
        assert np.array_equal(y, model)
        assert not saturated
        shifts += [o["shift"] for m, o in program.instructions() if m == "adc"]
    assert max(shifts) > 0


def test_model_is_exact_when_lossless():
    rng = np.random.default_rng(4)
    arch = CimArch(rows=8, cols=10, cell_bits=3, dac_bits=2, mapping="offset")
    program = lower_act_matmul(
        heads=2, rows=2, k=11, n=4, transpose=False, s_bits=6, a_bits=5, arch=arch,
        signed_input=True,
    )  # fmt: skip
    x, s = operands(rng, 2, 2, 2, 11, 4, s_bits=6, a_bits=5, signed_input=True, signed_stored=True)
    model, _ = adc_model(x, s, s_bits=6, a_bits=5, signed=True, arch=arch, program=program)
    assert np.array_equal(model, expected(x, s))


def prog_after_progb() -> tuple:
    """Crossbar 0 holds each item's operand, then a shared image, then an operand again
    (from another buffer); crossbar 1 holds an image throughout."""
    arch = CimArch(rows=6, cols=5, cell_bits=3, dac_bits=2, mapping="offset", crossbars=2)
    b = ProgramBuilder(arch, "prog after progb")
    x = b.input(TensorDesc("x", 4, "uint8", 4, False, rows=2))
    s = b.input(TensorDesc("s", 3, "int8", 3, True, rows=4))
    t = b.input(TensorDesc("t", 4, "int8", 2, True, rows=1))
    y = b.output(TensorDesc("y", 5, "int64", 64, True, rows=2))
    xs, ss, ts = b.buffer(4, rows=2), b.buffer(3, rows=4), b.buffer(4, rows=1)
    read, acc = b.buffer(5, rows=2), b.buffer(5, rows=2)
    image = b.image(np.arange(20, dtype=np.uint8).reshape(4, 5) % 8)
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=4)
    b.emit("load", dst=ss, dst_col=0, tensor=s, src_col=0, ncols=3)
    b.emit("load", dst=ts, dst_col=0, tensor=t, src_col=0, ncols=4)
    b.emit("prog", xb=1, image=image)
    # S [4, 3] at 3 bits (offset mapping, 3-bit cells: one slice, then the ones column);
    # T^T: [4, 1] held as 1 row of 4, at 2 bits
    sp = b.constant(progb_params(0, 4, 3, 3, (0, 4), (0, 4)))
    tp = b.constant(progb_params(0, 4, 1, 2, (0, 4), (0, 2), transpose=True))
    writes = [  # (crossbar, what it is written with, columns it then holds)
        (0, ("progb", {"xb": 0, "src": ss, "params": sp}), 4),
        (0, ("prog", {"xb": 0, "image": image}), 4),
        (0, ("progb", {"xb": 0, "src": ts, "params": tp}), 2),
        (0, ("prog", {"xb": 0, "image": image}), 4),
        (1, None, 4),
    ]
    for xb, write, cols in writes:
        if write is not None:
            b.emit(write[0], **write[1])
        for bit in (0, 2):
            b.emit("mvm", xb=xb, src=xs, src_col=0, bit=bit)
            b.emit("adc", dst=read, dst_col=0, xb=xb, col=0, ncols=cols)
            b.emit("shadd", dst=acc, dst_col=0, src=read, src_col=0, ncols=cols, shift=bit)
    b.emit("store", tensor=y, dst_col=0, src=acc, src_col=0, ncols=5)
    b.emit("halt")
    return b.build(), image


@pytest.mark.parametrize("tile", [None, 1, 3])
def test_prog_after_progb_holds_the_shared_image(backend, monkeypatch, tile):
    """Row tiles of the compiled core (``tile``) included."""
    core_row_tiles(monkeypatch, backend, tile)
    program, image = prog_after_progb()
    rng = np.random.default_rng(8)
    batch = 5
    x = rng.integers(0, 16, (batch, 2, 4))
    s = rng.integers(-4, 4, (batch, 4, 3))
    t = rng.integers(-2, 2, (batch, 1, 4))
    y = simulate(program, {"x": x, "s": s, "t": t}, backend).outputs["y"].reshape(batch, 2, 5)
    folded = program.images[image].folded()
    want = np.zeros((batch, 2, 5), dtype=np.int64)
    want[..., :4] += 3 * (x @ folded[:, :4])  # two progs on crossbar 0, one on crossbar 1
    offset_cells = np.concatenate([s + 4, np.ones((batch, 4, 1), np.int64)], axis=2)
    want[..., :4] += x @ offset_cells  # the raw column reads, as no shadd recombines them
    t_cells = np.stack([t[:, 0] + 2, np.ones((batch, 4), np.int64)], axis=2)
    want[..., :2] += x @ t_cells
    assert np.array_equal(y, want)


@pytest.mark.parametrize("tile", [1, 40])
def test_row_tiles_of_the_core(monkeypatch, tile):
    """Items of several row tiles each get their own matrices."""
    if simulator._core is None:
        pytest.skip("the compiled core is not built")
    core_row_tiles(monkeypatch, "cython", tile)
    rng = np.random.default_rng(tile)
    arch = CimArch(rows=8, cols=12, cell_bits=2, mapping="differential-row", crossbars=3)
    program = lower_act_matmul(
        heads=2, rows=3, k=10, n=4, transpose=False, s_bits=5, a_bits=4, arch=arch
    )
    x, s = operands(rng, 7, 2, 3, 10, 4, s_bits=5, a_bits=4, signed_input=False, signed_stored=True)
    core = run(program, x, s, False, "cython")
    reference = run(program, x, s, False, "numpy")
    assert np.array_equal(core.outputs["y"], expected(x, s))
    assert np.array_equal(reference.outputs["y"], expected(x, s))
    assert core.stats.counts() == reference.stats.counts()


# ------------------------------------------------------------------------ cost


def independent_counts(program, batch: int) -> dict:
    """The counts a run must report, from the instructions and the progb geometry."""
    cells_on, counts = {}, dict.fromkeys(isa.COUNTERS, 0)
    dr = program.arch.mapping == "differential-row"
    for mnemonic, ops in program.instructions():
        vectors = batch * program.buffer_rows[ops.get("src", ops.get("dst", 0))]
        if mnemonic == "progb":
            g = geometry(program, ops)
            cells_on[ops["xb"]] = (g["r1"] - g["r0"]) * (1 + dr) * (g["c1"] - g["c0"])
            counts["crossbar_writes"] += batch
        elif mnemonic == "mvm":
            counts["mvm_executions"] += vectors
            counts["cell_macs"] += vectors * cells_on[ops["xb"]]
        elif mnemonic == "adc":
            counts["adc_conversions"] += vectors * ops["ncols"]
        elif mnemonic in ("shadd", "req"):
            counts["digital_ops"] += vectors
        elif mnemonic == "acc":
            counts["digital_ops"] += batch * program.buffer_rows[ops["src"]]
    return counts


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_estimate_equals_the_simulation(mapping, backend):
    rng = np.random.default_rng(MAPPINGS.index(mapping))
    arch = CimArch(
        rows=16, cols=16, cell_bits=2, mapping=mapping, crossbars=4, write_latency_us=3.0,
        mvm_latency_us=0.25, adc_latency_us=0.125, shift_add_latency_us=0.0625,
        load_store_latency_us=0.5,
    )  # fmt: skip
    for heads, batch, transpose in [(1, 1, False), (3, 4, True), (2, 2, False)]:
        program = lower_act_matmul(
            heads=heads, rows=5, k=20, n=3, transpose=transpose, s_bits=6, a_bits=3, arch=arch
        )
        x, s = operands(
            rng, batch, heads, 5, 20, 3, s_bits=6, a_bits=3, signed_input=False,
            signed_stored=True,
        )  # fmt: skip
        stats = run(program, x, s, transpose, backend).stats
        assert estimate(program, batch=batch).counts() == stats.counts()
        timing_only = Simulator(backend=backend).run(program, functional=False, batch=batch)
        assert timing_only.stats.counts() == stats.counts()
        for name, value in independent_counts(program, batch).items():
            assert getattr(stats, name) == value, name
        writes = len(progbs(program))
        assert stats.crossbar_writes == batch * writes
        assert stats.latency_ps < stats.sequential_ps  # the crossbars overlap
        assert stats.sequential_ps >= batch * writes * 3_000_000


CIMAQ_SHAPES = [
    # (k, n, s_bits, a_bits, rows, heads): Q @ K^T of 64-wide heads over 64 tokens, A @ V
    (64, 64, 8, 8, 64, 4),
    (64, 64, 4, 8, 64, 4),
    (257, 129, 5, 3, 7, 3),
    (300, 100, 8, 8, 10, 2),
    (256, 256, 4, 4, 1, 1),
    (1, 1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize(("k", "n", "s_bits", "a_bits", "rows", "heads"), CIMAQ_SHAPES)
def test_cimaq_formula(k, n, s_bits, a_bits, rows, heads, transpose, backend):
    """rram-4b: per head ``writes*56us + rows*writes*ceil(a/1)*1.4us``, ``writes =
    ceil(2*n*ceil(s_bits/4)/256) * ceil(k/256)``; a batch repeats it per item."""
    arch = CimArch.preset("rram-4b")
    program = lower_act_matmul(
        heads=heads, rows=rows, k=k, n=n, transpose=transpose, s_bits=s_bits, a_bits=a_bits,
        arch=arch,
    )  # fmt: skip
    writes = ceil_div(2 * n * ceil_div(s_bits, 4), 256) * ceil_div(k, 256)
    per_head = writes * WRITE_PS + rows * writes * ceil_div(a_bits, 1) * EXEC_PS
    for batch in (1, 2):
        stats = Simulator(backend=backend).run(program, functional=False, batch=batch).stats
        assert stats.latency_ps == stats.sequential_ps == batch * heads * per_head
        assert stats.crossbar_writes == batch * heads * writes
        assert estimate(program, batch=batch).counts() == stats.counts()


# ---------------------------------------------------------------- verification


def small_program():
    arch = CimArch(rows=8, cols=8, cell_bits=2, mapping="differential-column")
    return lower_act_matmul(
        heads=2, rows=2, k=5, n=3, transpose=False, s_bits=4, a_bits=3, arch=arch
    )


BAD_PARAMS = [
    ({"K": 0}, r"K=0 outside 1\.\.65535"),
    ({"N": 70000}, r"N=70000 outside 1\.\.65535"),
    ({"col": -1}, r"col=-1 outside 0\.\.65535"),
    ({"transpose": 2}, r"transpose=2 outside 0\.\.1"),
    ({"bits": 0}, r"bits=0 outside 1\.\.16"),
    ({"bits": 17}, r"bits=17 outside 1\.\.16"),
    ({"col": 4}, r"progb operand columns 4\.\.6 outside width 6"),
    ({"K": 6}, r"progb: the operand spans 6 rows per item, b1 has 5"),
    ({"transpose": 1, "col": 3}, r"progb operand columns 3\.\.7 outside width 6"),
    ({"r1": 6}, r"inputs 0\.\.6 are not a range within K=5"),
    ({"r0": 3, "r1": 3}, r"inputs 3\.\.3 are not a range"),
    ({"c1": 13}, r"columns 0\.\.13 are not a range within the 12 logical columns of N=3 at 4"),
    ({"c0": 0, "c1": 12}, r"a tile of 5x12 cells exceeds the 8x8 crossbar"),
]


@pytest.mark.parametrize(("edits", "match"), BAD_PARAMS)
def test_verifier_rejects_bad_params(edits, match):
    program = small_program()
    verify(program)
    index, ops = progbs(program)[0]
    for name, value in edits.items():
        program.constants[ops["params"]][0, isa.PROGB_PARAMS.index(name)] = value
    with pytest.raises(ProgramError, match=match) as info:
        verify(program)
    assert info.value.index == index


def test_verifier_rejects_bad_tables_and_dataflow():
    program = small_program()
    index, ops = progbs(program)[0]
    column = isa.BY_MNEMONIC["progb"].field_index("params")
    program.code[index, column] = len(program.constants)
    with pytest.raises(ProgramError, match=rf"const c{len(program.constants)} out of range"):
        verify(program)
    program = small_program()
    program.constants[ops["params"]] = np.zeros((1, 8), np.int64)
    with pytest.raises(ProgramError, match=r"progb params c\d+ must be \[1, 9\]"):
        verify(program)
    b = ProgramBuilder(CimArch(rows=8, cols=8), "unwritten")
    b.buffer(3, rows=5)
    b.emit("progb", xb=0, src=0, params=b.constant(progb_params(0, 5, 3, 4, (0, 5), (0, 6))))
    b.emit("halt")
    with pytest.raises(ProgramError, match=r"instruction 0: progb reads b0 before any"):
        verify(b.build())


def test_mvm_reads_the_inputs_of_the_progb_tile():
    program = small_program()
    index, ops = progbs(program)[0]
    mvm = next(i for i, (m, o) in enumerate(program.instructions()) if i > index and m == "mvm")
    program.code[mvm, isa.BY_MNEMONIC["mvm"].field_index("src_col")] = 6  # 5 inputs from 6
    with pytest.raises(ProgramError, match=r"mvm input columns 6\.\.10 outside width 10"):
        verify(program)


def wide_stored(program, bits: int):
    """The program with its ``s`` input declared ``bits`` wide: the input check lets
    values through that the progb rejects."""
    program.inputs[1] = TensorDesc(**{**program.inputs[1].to_dict(), "bits": bits})
    return program


@pytest.mark.parametrize("tile", [None, 1])
def test_operand_out_of_range_is_an_input_error(backend, monkeypatch, tile):
    """The first value out of range, by item: the same message on both backends."""
    core_row_tiles(monkeypatch, backend, tile)
    program = wide_stored(small_program(), 8)
    index = progbs(program)[0][0]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, (4 * 2, 10))
    s = rng.integers(-8, 8, (4, 5, 6))
    s[2, 1, 2] = 8  # item 2, row 1, column 2: head 0
    s[3, 0, 0] = -100
    message = (
        rf"instruction {index}: progb: item 2's operand holds 8 at b1 row 1, column 2, "
        r"outside signed 4-bit range -8\.\.7"
    )
    with pytest.raises(InputError, match=message):
        simulate(program, {"x": x, "s": s.reshape(20, 6)}, backend)
    s[2, 1, 2] = 7
    s[3, 0, 0] = 0
    s[1, 4, 5] = -9  # head 1's operand: its first progb comes later
    with pytest.raises(InputError, match=r"item 1's operand holds -9 at b1 row 4, column 5,"):
        simulate(program, {"x": x, "s": s.reshape(20, 6)}, backend)
    s[1, 4, 5] = -8
    result = simulate(program, {"x": x, "s": s.reshape(20, 6)}, backend)
    assert np.array_equal(result.outputs["y"], expected(x.reshape(4, 2, 10), stored_heads(s, 2)))


def stored_heads(s_rows: np.ndarray, heads: int) -> np.ndarray:
    """``[batch, k, heads*n]`` as the buffer holds it, to ``[batch, heads, k, n]``."""
    batch, k, width = s_rows.shape
    return s_rows.reshape(batch, k, heads, width // heads).transpose(0, 2, 1, 3)


def test_codegen_rejects_bad_arguments():
    b = ProgramBuilder(CimArch(rows=8, cols=8), "bad")
    x, s = b.buffer(6, rows=2), b.buffer(6, rows=5)
    common = {"heads": 2, "k": 3, "n": 3, "s_bits": 4, "a_bits": 3, "signed_input": False}
    with pytest.raises(CimError, match=r"input columns 0\.\.7 outside b0's width 6"):
        emit_act_matmul(b, x, s, transpose=False, rows=2, **{**common, "k": 4})
    with pytest.raises(CimError, match=r"rows=3, the input b0 has 2"):
        emit_act_matmul(b, x, s, transpose=False, rows=3, **common)
    with pytest.raises(CimError, match=r"stored operand needs 6 rows per item, b1 has 5"):
        emit_act_matmul(b, x, s, transpose=True, rows=2, **{**common, "n": 6, "k": 3})
    with pytest.raises(CimError, match=r"s_bits must be an integer in 1\.\.16"):
        emit_act_matmul(b, x, s, transpose=False, rows=2, **{**common, "s_bits": 17})
    with pytest.raises(CimError, match=r"heads must be a positive integer"):
        emit_act_matmul(b, x, s, transpose=False, rows=2, **{**common, "heads": 0})


# ---------------------------------------------------------------- text and memory


def test_assembly_round_trip():
    program = small_program()
    text = disassemble(program)
    assert "progb xb=x0 src=b1 params=c" in text
    again = assemble(text)
    assert np.array_equal(again.code, program.code)
    assert all(np.array_equal(a, b) for a, b in zip(again.constants, program.constants))
    assert again.buffers == program.buffers and again.buffer_rows == program.buffer_rows
    assert disassemble(again) == text
    encoded = type(program).from_bytes(program.to_bytes())
    assert np.array_equal(encoded.code, program.code)


def test_memory_estimate_bounds_the_real_peak(backend):
    """Per-item matrices dominate: 8 items of a 256 x 256 tile each."""
    arch = CimArch(rows=256, cols=256, cell_bits=1, crossbars=1)
    program = lower_act_matmul(
        heads=1, rows=1, k=256, n=16, transpose=False, s_bits=8, a_bits=1, arch=arch
    )
    sim = Simulator(backend=backend)
    prepared = sim.prepare(program)
    batch = 8
    rng = np.random.default_rng(2)
    inputs = {
        "x": rng.integers(0, 2, (batch, 256)),
        "s": rng.integers(-128, 128, (batch * 256, 16)),
    }
    need = prepared.memory_bytes(batch, backend)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sim.run(prepared, inputs, batch=batch)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= need
    assert need <= 3 * peak + (1 << 20)
    assert peak >= 2 * 256 * 256 * 4  # the items' own matrices are really held
