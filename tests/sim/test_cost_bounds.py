"""The memory and work bounds on crafted programs: each program makes one plane of a
backend as large as it can; the memory a run really allocates (numpy's allocations, as
``tracemalloc`` sees them) stays within the estimate, and the estimate within 3x of it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import InputError
from tvm_cim.sim import ProgramBuilder, Simulator, TensorDesc, im2col_params

MIB = 2**20


def chunk_plane() -> ProgramBuilder:
    """One mvm drives 16384 rows per item, another a 512-row image: the core's DAC chunk
    plane is the product of the two."""
    b = ProgramBuilder(CimArch(rows=512, cols=8, cell_bits=1, crossbars=2), "chunks")
    b.buffer(1, rows=16384)
    b.buffer(512)
    b.image(np.ones((1, 1), np.uint8))
    b.image(np.ones((512, 1), np.uint8))
    b.emit("prog", xb=0, image=0)
    b.emit("mvm", xb=0, src=0, src_col=0, bit=0)
    b.emit("prog", xb=1, image=1)
    b.emit("mvm", xb=1, src=1, src_col=0, bit=0, signed=1)
    return b


def held_sums() -> ProgramBuilder:
    """Two crossbars hold 4096 columns of sums for 2048 rows per item."""
    b = ProgramBuilder(CimArch(rows=2, cols=4096, cell_bits=1, crossbars=2), "held")
    b.buffer(1, rows=2048)
    b.buffer(4096, rows=2048)
    b.image(np.ones((1, 4096), np.uint8))
    for xb in (0, 1):
        b.emit("prog", xb=xb, image=0)
        b.emit("mvm", xb=xb, src=0, src_col=0, bit=0)
    b.emit("adc", dst=1, dst_col=0, xb=1, col=0, ncols=4096)
    return b


def weights() -> ProgramBuilder:
    """Four crossbars each fold a differential 1024 x 1024 image."""
    b = ProgramBuilder(CimArch(rows=1024, cols=1024, cell_bits=1, crossbars=4), "weights")
    b.buffer(512)
    b.image(np.ones((1024, 1024), np.uint8), differential_rows=True)
    for xb in range(4):
        b.emit("prog", xb=xb, image=0)
        b.emit("mvm", xb=xb, src=0, src_col=0, bit=0)
    return b


def digital() -> ProgramBuilder:
    """Wide digital steps on 1024 rows of 2048 columns, stored to a 2048-wide output."""
    b = ProgramBuilder(CimArch(rows=2, cols=2, cell_bits=1), "digital")
    b.output(TensorDesc("y", 2048, "int64", 64, True, rows=1024))
    b.buffer(2048, rows=1024)
    b.buffer(2048, rows=1024)
    b.constant(np.stack([np.zeros(2048), np.ones(2048), np.full(2048, 3)]).astype(np.int64))
    b.emit("shadd", dst=1, dst_col=0, src=0, src_col=0, ncols=2048, shift=2)
    b.emit("acc", dst=1, dst_col=1, src=1, src_col=0, ncols=2047)
    b.emit("req", dst=0, dst_col=0, src=1, src_col=0, ncols=2048, params=0, bits=16, signed=1)
    b.emit("store", tensor=0, dst_col=0, src=0, src_col=0, ncols=2048)
    return b


def im2col() -> ProgramBuilder:
    """A 3x3 im2col of a 128 x 128 x 8 image."""
    b = ProgramBuilder(CimArch(rows=2, cols=2, cell_bits=1), "im2col")
    b.input(TensorDesc("x", 8, "uint8", 8, False, rows=128 * 128))
    b.buffer(8, rows=128 * 128)
    b.buffer(72, rows=128 * 128)
    b.constant(im2col_params(128, 128, 8, (3, 3), padding=(1, 1, 1, 1)))
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=8)
    b.emit("im2col", dst=1, src=0, params=0, pad=0)
    return b


PROGRAMS = {"chunk plane": chunk_plane, "held sums": held_sums, "weights": weights}
PROGRAMS |= {"digital": digital, "im2col": im2col}


def _program(name: str):
    b = PROGRAMS[name]()
    b.emit("halt")
    return b.build()


def _inputs(prepared, batch: int) -> dict:
    return {t.name: np.ones((batch * t.rows, t.width), np.uint8) for t in prepared.inputs}


def _peak(sim: Simulator, prepared, inputs: dict, batch: int) -> int:
    """Most bytes numpy had allocated during the run, beyond what it held before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sim.run(prepared, inputs, batch=batch)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_memory_estimate_bounds_the_real_peak(backend, name, batch):
    sim = Simulator(backend=backend)
    prepared = sim.prepare(_program(name))
    estimate = prepared.memory_bytes(batch, backend)
    peak = _peak(sim, prepared, _inputs(prepared, batch), batch)
    assert peak <= estimate, (peak / MIB, estimate / MIB)
    assert estimate <= 3 * peak + MIB, (peak / MIB, estimate / MIB)


