"""The Cython core runs BLAS on one thread and gives the thread count back afterwards."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tvm_cim.codegen import lower_matmul
from tvm_cim.core.arch import CimArch
from tvm_cim.sim import Simulator, _core

blas = _core.blas_threads
controlled = pytest.mark.skipif(
    not blas.controlled, reason="scipy's BLAS has no OpenBLAS thread calls"
)


@pytest.fixture
def two_threads():
    """The BLAS on two threads, whatever this machine's default, then as it was."""
    before = blas.threads
    blas.threads = 2
    yield
    blas.threads = before


def _program_and_input(seed: int = 0):
    rng = np.random.default_rng(seed)
    arch = CimArch.preset("rram-4b")
    program = lower_matmul(rng.integers(-128, 128, (300, 70)), w_bits=8, a_bits=8, arch=arch)
    return program, rng.integers(0, 256, (700, 300))


@controlled
def test_hold_nests_and_restores(two_threads):
    with blas:
        assert blas.threads == 1
        with blas:
            assert blas.threads == 1
        assert blas.threads == 1  # the outer holder still runs
    assert blas.threads == 2


@controlled
def test_a_run_gives_the_count_back(two_threads):
    program, x = _program_and_input()
    ref = Simulator(backend="numpy").run(program, {"x": x})
    got = Simulator(backend="cython").run(program, {"x": x})
    assert blas.threads == 2
    assert np.array_equal(got.outputs["y"], ref.outputs["y"])


@controlled
def test_a_run_holds_one_thread(two_threads):
    """Seen from another thread while runs execute (they release the GIL meanwhile)."""
    program, x = _program_and_input(1)
    sim = Simulator(backend="cython")
    prepared = sim.prepare(program)
    done = threading.Event()
    seen = set()

    def runs():
        for _ in range(20):
            sim.run(prepared, {"x": x})
        done.set()

    worker = threading.Thread(target=runs)
    worker.start()
    while not done.is_set():
        seen.add(blas.threads)
    worker.join()
    assert 1 in seen
    assert seen <= {1, 2}
    assert blas.threads == 2


@controlled
def test_overlapping_runs(two_threads):
    """Runs in several threads share the hold; the last to end restores the count."""
    program, x = _program_and_input(2)
    expected = Simulator(backend="numpy").run(program, {"x": x}).outputs["y"]
    sim = Simulator(backend="cython")
    prepared = sim.prepare(program)
    results, errors = [], []

    def runs():
        try:
            for _ in range(5):
                results.append(sim.run(prepared, {"x": x}).outputs["y"])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=runs) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert len(results) == 20
    assert all(np.array_equal(r, expected) for r in results)
    assert blas.threads == 2


def test_timing_only_runs_leave_blas_alone():
    before = blas.threads
    program, x = _program_and_input(3)
    Simulator(backend="cython").run(program, {"x": x}, functional=False)
    assert blas.threads == before
