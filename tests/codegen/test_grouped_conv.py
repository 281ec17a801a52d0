"""Grouped and depthwise convolutions on the crossbars (``codegen.grouped``).

The crossbar programs must compute exactly the integer convolution (numpy, TVM's llvm
build), the static cost model must give the simulator's figures, the tile count must be
the documented formula. onnxruntime's QDQ depthwise-separable network is in the
conformance suite (``tests/conformance/test_onnxruntime.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.script import relax as R  # noqa: E402

from tests.compiler import models  # noqa: E402
from tests.compiler.conftest import build_llvm, run_vm  # noqa: E402
from tests.conftest import simulate  # noqa: E402
from tvm_cim import CimArch, compile_for_cim  # noqa: E402
from tvm_cim.codegen.grouped import group_sets  # noqa: E402
from tvm_cim.codegen.layers import CimOp, Codes, ConvGeometry, Region  # noqa: E402
from tvm_cim.codegen.mapping import logical_shape  # noqa: E402
from tvm_cim.codegen.matmul import input_steps  # noqa: E402
from tvm_cim.codegen.region import lower_region  # noqa: E402
from tvm_cim.core.quant import activation_scale, quant_range, quantize, weight_scales  # noqa: E402
from tvm_cim.relay_passes.extract import _as_matrix  # noqa: E402
from tvm_cim.sim import estimate  # noqa: E402
from tvm_cim.sim.builder import im2col_params  # noqa: E402

# (input channels, output channels, groups): depthwise, grouped with Cg, Og > 1, and
# a multiplier (Og = 2 Cg).
SHAPES = [(8, 8, 8), (8, 8, 2), (8, 12, 4), (12, 24, 3), (6, 12, 6)]
# (stride, padding (top, left, bottom, right), dilation)
WINDOWS = [(1, (1, 1, 1, 1), 1), (2, (1, 1, 1, 1), 1), (1, (0, 0, 0, 0), 2), (2, (1, 0, 2, 1), 1)]
ARCHS = {
    "small-dc": CimArch(rows=16, cols=16),
    "wide-dc": CimArch(rows=64, cols=64),
    "offset-3xb": CimArch(rows=32, cols=24, mapping="offset", crossbars=3),
    "dr-2b": CimArch(rows=32, cols=32, mapping="dr", cell_bits=2, crossbars=2),
    "rram-2b": CimArch.preset("rram-2b"),
    "1b-cells-dac2": CimArch(rows=24, cols=40, cell_bits=1, dac_bits=2),
}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ------------------------------------------------------------------ references


def grouped_conv_nchw(x, w, groups, stride, padding, dilation, pad_value=0):
    """Integer grouped convolution of NCHW ``x`` with OIHW ``w``, in int64."""
    pt, pl, pb, pr = padding
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)), constant_values=pad_value)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh = (h - dilation * (kh - 1) - 1) // stride + 1
    ow = (wd - dilation * (kw - 1) - 1) // stride + 1
    og = o // groups
    out = np.zeros((n, o, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :,
                :,
                i * dilation : i * dilation + stride * (oh - 1) + 1 : stride,
                j * dilation : j * dilation + stride * (ow - 1) + 1 : stride,
            ]
            for g in range(groups):
                xs = patch[:, g * cg : (g + 1) * cg]
                ws = w[g * og : (g + 1) * og, :, i, j].astype(np.int64)
                out[:, g * og : (g + 1) * og] += np.einsum("nchw,oc->nohw", xs, ws)
    return out


def int_grouped_conv(rng, cin, cout, groups, stride, padding, dilation, size=7, batch=2):
    """The ConvInteger form of a grouped convolution: int8 in, int32 out."""
    w = rng.integers(-128, 128, (cout, cin // groups, 3, 3)).astype("int8")

    def body(bb, x):
        return R.nn.conv2d(
            x,
            models.c(w),
            strides=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            out_dtype="int32",
        )

    return models._module([models.tensor("x", (batch, cin, size, size), "int8")], body)


def grouped_region(rng, cin, cout, groups, window, w_bits, a_bits, signed, zero_point=0):
    """A one-operator region: ``(region, OIHW weight, geometry)``."""
    stride, padding, dilation = window
    size = 6
    lo, hi = quant_range(w_bits, True)
    w = rng.integers(lo, hi + 1, (cout, cin // groups, 3, 3))
    geometry = ConvGeometry(
        cin, size, size, (3, 3), (stride,) * 2, padding, (dilation,) * 2, groups
    )
    op = CimOp(
        name="gconv",
        kind="conv2d",
        source=("param", 0),
        weight=_as_matrix(w, "conv2d", groups),
        in_shape=(1, cin, size, size),
        out_shape=(1, cout, geometry.out_height, geometry.out_width),
        input=Codes(a_bits, signed, None, zero_point),
        w_bits=w_bits,
        conv=geometry,
    )
    region = Region("r", [((1, cin, size, size), "int8")], [op], [0])
    return region, w, geometry


def _nhwc_rows(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.transpose(0, 2, 3, 1).reshape(n * h * w, c)


# ------------------------------------------------------------------ codegen: exact


@pytest.mark.parametrize("arch", list(ARCHS), ids=list(ARCHS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "c{}o{}g{}".format(*s))
def test_grouped_conv_is_exact_and_costs_what_it_runs(rng, backend, arch, shape):
    arch = ARCHS[arch]
    cin, cout, groups = shape
    for window in WINDOWS:
        region, w, geometry = grouped_region(rng, cin, cout, groups, window, 8, 8, False)
        program = lower_region(region, arch)
        batch = 3
        lo, hi = quant_range(8, False)
        x = rng.integers(lo, hi + 1, (batch, cin, 6, 6))
        result = simulate(program, {"in0": _nhwc_rows(x)}, backend)
        expected = grouped_conv_nchw(x, w, groups, *window)
        got = result.outputs["out0"].reshape(batch, geometry.out_height, geometry.out_width, cout)
        np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), expected)
        assert result.stats.counts() == estimate(program, batch=batch).counts()


@pytest.mark.parametrize("w_bits", range(2, 9))
@pytest.mark.parametrize("a_bits", range(2, 9))
def test_widths_and_signed_inputs_with_a_zero_point(rng, w_bits, a_bits):
    arch = ARCHS["dr-2b"] if (w_bits + a_bits) % 2 else ARCHS["offset-3xb"]
    signed = bool(a_bits % 2)
    zero_point = 0 if signed else (1 << a_bits) // 3
    window = WINDOWS[(w_bits + a_bits) % len(WINDOWS)]
    region, w, geometry = grouped_region(
        rng, 8, 12, 4, window, w_bits, a_bits, signed, zero_point=zero_point
    )
    program = lower_region(region, arch)
    lo, hi = quant_range(a_bits, signed)
    x = rng.integers(lo, hi + 1, (2, 8, 6, 6))
    result = simulate(program, {"in0": _nhwc_rows(x)}, "numpy")
    # Taps outside the image read the zero point, as a quantized graph pads.
    expected = grouped_conv_nchw(x, w, 4, *window, pad_value=zero_point)
    got = result.outputs["out0"].reshape(2, geometry.out_height, geometry.out_width, 12)
    np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), expected)
    assert result.stats.counts() == estimate(program, batch=2).counts()


def test_a_group_wider_than_a_tile_is_tiled_like_a_dense_matrix(rng, backend):
    arch = CimArch(rows=16, cols=16, crossbars=2)
    region, w, geometry = grouped_region(rng, 8, 8, 2, WINDOWS[0], 6, 5, False)
    sets = group_sets(region.ops[0], arch)
    assert sets.per_set == 1 and sets.count == 2  # 36 rows per group: three row tiles
    program = lower_region(region, arch)
    x = rng.integers(0, 32, (2, 8, 6, 6))
    result = simulate(program, {"in0": _nhwc_rows(x)}, backend)
    got = result.outputs["out0"].reshape(2, 6, 6, 8).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got, grouped_conv_nchw(x, w, 2, *WINDOWS[0]))
    # sets x row tiles (36 rows) x column tiles (4 outputs x 2 slices x 2 polarities)
    assert estimate(program).crossbar_writes == 2 * 3 * 1


# ------------------------------------------------------------------ the cost formula


def _formula(op: CimOp, arch: CimArch, batch: int) -> tuple[int, int, int]:
    """``(tiles, mvm executions, latency_ps on one crossbar with free digital steps)``
    from the documented formula: the most groups per set that fit one tile, balanced."""
    g, cg, og = op.groups, op.conv.channels // op.groups, op.out_features // op.groups
    taps = op.conv.taps

    def fits(n):
        rows, cols = logical_shape(taps * n * cg, n * og, op.w_bits, arch)
        return rows <= arch.rows and cols <= arch.cols

    n = max([n for n in range(1, g + 1) if fits(n)], default=1)
    sets = -(-g // n)
    assert fits(1)  # the formula below is for groups that fit a tile
    tiles = sets
    vectors = batch * op.vectors_per_item
    mvms = tiles * input_steps(op.a_bits, arch.dac_bits) * vectors
    lat = arch.latency_ps()
    return tiles, mvms, tiles * lat["write"] + mvms * lat["mvm"]


@pytest.mark.parametrize(
    "shape,arch",
    [
        ((32, 32, 32), CimArch.preset("rram-4b")),
        ((96, 96, 96), CimArch.preset("rram-2b")),
        ((64, 128, 8), CimArch(rows=128, cols=128)),
        ((60, 60, 60), CimArch(rows=64, cols=256, mapping="dr")),
        ((48, 48, 12), CimArch(rows=256, cols=96, mapping="offset")),
    ],
)
def test_latency_is_the_packing_formula(rng, shape, arch):
    cin, cout, groups = shape
    region, _, _ = grouped_region(rng, cin, cout, groups, WINDOWS[1], 8, 8, False)
    stats = estimate(lower_region(region, arch), batch=2)
    tiles, mvms, latency = _formula(region.ops[0], arch, 2)
    assert (stats.crossbar_writes, stats.mvm_executions) == (tiles, mvms)
    assert stats.latency_ps == stats.sequential_ps == latency


def test_sets_take_far_fewer_tiles_than_the_dense_block_diagonal(rng):
    arch = CimArch.preset("rram-4b")
    region, _, _ = grouped_region(rng, 960, 960, 960, WINDOWS[0], 8, 8, False)
    op = region.ops[0]
    rows, cols = logical_shape(op.in_features, op.out_features, 8, arch)
    dense_tiles = -(-rows // arch.rows) * -(-cols // arch.cols)
    sets = group_sets(op, arch)
    assert (sets.per_set, sets.count) == (28, 35)  # 9 * 28 = 252 of 256 rows
    assert dense_tiles == 34 * 15


# ------------------------------------------------------------------ through TVM


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "c{}o{}g{}".format(*s))
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"s{w[0]}p{w[1]}d{w[2]}")
def test_integer_grouped_conv_equals_llvm(rng, shape, window):
    cin, cout, groups = shape
    mod = int_grouped_conv(rng, cin, cout, groups, *window)
    ex, report = compile_for_cim(mod, arch=ARCHS["small-dc"])
    assert [op.kind for op in report.operators] == ["conv2d"]
    assert report.cpu == []
    x = rng.integers(-128, 128, (2, cin, 7, 7)).astype("int8")
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(build_llvm(mod), x))


def test_float_depthwise_equals_its_fake_quantized_reference(rng):
    w = rng.standard_normal((8, 1, 3, 3)).astype("float32")

    def body(bb, x):
        return R.nn.conv2d(x, models.c(w), padding=1, groups=8)

    mod = models._module([models.tensor("x", (2, 8, 6, 6))], body)
    x = rng.standard_normal((2, 8, 6, 6)).astype("float32")
    ex, report = compile_for_cim(mod, calibration=[x])
    assert [op.kind for op in report.operators] == ["conv2d"]
    # W8A8: symmetric per-channel weights, signed activations from the calibrated range.
    sx = activation_scale(float(np.abs(x).max()), 8, True)
    xq = quantize(x, sx, 0, 8, True).astype(np.float64) * sx
    matrix = w.reshape(8, 9).T  # [KH*KW, O] of each channel's own taps
    sw = weight_scales(matrix, 8, axis=-1)
    wq = quantize(matrix, sw, 0, 8, True).astype(np.float64) * sw
    wq = wq.T.reshape(8, 1, 3, 3)
    expected = np.zeros((2, 8, 6, 6))
    padded = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            expected += padded[:, :, i : i + 6, j : j + 6] * wq[None, :, 0, i, j, None, None]
    np.testing.assert_allclose(run_vm(ex, x), expected, rtol=1e-5, atol=1e-5)


def test_float_separable_block_close_to_llvm(rng):
    w1 = rng.standard_normal((8, 3, 3, 3)).astype("float32") / 5
    wd = rng.standard_normal((8, 1, 3, 3)).astype("float32") / 3
    wg = rng.standard_normal((8, 4, 3, 3)).astype("float32") / 6

    def body(bb, x):
        h = bb.emit(R.nn.relu(bb.emit(R.nn.conv2d(x, models.c(w1), padding=1))))
        h = bb.emit(R.nn.relu(bb.emit(R.nn.conv2d(h, models.c(wd), padding=1, groups=8))))
        return R.nn.conv2d(h, models.c(wg), strides=2, padding=1, groups=2)

    mod = models._module([models.tensor("x", (2, 3, 8, 8))], body)
    samples = [rng.standard_normal((2, 3, 8, 8)).astype("float32") for _ in range(4)]
    ex, report = compile_for_cim(mod, calibration=samples)
    assert [op.kind for op in report.operators] == ["conv2d"] * 3
    assert len(report.programs) == 1  # one region: the requantizations stay on chip
    got, ref = run_vm(ex, samples[0]), run_vm(build_llvm(mod), samples[0])
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def _separable_float(rng):
    w1 = rng.standard_normal((8, 3, 3, 3)).astype("float32") / 5
    wd = rng.standard_normal((8, 1, 3, 3)).astype("float32") / 3

    def body(bb, x):
        h = bb.emit(R.nn.relu(bb.emit(R.nn.conv2d(x, models.c(w1), padding=1))))
        return R.nn.conv2d(h, models.c(wd), padding=1, groups=8)

    return models._module([models.tensor("x", (2, 3, 8, 8))], body)


@pytest.mark.parametrize("mapping", ["differential-column", "offset", "differential-row"])
@pytest.mark.parametrize("crossbars", [1, 3])
def test_cost_only_report_equals_full_compile(rng, mapping, crossbars):
    from tvm_cim import cost_report

    arch = CimArch(rows=32, cols=32, mapping=mapping, crossbars=crossbars)
    mod = _separable_float(rng)
    calib = [rng.standard_normal((2, 3, 8, 8)).astype("float32")]
    _, full = compile_for_cim(mod, arch=arch, calibration=calib)
    cost = cost_report(mod, arch=arch)
    assert [op.kind for op in full.operators] == ["conv2d", "conv2d"]
    # 9 rows a channel: 3 channels per 32-row tile (sets of 3, 3, 2); 18 with differential rows
    assert full.operators[1].tiles == (8 if mapping == "differential-row" else 3)
    assert [op.to_dict() for op in cost.operators] == [op.to_dict() for op in full.operators]
    assert cost.total_latency_us == pytest.approx(full.total_latency_us)


def test_im2col_params_of_a_set_take_its_channels():
    g = ConvGeometry(12, 5, 5, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), groups=3)
    assert (g.params(4) == im2col_params(5, 5, 4, (3, 3), (1, 1), (1, 1, 1, 1))).all()
    assert (g.params() == im2col_params(5, 5, 12, (3, 3), (1, 1), (1, 1, 1, 1))).all()
