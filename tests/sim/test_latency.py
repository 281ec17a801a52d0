"""Latency, counts and energy: the static estimate, the simulator and the CIM-AQ model.

Times are integer picoseconds, so every comparison here is exact.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import random_inputs, random_weights, simulate
from tvm_cim import CimArch, InputError
from tvm_cim.codegen import lower_matmul
from tvm_cim.core.arch import MAPPINGS
from tvm_cim.core.quant import Requantize
from tvm_cim.sim import ProgramBuilder, TensorDesc, estimate, estimate_spans, isa

WRITE_PS = 56_000_000
EXEC_PS = 1_400_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def cimaq_latency_ps(m: int, n: int, batch: int, w: int, a: int, arch: CimArch) -> tuple:
    """``(latency_ps, writes, execs)`` of one layer, written from the CIM-AQ formula."""
    slices = ceil_div(w, arch.cell_bits)
    cols = m * slices
    rows = n
    if arch.mapping == "offset":
        cols += 1
    elif arch.mapping == "differential-column":
        cols *= 2
    else:
        rows *= 2
    writes = ceil_div(cols, arch.cols) * ceil_div(rows, arch.rows)
    execs = batch * writes * ceil_div(a, arch.dac_bits)
    return writes * WRITE_PS + execs * EXEC_PS, writes, execs


def program_counts(program, batch: int) -> dict:
    """The counts a run must report, derived from the instruction list alone."""
    ops = list(program.instructions())
    mnemonics = [m for m, _ in ops]
    images_on = {}
    cell_macs = 0
    for m, o in ops:
        if m == "prog":
            images_on[o["xb"]] = program.images[o["image"]]
        elif m == "mvm":
            img = images_on[o["xb"]]
            cell_macs += batch * img.physical_rows * img.cols
    return {
        "crossbar_writes": mnemonics.count("prog"),
        "mvm_executions": batch * mnemonics.count("mvm"),
        "cell_macs": cell_macs,
        "adc_conversions": batch * sum(o["ncols"] for m, o in ops if m == "adc"),
        "digital_ops": batch * sum(mnemonics.count(m) for m in ("shadd", "acc", "req")),
        "instructions": {m: mnemonics.count(m) for m in set(mnemonics)},
    }


def sequential_ps(program, batch: int, arch: CimArch) -> int:
    """Sum of every instruction's latency, from the ISA table and the arch."""
    lat = arch.latency_ps()
    total = 0
    for m, _ in program.instructions():
        spec = isa.BY_MNEMONIC[m]
        if spec.latency_class:
            total += lat[spec.latency_class] * (batch if spec.per_vector else 1)
    return total


def unit_busy_ps(program, batch: int, arch: CimArch) -> dict:
    """Total latency per unit: no schedule can finish before its busiest unit."""
    lat = arch.latency_ps()
    busy: dict = {}
    for m, o in program.instructions():
        spec = isa.BY_MNEMONIC[m]
        if spec.latency_class:
            unit = ("xb", o["xb"]) if spec.unit == "crossbar" else spec.unit
            busy[unit] = busy.get(unit, 0) + lat[spec.latency_class] * (
                batch if spec.per_vector else 1
            )
    return busy


def check_stats(stats, program, batch: int, arch: CimArch) -> None:
    counts = program_counts(program, batch)
    assert stats.batch == batch
    assert stats.instructions == counts.pop("instructions")
    for key, value in counts.items():
        assert getattr(stats, key) == value, key
    assert stats.sequential_ps == sequential_ps(program, batch, arch)
    busy = unit_busy_ps(program, batch, arch)
    assert max(busy.values(), default=0) <= stats.latency_ps <= stats.sequential_ps
    assert stats.busy_ps == [busy.get(("xb", i), 0) for i in range(arch.crossbars)]


# ------------------------------------------------------------ CIM-AQ formula

