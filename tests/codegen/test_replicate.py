"""Weight duplication and interleaved tiles (``codegen.replicate``, ``matmul.Lanes``).

A convolution copied onto idle crossbars must compute exactly the integer convolution on
both simulator backends, cost what it runs, write each copy's tiles once, and finish in
the time of its longest window; tiles on different crossbars must run side by side.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.codegen.test_grouped_conv import _nhwc_rows, grouped_conv_nchw
from tests.conftest import simulate
from tvm_cim import CimArch
from tvm_cim.codegen import lower_matmul
from tvm_cim.codegen.layers import CimOp, Codes, ConvGeometry, Region
from tvm_cim.codegen.matmul import input_steps
from tvm_cim.codegen.region import lower_region
from tvm_cim.codegen.replicate import layer_time_ps, output_windows, replication
from tvm_cim.core.quant import quant_range
from tvm_cim.relay_passes.extract import _as_matrix
from tvm_cim.sim import estimate

#: Only crossbar writes and MVM steps cost time, as in the paper's model.
PAPER_COSTS = {"write_latency_us": 56.0, "mvm_latency_us": 1.4}


def conv_region(rng, cin, cout, size, stride, padding, w_bits=8, a_bits=8, zero_point=0, batch=1):
    """A one-convolution region (3x3 kernel) of the graph's ``batch``: ``(region, OIHW
    weight, geometry)``."""
    lo, hi = quant_range(w_bits, True)
    w = rng.integers(lo, hi + 1, (cout, cin, 3, 3))
    geometry = ConvGeometry(cin, size, size, (3, 3), (stride, stride), padding, (1, 1), 1)
    op = CimOp(
        name="conv",
        kind="conv2d",
        source=("param", 0),
        weight=_as_matrix(w, "conv2d", 1),
        in_shape=(batch, cin, size, size),
        out_shape=(batch, cout, geometry.out_height, geometry.out_width),
        input=Codes(a_bits, False, None, zero_point),
        w_bits=w_bits,
        conv=geometry,
    )
    return Region("r", [((batch, cin, size, size), "int8")], [op], [0]), w, geometry


def writes_of(program) -> int:
    return sum(1 for mnemonic, _ in program.instructions() if mnemonic == "prog")


@pytest.mark.parametrize("crossbars", [1, 2, 5, 12, 40])
@pytest.mark.parametrize(
    ("stride", "padding"), [(1, (1, 1, 1, 1)), (2, (1, 0, 2, 1)), (1, (0, 0, 0, 0))]
)
@pytest.mark.parametrize("mapping", ["differential-column", "offset", "differential-row"])
def test_copies_compute_the_convolution(backend, crossbars, stride, padding, mapping):
    rng = np.random.default_rng([crossbars, stride, len(mapping)])
    arch = CimArch(rows=32, cols=32, cell_bits=2, mapping=mapping, crossbars=crossbars)
    region, w, geometry = conv_region(rng, 4, 6, 9, stride, padding, zero_point=3)
    program = lower_region(region, arch)
    x = rng.integers(0, 256, (3, 4, 9, 9))
    result = simulate(program, {"in0": _nhwc_rows(x)}, backend)
    expected = grouped_conv_nchw(x, w, 1, stride, padding, 1, pad_value=3)
    got = result.outputs["out0"].reshape(3, geometry.out_height, geometry.out_width, 6)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), expected)
    assert result.stats.counts() == estimate(program, batch=3).counts()
    tiles = writes_of(lower_region(region, arch.replace(crossbars=1)))
    copies = writes_of(program) // tiles
    assert writes_of(program) == copies * tiles
    steps = input_steps(8, arch.dac_bits)
    assert copies == replication(tiles, geometry.out_height, geometry.out_width, steps, arch)
    if crossbars >= 2 * tiles:
        assert copies > 1


def test_copies_finish_in_the_time_of_the_longest_window():
    """One tile, 10 output rows of 10 pixels: 5 copies on 5 crossbars drive 2 rows each."""
    rng = np.random.default_rng(3)
    arch = CimArch(rows=64, cols=64, cell_bits=4, crossbars=5, **PAPER_COSTS)
    region, _, geometry = conv_region(rng, 3, 8, 10, 1, (1, 1, 1, 1))
    assert (geometry.out_height, geometry.out_width) == (10, 10)
    one = estimate(lower_region(region, arch.replace(crossbars=1)), batch=1)
    five = estimate(lower_region(region, arch), batch=1)
    steps = input_steps(8, arch.dac_bits)
    assert one.latency_us == pytest.approx(56.0 + steps * 100 * 1.4)  # the paper's model
    assert five.latency_us == pytest.approx(56.0 + steps * 20 * 1.4)
    assert five.crossbar_writes == 5 and one.crossbar_writes == 1
    assert five.mvm_executions == one.mvm_executions  # the same vectors, spread out


def test_tiles_on_their_own_crossbars_run_side_by_side():
    """A dense layer of 6 tiles: on 6 crossbars its schedule is one tile's time."""
    rng = np.random.default_rng(4)
    arch = CimArch(rows=16, cols=16, crossbars=6, **PAPER_COSTS)
    weight = rng.integers(-128, 128, (48, 8))  # 3 row tiles x 2 column tiles
    program = lower_matmul(weight, w_bits=8, a_bits=4, arch=arch, batch=7)
    stats = estimate(program)
    tile = 56.0 + input_steps(4, 1) * 7 * 1.4
    assert stats.crossbar_writes == 6
    assert stats.latency_us == pytest.approx(tile)
    assert stats.sequential_latency_us == pytest.approx(6 * tile)


