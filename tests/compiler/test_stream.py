"""Streams of images (``codegen.pipeline``, ``compiler.stream``): weight-stationary tiles
written once, layers working on successive images at once, each image's values those of
the one-image program, and the figures those of the simulator's schedule."""

from __future__ import annotations

import numpy as np
import pytest

from tests.compiler import models
from tests.conftest import simulate
from tvm_cim import CimArch, CimError
from tvm_cim.codegen.pipeline import LOAD, stream_program, tiles_fit
from tvm_cim.codegen.replicate import StageShape, stage_time_ps, stationary_copies
from tvm_cim.core.quant import quant_range
from tvm_cim.sim import estimate
from tvm_cim.sim.timing import finish_times

tvm = pytest.importorskip("tvm")

from tvm_cim.compiler.plan import plan_for_cim  # noqa: E402
from tvm_cim.compiler.stream import stream_figures  # noqa: E402

#: Only crossbar writes and MVM steps cost time, as in the paper's model.
PAPER_COSTS = {"write_latency_us": 56.0, "mvm_latency_us": 1.4}
PRECISION = {"conv2d_0": {"w_bits": 4, "a_bits": 6}}


def cnn_plan(rng, crossbars: int):
    arch = CimArch(rows=32, cols=32, crossbars=crossbars, **PAPER_COSTS)
    return plan_for_cim(models.float_cnn(rng, batch=1), arch=arch, precision=PRECISION)


def random_inputs(program, rng):
    inputs = {}
    for t in program.inputs:
        lo, hi = quant_range(t.bits, t.signed)
        inputs[t.name] = rng.integers(lo, hi + 1, (t.rows, t.width))
    return inputs


@pytest.mark.parametrize(("crossbars", "stationary"), [(64, True), (64, False), (2, False)])
def test_each_image_of_a_stream_is_the_one_image_program(rng, backend, crossbars, stationary):
    plan = cnn_plan(rng, crossbars)
    ranges = plan.calibrate([rng.standard_normal((1, 3, 10, 10)).astype("float32")])
    single = {"conv2d_0": 1, "conv2d_1": 1}  # so that 64 crossbars hold every tile
    program = plan.programs(ranges, copies=single if crossbars == 64 else None)[0]
    assert len(program.attrs["operators"]) == 2  # two convolutions
    images = 4
    stream, labels = stream_program(program, images, stationary)
    assert stream.attrs["stationary"] is stationary and len(labels) == len(stream)
    per_image = [random_inputs(program, rng) for _ in range(images)]
    inputs = {f"{name}.{i}": x for i, xs in enumerate(per_image) for name, x in xs.items()}
    result = simulate(stream, inputs, backend)
    for i, xs in enumerate(per_image):
        alone = simulate(program, xs, backend)
        for name, y in alone.outputs.items():
            np.testing.assert_array_equal(result.outputs[f"{name}.{i}"], y)
    assert result.stats.counts() == estimate(stream).counts()
    writes = estimate(program).crossbar_writes
    assert result.stats.crossbar_writes == (writes if stationary else images * writes)
    if stationary:
        assert [labels[k] for k, (m, _) in enumerate(stream.instructions()) if m == "prog"] == [
            LOAD
        ] * writes


def test_stationary_layers_overlap_and_the_slowest_sets_the_pace(rng):
    """Two stages on crossbars of their own: once full, the stream delivers an image
    per slowest stage, while one image alone takes every stage in turn."""
    plan = cnn_plan(rng, 64)
    program = plan.programs(None, copies={"conv2d_0": 1, "conv2d_1": 1})[0]
    assert tiles_fit(program)
    images = 6
    stream, labels = stream_program(program, images)
    stats, ends = finish_times(stream, labels)
    assert stats.latency_ps == max(ends.values())
    intervals = [ends[i + 1] - ends[i] for i in range(images - 1)]
    mvm_ps = program.arch.latency_ps()["mvm"]
    stage_ps = []  # bit-serial steps over every output vector, the tiles side by side
    for op in program.attrs["operators"]:
        vectors = op["out_shape"][2] * op["out_shape"][3] if op["kind"] == "conv2d" else 1
        stage_ps.append(op["a_bits"] * vectors * mvm_ps)
    assert intervals[-1] < sum(stage_ps)
    assert intervals[-1] >= max(stage_ps)


def test_stream_figures_without_room_are_the_one_image_program_again(rng):
    plan = cnn_plan(rng, 1)
    report = plan.cost_report()
    figures = stream_figures(plan)
    assert not figures["stationary"] and figures["load_writes"] == 0
    assert figures["first_image_us"] == pytest.approx(report.total_latency_us)
    assert figures["interval_us"] == pytest.approx(report.total_latency_us)
    assert figures["writes_per_image"] == sum(op.writes for op in report.operators)


def test_stream_figures_with_stationary_weights(rng):
    plan = cnn_plan(rng, 64)
    report = plan.cost_report()
    figures = stream_figures(plan)
    assert figures["stationary"] and figures["writes_per_image"] == 0
    assert figures["load_us"] == pytest.approx(56.0)  # every tile written at once
    assert figures["load_writes"] <= 64
    assert figures["interval_us"] < report.total_latency_us
    assert figures["throughput_per_s"] == pytest.approx(1e6 / figures["interval_us"])
    assert set(figures["copies"]) == {"conv2d_0", "conv2d_1"}


def test_stationary_weights_need_room():
    arch = CimArch(crossbars=4, **PAPER_COSTS)
    layers = [StageShape("a", 3, 8, 10, 10, True), StageShape("b", 2, 8, 10, 10, True)]
    assert stationary_copies(layers, arch) is None


@pytest.mark.parametrize("crossbars", [5, 8, 13, 40, 100])
def test_stationary_copies_fit_and_speed_up_the_slowest_layer(crossbars):
    arch = CimArch(crossbars=crossbars, **PAPER_COSTS)
    layers = [
        StageShape("conv_a", 1, 8, 16, 16, True),
        StageShape("conv_b", 2, 8, 8, 8, True),
        StageShape("dense", 2, 8, 1, 1, False),
    ]
    copies = stationary_copies(layers, arch)
    assert sum(copies[layer.name] * layer.tiles for layer in layers) <= crossbars
    assert copies["dense"] == 1
    pace = max(stage_time_ps(layer, copies[layer.name], arch) for layer in layers)
    # one copy less of the slowest layer could not have been faster, and no copy count
    # wastes crossbars on a window it does not shorten
    for layer in layers[:2]:
        r = copies[layer.name]
        assert r == 1 or -(-layer.out_rows // r) < -(-layer.out_rows // (r - 1))
    best = min(
        max(
            stage_time_ps(layers[0], a, arch),
            stage_time_ps(layers[1], b, arch),
            stage_time_ps(layers[2], 1, arch),
        )
        for a in range(1, 17)
        for b in range(1, 9)
        if a + 2 * b + 2 <= crossbars
    )
    assert pace == best


def test_bad_streams(rng):
    plan = cnn_plan(rng, 2)
    program = plan.cost_report().programs[0]
    with pytest.raises(CimError, match="do not fit 2 crossbars"):
        stream_program(program, 2, stationary=True)
    with pytest.raises(CimError, match="at least one image"):
        stream_program(program, 0)
    with pytest.raises(CimError, match="labels for a program"):
        finish_times(program, [0])


def test_a_stream_needs_offloaded_operators():
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.relu(x))
        bb.emit_func_output(y)
    with pytest.raises(CimError, match="no operator the crossbars can run"):
        stream_figures(plan_for_cim(bb.get()))