SHAPES = [(1, 1), (256, 256), (257, 513), (1000, 10), (10, 1000), (255, 129)]  # (n, m)
BITS = [(8, 8), (4, 4), (2, 6), (3, 5), (1, 1)]


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("preset", ["rram-4b", "rram-2b"])
@pytest.mark.parametrize(("n", "m"), SHAPES, ids=[f"{n}x{m}" for n, m in SHAPES])
def test_cimaq_formula(n, m, preset, mapping, backend):
    """One crossbar, paper latencies: the simulated latency is the paper's formula."""
    arch = CimArch.preset(preset).replace(mapping=mapping)
    rng = np.random.default_rng([n, m])
    weight = random_weights(rng, n, m, 8)
    for w, a in BITS:
        program = lower_matmul(weight >> (8 - w), w_bits=w, a_bits=a, arch=arch)
        for batch in (1, 3):
            expected, writes, execs = cimaq_latency_ps(m, n, batch, w, a, arch)
            stats = simulate(program, None, backend, functional=False, batch=batch).stats
            assert stats.latency_ps == expected, (w, a, batch)
            assert stats.sequential_ps == expected
            assert stats.crossbar_writes == writes
            assert stats.mvm_executions == execs
            assert stats.latency_us == pytest.approx(expected / 1e6)
            assert estimate(program, batch).counts() == stats.counts()


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_cimaq_formula_functional_run(mapping, backend):
    """The same figures come out of a run that computes values."""
    arch = CimArch.preset("rram-4b").replace(mapping=mapping)
    rng = np.random.default_rng(3)
    weight = random_weights(rng, 300, 70, 6)
    x = random_inputs(rng, 2, 300, 5, False)
    program = lower_matmul(weight, w_bits=6, a_bits=5, arch=arch)
    result = simulate(program, {"x": x}, backend)
    assert np.array_equal(result.outputs["y"], x @ weight)
    expected, _, _ = cimaq_latency_ps(70, 300, 2, 6, 5, arch)
    assert result.stats.latency_ps == expected
    dry = simulate(program, {"x": x}, backend, functional=False).stats
    assert dry.counts() == result.stats.counts()


def test_cimaq_hardware_config_file(tmp_path, backend):
    """A CIM-AQ ``hardware_config.yaml`` read as is gives the same figures."""
    (tmp_path / "hw.yaml").write_text(
        "crossbar:\n  size: {m: 256, n: 256}\n  resolution_weight_bits: 2\n"
        "  resolution_input_bits: 1\n  mvm_write_latency: 56\n  mvm_execute_latency: 1.4\n"
        "mapper:\n  mapping_type: of\n"
    )
    arch = CimArch.load(tmp_path / "hw.yaml")
    weight = random_weights(np.random.default_rng(0), 600, 300, 7)
    program = lower_matmul(weight, w_bits=7, a_bits=3, arch=arch)
    stats = simulate(program, None, backend, functional=False, batch=4).stats
    # slices 4, cols 300*4+1 = 1201 -> 5, rows 600 -> 3: 15 writes, 4*15*3 execs
    assert stats.latency_ps == 15 * WRITE_PS + 180 * EXEC_PS
    assert stats.latency_ps == cimaq_latency_ps(300, 600, 4, 7, 3, arch)[0]


# --------------------------------------------------- estimate == simulation

latency_us = st.sampled_from([0.0, 0.001, 0.25, 1.4, 3.0])

cost_arch = st.builds(
    CimArch,
    rows=st.sampled_from([8, 16, 32]),
    cols=st.sampled_from([6, 16, 24]),
    cell_bits=st.integers(1, 4),
    dac_bits=st.integers(1, 3),
    adc_bits=st.none() | st.integers(2, 8),
    mapping=st.sampled_from(MAPPINGS),
    crossbars=st.integers(1, 5),
    write_latency_us=latency_us,
    mvm_latency_us=latency_us,
    adc_latency_us=latency_us,
    shift_add_latency_us=latency_us,
    requant_latency_us=latency_us,
    load_store_latency_us=latency_us,
)


