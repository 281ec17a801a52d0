"""A prepared program is a snapshot: it shares only cells that nothing can write."""

from __future__ import annotations

import numpy as np
import pytest

from tvm_cim.codegen import lower_matmul
from tvm_cim.core.arch import CimArch
from tvm_cim.sim import Program, Simulator, available_backends, estimate

ARCH = CimArch(rows=8, cols=8, cell_bits=2, dac_bits=1)


def matmul(seed: int = 0) -> tuple[Program, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.integers(-8, 8, (19, 5))
    x = rng.integers(0, 16, (4, 19))
    return lower_matmul(weight, w_bits=4, a_bits=4, arch=ARCH), weight, x


def test_built_and_loaded_cells_are_shared():
    program, _, _ = matmul()
    loaded = Program.from_bytes(program.to_bytes())
    for p in (program, loaded):
        prepared = Simulator().prepare(p)
        assert prepared.instructions == list(p.instructions())
        for img, kept in zip(p.images, prepared.images):
            assert not img.cells.flags.writeable
            assert kept.cells is img.cells
            with pytest.raises(ValueError):
                img.cells.flags.writeable = True


@pytest.mark.parametrize("backend", available_backends())
def test_writeable_cells_are_copied(backend):
    program, weight, x = matmul()
    view = program.images[0].cells.copy()
    read_only = view[:]  # read-only, but its base is not
    read_only.flags.writeable = False
    program.images[0].cells = read_only
    program.images[1].cells = program.images[1].cells.copy()
    sim = Simulator(backend=backend)
    prepared = sim.prepare(program)
    for img, kept in zip(program.images[:2], prepared.images):
        assert not np.shares_memory(img.cells, kept.cells)
        assert not kept.cells.flags.writeable
    view[...] = 0
    program.images[1].cells[...] = 0
    program.constants.clear()
    program.code[:] = 0
    assert np.array_equal(sim.run(prepared, {"x": x}).outputs["y"], x @ weight)


def test_broadcast_cells_stay_broadcast():
    program, _, _ = matmul()
    source = np.ones((1, 1), np.uint8)
    for img in program.images:
        img.cells = np.broadcast_to(source, img.cells.shape)
    prepared = Simulator().prepare(program)
    source[...] = 3
    for img in prepared.images:
        assert img.cells.strides == (0, 0)
        assert not np.shares_memory(img.cells, source)
        assert (img.cells == 1).all()
    stats = Simulator().run(prepared, functional=False, batch=2).stats
    assert stats.counts() == estimate(program, 2).counts()