def test_a_larger_batch_pays_for_more_copies(backend):
    """Three tiles on two crossbars, each write costing as much as a few output rows: for
    one image the tiles run once, in two passes; for eight the writes are shared by more
    vectors and two copies (three passes of half the rows) are faster."""
    rng = np.random.default_rng(5)
    arch = CimArch(rows=32, cols=64, cell_bits=4, crossbars=2, write_latency_us=5000.0)
    steps = input_steps(8, arch.dac_bits)
    copies = {}
    for batch in (1, 8):
        region, w, geometry = conv_region(rng, 8, 8, 12, 1, (1, 1, 1, 1), batch=batch)
        program = lower_region(region, arch)
        copies[batch] = writes_of(program) // 3
        assert copies[batch] == replication(3, 12, 12 * batch, steps, arch)
        x = rng.integers(0, 256, (batch, 8, 12, 12))
        result = simulate(program, {"in0": _nhwc_rows(x)}, backend)
        got = result.outputs["out0"].reshape(batch, 12, 12, 8).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got, grouped_conv_nchw(x, w, 1, 1, (1, 1, 1, 1), 1))
        assert result.stats.counts() == estimate(program, batch=batch).counts()
    assert (copies[1], copies[8]) == (1, 2)


def test_one_crossbar_or_one_crossbar_per_tile_means_no_copy():
    arch = CimArch(**PAPER_COSTS)
    assert replication(1, 224, 224, 8, arch) == 1  # the paper's one crossbar
    assert replication(16, 224, 224, 8, arch) == 1
    assert replication(16, 224, 224, 8, arch.replace(crossbars=16)) == 1
    # 16 tiles on 12 crossbars take two passes; 3 copies take 4 passes of a third
    assert replication(16, 224, 224, 8, arch.replace(crossbars=12)) == 3


@pytest.mark.parametrize("crossbars", [2, 3, 8, 64, 4096])
@pytest.mark.parametrize(("tiles", "rows", "width"), [(1, 224, 224), (3, 14, 14), (7, 5, 1)])
def test_the_choice_is_the_fastest_copy_count(crossbars, tiles, rows, width):
    arch = CimArch(crossbars=crossbars, **PAPER_COSTS)
    copies = replication(tiles, rows, width, 8, arch)
    assert 1 <= copies <= rows
    chosen = layer_time_ps(copies, tiles, rows, width, 8, arch)
    for other in range(1, rows + 1):
        assert chosen <= layer_time_ps(other, tiles, rows, width, 8, arch)
    # the model itself: copies sharing a crossbar run in turn, each window at once
    passes = -(-copies * tiles // crossbars)
    window = -(-rows // copies) * width
    assert chosen == passes * (56_000_000 + 8 * window * 1_400_000)


@pytest.mark.parametrize(("rows", "copies"), [(10, 1), (10, 3), (7, 7), (224, 56), (5, 2)])
def test_windows_cover_the_rows_evenly(rows, copies):
    windows = output_windows(rows, copies)
    assert len(windows) == copies
    assert [w[0] for w in windows] == [sum(r for _, r in windows[:i]) for i in range(copies)]
    sizes = [r for _, r in windows]
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