@given(
    arch=cost_arch,
    k=st.integers(1, 50),
    n=st.integers(1, 12),
    w=st.integers(1, 8),
    a=st.integers(1, 8),
    batch=st.integers(1, 6),
    requant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_estimate_equals_simulation(arch, k, n, w, a, batch, requant, seed, backend):
    rng = np.random.default_rng(seed)
    weight = random_weights(rng, k, n, w)
    rq = Requantize(multiplier=3, shift=5, signed=True) if requant else None
    program = lower_matmul(weight, w_bits=w, a_bits=a, arch=arch, requant=rq)
    x = random_inputs(rng, batch, k, a, False)
    stats = simulate(program, {"x": x}, backend).stats
    assert estimate(program, batch).counts() == stats.counts()
    check_stats(stats, program, batch, arch)
    if arch.crossbars == 1 and all(
        v == 0 for key, v in arch.latency_ps().items() if key not in ("write", "mvm", "adc")
    ):
        assert stats.latency_ps == stats.sequential_ps  # one busy unit: nothing overlaps


def test_estimate_default_and_fixed_batch():
    arch = CimArch(rows=16, cols=24)
    weight = random_weights(np.random.default_rng(1), 20, 5, 4)
    free = lower_matmul(weight, w_bits=4, a_bits=4, arch=arch)
    assert estimate(free).batch == 1
    fixed = lower_matmul(weight, w_bits=4, a_bits=4, arch=arch, batch=7)
    assert estimate(fixed).batch == 7
    assert estimate(fixed, 7).counts() == estimate(fixed).counts()
    with pytest.raises(InputError, match="batch of 7"):
        estimate(fixed, 3)
    with pytest.raises(InputError):
        estimate(free, 0)
    assert estimate(free, 5).latency_ps > estimate(free, 1).latency_ps


@pytest.mark.parametrize("batch", [1, 2, 9])
def test_functional_false_same_stats(batch, backend):
    arch = CimArch(
        rows=16,
        cols=24,
        cell_bits=2,
        adc_bits=6,
        crossbars=3,
        adc_latency_us=0.1,
        shift_add_latency_us=0.02,
    )
    rng = np.random.default_rng(batch)
    weight = random_weights(rng, 40, 9, 7)
    program = lower_matmul(weight, w_bits=7, a_bits=6, arch=arch, signed_input=True)
    x = random_inputs(rng, batch, 40, 6, True)
    wet = simulate(program, {"x": x}, backend).stats
    dry = simulate(program, {"x": x}, backend, functional=False)
    assert dry.stats.counts() == wet.counts()
    assert not dry.outputs["y"].any()
    # without inputs, the batch comes from the argument
    assert simulate(program, None, backend, functional=False, batch=batch).stats.counts() == (
        wet.counts()
    )


# ---------------------------------------------------------- several crossbars


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize(("n", "m"), [(257, 513), (1000, 10), (600, 100)])
def test_parallel_crossbars(n, m, mapping, backend):
    base = CimArch.preset("rram-4b").replace(mapping=mapping)
    weight = random_weights(np.random.default_rng([n, m]), n, m, 8)
    one = lower_matmul(weight, w_bits=8, a_bits=8, arch=base)
    four = lower_matmul(weight, w_bits=8, a_bits=8, arch=base.replace(crossbars=4))
    for batch in (1, 5):
        s1 = simulate(one, None, backend, functional=False, batch=batch).stats
        s4 = simulate(four, None, backend, functional=False, batch=batch).stats
        assert s4.crossbar_writes == s1.crossbar_writes > 1
        assert s4.sequential_ps == s1.sequential_ps == s1.latency_ps
        assert s4.latency_ps < s4.sequential_ps
        assert max(s4.busy_ps) <= s4.latency_ps
        assert sum(s4.busy_ps) == s1.busy_ps[0]
        assert len([b for b in s4.busy_ps if b]) == min(4, s1.crossbar_writes)
        # the four crossbars share the writes as evenly as round-robin allows
        assert s4.latency_ps >= math.ceil(s1.crossbar_writes / 4) * (WRITE_PS + batch * 8 * EXEC_PS)
        check_stats(s4, four, batch, four.arch)


def test_one_tile_gains_nothing_from_more_crossbars(backend):
    arch = CimArch.preset("rram-4b")
    weight = random_weights(np.random.default_rng(2), 100, 30, 4)
    one = lower_matmul(weight, w_bits=4, a_bits=8, arch=arch)
    many = lower_matmul(weight, w_bits=4, a_bits=8, arch=arch.replace(crossbars=8))
    s1 = simulate(one, None, backend, functional=False, batch=2).stats
    s8 = simulate(many, None, backend, functional=False, batch=2).stats
    assert s8.latency_ps == s8.sequential_ps == s1.latency_ps == WRITE_PS + 2 * 8 * EXEC_PS


def test_what_if_arch_changes_latency_only(backend):
    """Another arch with the same structure runs the program with its own latencies."""
    arch = CimArch(rows=16, cols=24, cell_bits=2)
    weight = random_weights(np.random.default_rng(4), 30, 6, 5)
    program = lower_matmul(weight, w_bits=5, a_bits=4, arch=arch)
    slow = arch.replace(write_latency_us=100.0, mvm_latency_us=2.0, name="slow")
    base = simulate(program, None, backend, functional=False, batch=2).stats
    other = simulate(program, None, backend, arch=slow, functional=False, batch=2).stats
    assert other.crossbar_writes == base.crossbar_writes
    assert other.mvm_executions == base.mvm_executions
    assert other.latency_ps == (
        base.crossbar_writes * 100_000_000 + base.mvm_executions * 2_000_000
    )
    assert estimate(program, 2, arch=slow).counts() == other.counts()


# --------------------------------------------------------------------- energy


@pytest.mark.parametrize(
    "energies",
    [
        {"write_energy_nj": 1000.0, "mvm_energy_nj": 2.5, "adc_energy_nj": 0.125},
        {"write_energy_nj": 3.0},
        {"digital_energy_nj": 0.01, "adc_energy_nj": 0.5},
        {"write_energy_nj": 0.0, "mvm_energy_nj": 0.0, "adc_energy_nj": 0.0},
    ],
)
def test_energy(energies, backend):
    arch = CimArch(rows=16, cols=24, cell_bits=2, adc_bits=5, crossbars=2, **energies)
    rng = np.random.default_rng(8)
    weight = random_weights(rng, 35, 7, 6)
    program = lower_matmul(weight, w_bits=6, a_bits=4, arch=arch, requant=Requantize(5, 6))
    stats = simulate(program, None, backend, functional=False, batch=3).stats
    counts = program_counts(program, 3)
    expected = (
        counts["crossbar_writes"] * energies.get("write_energy_nj", 0.0)
        + counts["mvm_executions"] * energies.get("mvm_energy_nj", 0.0)
        + counts["adc_conversions"] * energies.get("adc_energy_nj", 0.0)
        + counts["digital_ops"] * energies.get("digital_energy_nj", 0.0)
    )
    assert stats.energy_nj == pytest.approx(expected, rel=1e-12, abs=0)
    assert stats.to_dict()["energy_nj"] == stats.energy_nj


def test_no_energy_figures():
    arch = CimArch(rows=16, cols=24)
    program = lower_matmul(np.ones((5, 5), dtype=int), w_bits=2, a_bits=2, arch=arch)
    stats = estimate(program, 2)
    assert stats.energy_nj is None
    assert stats.to_dict()["energy_nj"] is None


# --------------------------------------------------------------------- cycles


@pytest.mark.parametrize("clock_ghz", [1.0, 1.5, 0.3, 2.4, 0.001, 7.0])
def test_cycles(clock_ghz, backend):
    arch = CimArch(rows=16, cols=24, clock_ghz=clock_ghz, mvm_latency_us=1.0001)
    weight = random_weights(np.random.default_rng(6), 20, 5, 3)
    program = lower_matmul(weight, w_bits=3, a_bits=5, arch=arch)
    stats = simulate(program, None, backend, functional=False, batch=3).stats
    exact = Fraction(stats.latency_ps) * Fraction(str(clock_ghz)) / 1000
    assert stats.cycles == math.ceil(exact)
    assert stats.to_dict()["cycles"] == stats.cycles
    assert arch.cycles(stats.latency_ps) == stats.cycles


def test_cycles_round_up():
    arch = CimArch(clock_ghz=1.0)
    assert arch.cycles(0) == 0
    assert arch.cycles(1) == 1
    assert arch.cycles(1000) == 1
    assert arch.cycles(1001) == 2
    assert CimArch(clock_ghz=0.3).cycles(10_000) == 3
    assert CimArch(clock_ghz=0.3).cycles(10_001) == 4
    with pytest.raises(TypeError):
        arch.cycles(1.5)


def test_stats_dict_is_consistent():
    arch = CimArch(rows=16, cols=24, crossbars=2, adc_latency_us=0.5)
    weight = random_weights(np.random.default_rng(7), 40, 12, 8)
    stats = estimate(lower_matmul(weight, w_bits=8, a_bits=3, arch=arch), 4)
    d = stats.to_dict()
    assert d["latency_ps"] == stats.latency_ps
    assert d["latency_us"] == stats.latency_ps / 1e6
    assert d["sequential_latency_us"] == stats.sequential_ps / 1e6
    assert d["busy_us"] == [b / 1e6 for b in stats.busy_ps]
    assert sum(d["instructions"].values()) == sum(d["instruction_classes"].values())
    assert d["instruction_classes"]["write"] == stats.crossbar_writes
    assert d["instruction_classes"]["control"] == 1  # halt


# ------------------------------------------------------- per-operator spans


def two_operator_program(batch_rows: int = 3):
    """Two matmul-like operators on two crossbars, between a load and a store:
    instructions 1..4 use image 0, 5..8 image 1 (``rows`` vectors per item)."""
    arch = CimArch(
        rows=6,
        cols=5,
        crossbars=2,
        write_latency_us=2.0,
        mvm_latency_us=0.3,
        adc_latency_us=0.07,
        shift_add_latency_us=0.011,
        load_store_latency_us=0.005,
    )
    b = ProgramBuilder(arch, "spans")
    x = b.input(TensorDesc("x", 6, "uint8", 4, False, rows=batch_rows))
    xs, read, acc = b.buffer(6, batch_rows), b.buffer(5, batch_rows), b.buffer(5, batch_rows)
    first = b.image(np.full((6, 5), 3))
    second = b.image(np.full((4, 2), 1))
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=6)  # 0
    for xb, image, ncols in ((0, first, 3), (1, second, 2)):  # 1..4, 5..8
        b.emit("prog", xb=xb, image=image)
        b.emit("mvm", xb=xb, src=xs, src_col=0, bit=0)
        b.emit("adc", dst=read, dst_col=0, xb=xb, col=0, ncols=ncols)
        b.emit("shadd", dst=acc, dst_col=0, src=read, src_col=0, ncols=ncols)
    y = b.output(TensorDesc("y", 5, "int32", 32, True, rows=batch_rows))
    b.emit("store", tensor=y, dst_col=0, src=acc, src_col=0, ncols=5)  # 9
    b.emit("halt")  # 10
    return b.build()