def test_the_core_estimate_counts_the_chunk_plane():
    """16384 rows times a 512-row image: 32 MiB of float32 chunks, for a one-byte-wide
    input; the estimate used to count buffers and sums only."""
    prepared = Simulator().prepare(_program("chunk plane"))
    assert prepared.memory_bytes(1, "cython") >= 16384 * 512 * 4


def test_a_run_over_the_memory_limit_is_refused_before_allocating(backend):
    prepared = Simulator(backend=backend).prepare(_program("held sums"))
    need = prepared.memory_bytes(1, backend)
    small = Simulator(backend=backend, memory_limit=need - 1)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"needs \d+\.\d [KMG]iB of memory .* limit") as info:
            small.run(prepared, {})
        assert tracemalloc.get_traced_memory()[1] < MIB  # refused before allocating
    finally:
        tracemalloc.stop()
    assert "\n" not in str(info.value) and "--memory-limit" in str(info.value)
    Simulator(backend=backend, memory_limit=need).run(prepared, {})


def test_memory_limit_from_the_environment(backend, monkeypatch):
    monkeypatch.setenv("TVM_CIM_SIM_MEMORY_LIMIT", "1M")
    with pytest.raises(InputError, match=r"over the 1\.0 MiB limit"):
        Simulator(backend=backend).run(_program("held sums"), {})
    monkeypatch.setenv("TVM_CIM_SIM_MEMORY_LIMIT", "plenty")
    with pytest.raises(Exception, match="not a size"):
        Simulator(backend=backend)


def test_work_is_counted_and_bounded(backend):
    """The work of the digital program, counted by hand, and refused one above."""
    prepared = Simulator(backend=backend).prepare(_program("digital"))
    from tvm_cim.sim.simulator import COLUMN_OPS, VECTOR_OPS

    columns = 2048 + 2047 + 2048 + 2048
    per_item = 1024 * (4 * VECTOR_OPS + COLUMN_OPS * columns) + 5  # and 5 instructions
    assert prepared.work(2) == 2 * per_item
    with pytest.raises(InputError, match=rf"a batch of 2 needs {str(2 * per_item)[0]}\.") as info:
        Simulator(backend=backend, work_limit=2 * per_item - 1).run(prepared, {}, batch=2)
    assert "--work-limit" in str(info.value) and "TVM_CIM_SIM_WORK_LIMIT" in str(info.value)
    Simulator(backend=backend, work_limit=2 * per_item).run(prepared, {}, batch=2)
    # timing only: no values, no work bound
    Simulator(backend=backend, work_limit=1).run(prepared, functional=False, batch=2)


def test_cell_macs_dominate_the_work_of_an_mvm():
    prepared = Simulator().prepare(_program("weights"))
    # four mvms of one vector each over 1024 x 1024 cells, and four progs writing them
    assert prepared.work(1) >= 4 * 1024 * 1024 * 2