def test_spans_by_hand():
    program, batch, rows = two_operator_program(), 2, 3
    lat = program.arch.latency_ps()
    vectors = batch * rows
    first, second, rest = estimate_spans(program, [[(1, 5)], [(5, 9)], [(0, 1), (9, 11)]], batch)
    for stats, cells, ncols in ((first, 6 * 5, 3), (second, 4 * 2, 2)):
        assert stats.instructions == {"prog": 1, "mvm": 1, "adc": 1, "shadd": 1}
        assert stats.crossbar_writes == 1
        assert stats.mvm_executions == vectors
        assert stats.cell_macs == vectors * cells
        assert stats.adc_conversions == vectors * ncols
        assert stats.digital_ops == vectors
        assert stats.sequential_ps == lat["write"] + vectors * (
            lat["mvm"] + lat["adc"] + lat["shift_add"]
        )
    assert first.busy_ps == [first.sequential_ps - vectors * lat["shift_add"], 0]
    assert second.busy_ps == [0, second.sequential_ps - vectors * lat["shift_add"]]
    assert rest.instructions == {"load": 1, "store": 1, "halt": 1}
    assert rest.sequential_ps == 2 * vectors * lat["load_store"]
    assert rest.crossbar_writes == rest.mvm_executions == rest.digital_ops == 0
    assert all(s.batch == batch and s.arch == program.arch for s in (first, second, rest))


@pytest.mark.parametrize("batch", [1, 4])
def test_spans_that_cover_the_program_add_up_to_estimate(batch):
    rng = np.random.default_rng(batch)
    arch = CimArch(rows=8, cols=8, crossbars=3, adc_latency_us=0.1, shift_add_latency_us=0.02)
    program = lower_matmul(random_weights(rng, 30, 7, 6), w_bits=6, a_bits=5, arch=arch)
    cuts = sorted({0, len(program), *rng.integers(0, len(program), 6).tolist()})
    ranges = list(zip(cuts, cuts[1:]))
    groups = [ranges[0::2], ranges[1::2], []]  # interleaved ranges, and an empty group
    parts = estimate_spans(program, groups, batch)
    whole = estimate(program, batch)
    assert sum(p.latency_ps for p in parts) == whole.latency_ps
    assert sum(p.sequential_ps for p in parts) == whole.sequential_ps
    for name in isa.COUNTERS:
        assert sum(getattr(p, name) for p in parts) == getattr(whole, name), name
    assert [sum(b) for b in zip(*(p.busy_ps for p in parts))] == whole.busy_ps
    merged: dict = {}
    for p in parts:
        for mnemonic, n in p.instructions.items():
            merged[mnemonic] = merged.get(mnemonic, 0) + n
    assert merged == whole.instructions
    assert parts[2].counts() == (batch, 0, 0, (), 0, 0, 0, 0, 0, (0, 0, 0))
    (one,) = estimate_spans(program, [[(0, len(program))]], batch)
    assert one.counts() == whole.counts()


def test_spans_outside_the_program():
    program = two_operator_program()
    for bad in ((3, 12), (5, 3), (-1, 2)):
        with pytest.raises(InputError, match=rf"group 1: instruction range \({bad[0]}, "):
            estimate_spans(program, [[(0, 1)], [bad]])
