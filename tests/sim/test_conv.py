"""Convolutions as im2col plus the bit-serial matmul, in programs built by hand.

``im2col`` is checked against a loop written from its definition, on both backends and
for every geometry in the table below. Whole convolution programs (one layer, and
conv -> requant -> conv in one program) are checked against a direct numpy convolution,
and their latency against the static estimate and the CIM-AQ formula with
``I = OH * OW`` input vectors per image.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tests.conftest import simulate
from tvm_cim import CimArch
from tvm_cim.core.errors import ProgramError
from tvm_cim.core.quant import Requantize
from tvm_cim.sim import (
    Program,
    ProgramBuilder,
    Simulator,
    TensorDesc,
    _core,
    estimate,
    im2col_params,
    isa,
    reference,
    verify,
)

WRITE_PS = 56_000_000
EXEC_PS = 1_400_000


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------ references


def out_size(size: int, k: int, stride: int, before: int, after: int, dil: int) -> int:
    return (size + before + after - dil * (k - 1) - 1) // stride + 1


def im2col_loops(x, kernel, stride, padding, dilation, pad_value):
    """``[N, H, W, C]`` -> ``[N, OH*OW, KH*KW*C]``, one tap at a time."""
    n, h, w, c = x.shape
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = out_size(h, kh, sh, pt, pb, dh), out_size(w, kw, sw, pl, pr, dw)
    out = np.empty((n, oh * ow, kh * kw * c), dtype=np.int64)
    for b, i, j, u, v, ch in itertools.product(
        range(n), range(oh), range(ow), range(kh), range(kw), range(c)
    ):
        y, z = i * sh - pt + u * dh, j * sw - pl + v * dw
        inside = 0 <= y < h and 0 <= z < w
        out[b, i * ow + j, (u * kw + v) * c + ch] = x[b, y, z, ch] if inside else pad_value
    return out


def conv_direct(x, weight, stride, padding, dilation, pad_value):
    """``[N, H, W, C]`` conv ``[KH, KW, C, Cout]`` -> ``[N, OH, OW, Cout]`` (NHWC)."""
    n, h, w, c = x.shape
    kh, kw, _, cout = weight.shape
    (sh, sw), (pt, pl, pb, pr), (dh, dw) = stride, padding, dilation
    padded = np.full((n, h + pt + pb, w + pl + pr, c), pad_value, dtype=np.int64)
    padded[:, pt : pt + h, pl : pl + w] = x
    oh, ow = out_size(h, kh, sh, pt, pb, dh), out_size(w, kw, sw, pl, pr, dw)
    y = np.zeros((n, oh, ow, cout), dtype=np.int64)
    for i, j in itertools.product(range(oh), range(ow)):
        for u, v in itertools.product(range(kh), range(kw)):
            tap = padded[:, i * sh + u * dh, j * sw + v * dw, :]  # [N, C]
            y[:, i, j] += tap @ weight[u, v]
    return y


# ------------------------------------------------------------ im2col alone


def im2col_program(h, w, c, kernel, stride, padding, dilation, pad_value) -> Program:
    """load -> im2col -> store."""
    b = ProgramBuilder(CimArch(rows=8, cols=8), "im2col")
    params = im2col_params(h, w, c, kernel, stride, padding, dilation)
    oh, ow = (int(v) for v in params[0, -2:])
    taps = kernel[0] * kernel[1] * c
    x = b.input(TensorDesc("x", c, "int8", 8, True, rows=h * w))
    y = b.output(TensorDesc("y", taps, "int16", 16, True, rows=oh * ow))
    src, dst = b.buffer(c, rows=h * w), b.buffer(taps, rows=oh * ow)
    b.emit("load", dst=src, dst_col=0, tensor=x, src_col=0, ncols=c)
    b.emit("im2col", dst=dst, src=src, params=b.constant(params), pad=pad_value)
    b.emit("store", tensor=y, dst_col=0, src=dst, src_col=0, ncols=taps)
    b.emit("halt")
    return b.build()


H, W = 5, 6
GEOMETRIES = [
    # (kernel, stride, padding (top, left, bottom, right), dilation)
    (kernel, (s, s), padding, (d, d))
    for kernel in [(1, 1), (3, 3), (1, 3)]
    for s in (1, 2)
    for padding in [(0, 0, 0, 0), (1, 1, 1, 1), (0, 2, 1, 0)]
    for d in (1, 2)
]


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    GEOMETRIES,
    ids=[f"k{k[0]}x{k[1]}-s{s[0]}-p{''.join(map(str, p))}-d{d[0]}" for k, s, p, d in GEOMETRIES],
)
def test_im2col_matches_loops(kernel, stride, padding, dilation, channels, backend):
    rng = np.random.default_rng([kernel[0], kernel[1], stride[0], sum(padding), channels])
    for pad_value, batch in itertools.product((0, -3, 7), (1, 3)):
        program = im2col_program(H, W, channels, kernel, stride, padding, dilation, pad_value)
        x = rng.integers(-128, 128, (batch, H, W, channels))
        expected = im2col_loops(x, kernel, stride, padding, dilation, pad_value)
        result = simulate(program, {"x": x.reshape(batch, H * W, channels)}, backend)
        y = result.outputs["y"]
        assert y.shape == (expected.shape[0] * expected.shape[1], expected.shape[2])
        assert np.array_equal(y, expected.reshape(y.shape)), (pad_value, batch)
        assert estimate(program, batch).counts() == result.stats.counts()


@pytest.mark.parametrize(
    ("h", "w", "kernel", "stride", "padding", "dilation"),
    [
        (1, 1, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),  # one pixel
        (1, 1, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),  # all but the centre tap is padding
        (2, 3, (1, 1), (1, 1), (3, 0, 0, 2), (1, 1)),  # whole output rows of padding
        (7, 4, (2, 2), (3, 5), (0, 0, 0, 0), (1, 1)),  # stride above the kernel: skipped pixels
        (4, 4, (2, 2), (2, 2), (5, 5, 5, 5), (3, 3)),  # padding wider than the kernel
        (3, 9, (3, 1), (1, 4), (2, 0, 1, 3), (1, 2)),  # everything asymmetric
    ],
)
def test_im2col_edges(h, w, kernel, stride, padding, dilation, backend):
    rng = np.random.default_rng(h * w)
    program = im2col_program(h, w, 2, kernel, stride, padding, dilation, -128)
    x = rng.integers(-128, 128, (2, h, w, 2))
    y = simulate(program, {"x": x.reshape(2 * h * w, 2)}, backend).outputs["y"]
    expected = im2col_loops(x, kernel, stride, padding, dilation, -128)
    assert np.array_equal(y, expected.reshape(y.shape))


def windowed_im2col_program(h, w, c, kernel, stride, padding, windows, pad_value) -> Program:
    """load -> one im2col per window ``(oh0, rows)`` of output rows -> each window's
    rows gathered into one buffer with ``acc`` at ``dst_row`` -> store."""
    b = ProgramBuilder(CimArch(rows=8, cols=8), "im2col-windows")
    params = im2col_params(h, w, c, kernel, stride, padding, (1, 1))
    oh, ow = (int(v) for v in params[0, -2:])
    taps = kernel[0] * kernel[1] * c
    x = b.input(TensorDesc("x", c, "int8", 8, True, rows=h * w))
    y = b.output(TensorDesc("y", taps, "int16", 16, True, rows=oh * ow))
    src, whole = b.buffer(c, rows=h * w), b.buffer(taps, rows=oh * ow)
    geometry = b.constant(params)
    b.emit("load", dst=src, dst_col=0, tensor=x, src_col=0, ncols=c)
    for oh0, rows in windows:
        part = b.buffer(taps, rows=rows * ow)
        b.emit("im2col", dst=part, src=src, params=geometry, pad=pad_value, oh0=oh0)
        b.emit("acc", dst=whole, dst_col=0, src=part, src_col=0, ncols=taps, dst_row=oh0 * ow)
    b.emit("store", tensor=y, dst_col=0, src=whole, src_col=0, ncols=taps)
    b.emit("halt")
    return b.build()


@pytest.mark.parametrize(
    "windows",
    [[(0, 5)], [(0, 2), (2, 3)], [(4, 1), (0, 1), (1, 3)], [(r, 1) for r in range(5)]],
    ids=["whole", "two", "out-of-order", "row-by-row"],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_im2col_windows_make_the_whole_unfold(windows, stride, backend):
    """Output-row windows, each unfolded on its own and added at its rows, give the
    whole im2col: what a layer split across weight replicas computes."""
    h = 5 * stride
    padding = (1, 1, 1, 1) if stride == 1 else (1, 0, 0, 1)
    rng = np.random.default_rng([stride, len(windows)])
    x = rng.integers(-128, 128, (3, h, W, 2))
    program = windowed_im2col_program(h, W, 2, (3, 3), (stride, stride), padding, windows, 5)
    result = simulate(program, {"x": x.reshape(3 * h * W, 2)}, backend)
    expected = im2col_loops(x, (3, 3), (stride, stride), padding, (1, 1), 5)
    assert expected.shape[1] == 5 * out_size(W, 3, stride, padding[1], padding[3], 1)
    assert np.array_equal(result.outputs["y"], expected.reshape(result.outputs["y"].shape))
    assert estimate(program, 3).counts() == result.stats.counts()


@pytest.mark.parametrize(
    ("windows", "match"),
    [
        ([(4, 2)], r"b2's 12 rows are not whole output rows \(OW=6\) within rows 4\.\.4"),
        ([(5, 1)], r"within rows 5\.\.4"),
    ],
)
def test_im2col_windows_stay_inside_the_output(windows, match):
    program = windowed_im2col_program(H, W, 2, (3, 3), (1, 1), (1, 1, 1, 1), windows, 0)
    with pytest.raises(ProgramError, match=match):
        verify(program)


def test_acc_windows_stay_inside_the_destination():
    program = windowed_im2col_program(H, W, 2, (3, 3), (1, 1), (1, 1, 1, 1), [(0, 5)], 0)
    acc = [i for i, (m, _) in enumerate(program.instructions()) if m == "acc"][0]
    program.code[acc, isa.BY_MNEMONIC["acc"].field_index("dst_row")] = 1
    with pytest.raises(ProgramError, match=r"acc: rows 1\.\.30 of each item outside b1's 30"):
        verify(program)


def test_im2col_index():
    params = tuple(int(v) for v in im2col_params(4, 5, 3, (3, 3), padding=(1, 1, 1, 1))[0])
    index = reference.im2col_index(params)
    assert index.shape == (4 * 5, 3 * 3 * 3)
    assert index.max() == 4 * 5 * 3 + 2  # the appended pad row
    assert index.min() == 0
    # item-independent: gathering a flattened image plus a pad row is im2col
    x = np.arange(4 * 5 * 3).reshape(1, 4, 5, 3)
    flat = np.append(x.ravel(), [-1, -1, -1])
    expected = im2col_loops(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), -1)[0]
    assert np.array_equal(flat[index], expected)


def test_im2col_params_layout():
    params = im2col_params(10, 12, 3, (3, 5), (2, 1), (1, 2, 0, 3), (2, 1))
    assert params.shape == (1, len(isa.IM2COL_PARAMS)) and params.dtype == np.int64
    named = dict(zip(isa.IM2COL_PARAMS, params[0].tolist()))
    assert named == {
        "H": 10,
        "W": 12,
        "C": 3,
        "KH": 3,
        "KW": 5,
        "stride_h": 2,
        "stride_w": 1,
        "pad_top": 1,
        "pad_left": 2,
        "pad_bottom": 0,
        "pad_right": 3,
        "dil_h": 2,
        "dil_w": 1,
        "OH": (10 + 1 - 4 - 1) // 2 + 1,
        "OW": 12 + 5 - 4 - 1 + 1,
    }
    spec = isa.BY_MNEMONIC["im2col"]
    assert spec.opcode == 9 and [f.name for f in spec.fields] == [
        "dst",
        "src",
        "params",
        "pad",
        "oh0",
    ]
    assert (spec.latency_class, spec.unit, spec.per_vector, spec.rows_from) == (
        "load_store",
        "digital",
        True,
        "dst",
    )


# ------------------------------------------------------------ conv programs


def emit_conv(b: ProgramBuilder, src: int, hwc, weight, *, a_bits, signed=False, **geometry):
    """Emit ``im2col`` and the matmul of one conv layer; returns ``(acc, OH, OW)``.

    Weights are mapped by hand onto differential columns of one cell slice each: column
    ``j`` holds ``max(w, 0)`` and column ``Cout + j`` holds ``max(-w, 0)``; both are
    tiled over the crossbars' rows and columns, and every input step is shifted and
    added (positive) or subtracted (negative) into the accumulator.
    """
    arch = b.arch
    h, w, c = hwc
    kh, kw, _, cout = weight.shape
    stride = geometry.get("stride", (1, 1))
    padding = geometry.get("padding", (0, 0, 0, 0))
    dilation = geometry.get("dilation", (1, 1))
    params = im2col_params(h, w, c, (kh, kw), stride, padding, dilation)
    oh, ow = (int(v) for v in params[0, -2:])
    k = kh * kw * c
    matrix = weight.reshape(k, cout)  # row (kh*KW + kw)*C + c, as im2col lays out columns
    cells = np.hstack([np.maximum(matrix, 0), np.maximum(-matrix, 0)])
    assert cells.max() < 1 << arch.cell_bits

    cols = b.buffer(k, rows=oh * ow)
    read = b.buffer(min(arch.cols, 2 * cout), rows=oh * ow)
    acc = b.buffer(cout, rows=oh * ow)
    b.emit("im2col", dst=cols, src=src, params=b.constant(params), pad=geometry.get("pad", 0))
    steps = ceil_div(a_bits, arch.dac_bits)
    tiles = itertools.product(range(0, k, arch.rows), range(0, 2 * cout, arch.cols))
    for t, (r0, c0) in enumerate(tiles):
        r1, c1 = min(r0 + arch.rows, k), min(c0 + arch.cols, 2 * cout)
        xb = t % arch.crossbars
        b.emit("prog", xb=xb, image=b.image(cells[r0:r1, c0:c1]))
        for step in range(steps):
            bit = step * arch.dac_bits
            top = int(signed and step == steps - 1)
            b.emit("mvm", xb=xb, src=cols, src_col=r0, bit=bit, signed=top)
            b.emit("adc", dst=read, dst_col=0, xb=xb, col=0, ncols=c1 - c0)
            for lo, hi, neg in ((0, cout, 0), (cout, 2 * cout, 1)):
                a, z = max(c0, lo), min(c1, hi)
                if a < z:
                    b.emit(
                        "shadd",
                        dst=acc,
                        dst_col=a - lo,
                        src=read,
                        src_col=a - c0,
                        ncols=z - a,
                        shift=bit,
                        neg=neg,
                    )
    return acc, oh, ow


def conv_program(arch, hwc, weight, *, a_bits, signed=False, batch=None, **geometry):
    """NHWC input -> one conv layer -> int32 NHWC output."""
    h, w, c = hwc
    b = ProgramBuilder(arch, "conv")
    dtype = "int8" if signed else "uint8"
    x = b.input(TensorDesc("x", c, dtype, a_bits, signed, batch, rows=h * w))
    xs = b.buffer(c, rows=h * w)
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=c)
    acc, oh, ow = emit_conv(b, xs, hwc, weight, a_bits=a_bits, signed=signed, **geometry)
    cout = weight.shape[-1]
    y = b.output(TensorDesc("y", cout, "int32", 32, True, batch, rows=oh * ow))
    b.emit("store", tensor=y, dst_col=0, src=acc, src_col=0, ncols=cout)
    b.emit("halt")
    return b.build(), (oh, ow)


TINY = CimArch(rows=8, cols=6, cell_bits=2, dac_bits=1, crossbars=2)

CONV_CASES = [
    # (arch, (H, W, C), (KH, KW, Cout), a_bits, signed, geometry)
    (TINY, (5, 5, 2), (3, 3, 4), 3, False, {"padding": (1, 1, 1, 1)}),
    (TINY, (6, 7, 3), (3, 3, 2), 4, True, {"stride": (2, 2), "pad": -1}),
    (TINY, (6, 5, 1), (3, 2, 3), 3, False, {"dilation": (2, 1), "padding": (2, 0, 1, 1)}),
    (TINY.replace(dac_bits=2, crossbars=1), (4, 4, 5), (1, 1, 7), 5, True, {}),
    (
        TINY.replace(rows=16, cols=24, crossbars=3, cell_bits=3),
        (7, 6, 4),
        (3, 3, 5),
        6,
        False,
        {"stride": (2, 1), "padding": (1, 0, 1, 2), "pad": 9},
    ),
]


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_conv_program(case, backend):
    arch, (h, w, c), (kh, kw, cout), a_bits, signed, geometry = CONV_CASES[case]
    rng = np.random.default_rng(case)
    wmax = (1 << arch.cell_bits) - 1
    weight = rng.integers(-wmax, wmax + 1, (kh, kw, c, cout))
    program, (oh, ow) = conv_program(
        arch, (h, w, c), weight, a_bits=a_bits, signed=signed, **geometry
    )
    verify(program)
    lo, hi = (-(1 << (a_bits - 1)), 1 << (a_bits - 1)) if signed else (0, 1 << a_bits)
    for batch in (1, 3):
        x = rng.integers(lo, hi, (batch, h, w, c))
        result = simulate(program, {"x": x.reshape(batch * h * w, c)}, backend)
        expected = conv_direct(
            x,
            weight,
            geometry.get("stride", (1, 1)),
            geometry.get("padding", (0, 0, 0, 0)),
            geometry.get("dilation", (1, 1)),
            geometry.get("pad", 0),
        )
        y = result.outputs["y"]
        assert y.shape == (batch * oh * ow, cout)
        assert np.array_equal(y.reshape(expected.shape), expected)
        stats = result.stats
        assert estimate(program, batch).counts() == stats.counts()
        mvms = sum(1 for m, _ in program.instructions() if m == "mvm")
        assert stats.mvm_executions == batch * oh * ow * mvms
        assert stats.instructions["im2col"] == 1


def test_conv_requant_conv_in_one_program(backend):
    """Two layers: the requantized output of the first is the NHWC image of the second."""
    rng = np.random.default_rng(2)
    arch = CimArch(rows=12, cols=10, cell_bits=2, dac_bits=1, crossbars=2)
    h, w, c, c1, c2 = 6, 5, 3, 4, 2
    w1 = rng.integers(-3, 4, (3, 3, c, c1))
    w2 = rng.integers(-3, 4, (2, 2, c1, c2))
    rq = Requantize(
        multiplier=rng.integers(1, 1 << 10, c1), shift=9, zero_point=2, out_bits=3, bias=5
    )
    geo1 = {"stride": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1), "pad": 1}
    geo2 = {"stride": (2, 1), "padding": (0, 1, 1, 0), "dilation": (1, 1), "pad": rq.zero_point}

    b = ProgramBuilder(arch, "two layers")
    x = b.input(TensorDesc("x", c, "uint8", 3, False, rows=h * w))
    xs = b.buffer(c, rows=h * w)
    b.emit("load", dst=xs, dst_col=0, tensor=x, src_col=0, ncols=c)
    acc1, oh1, ow1 = emit_conv(b, xs, (h, w, c), w1, a_bits=3, **geo1)
    a1 = b.buffer(c1, rows=oh1 * ow1)
    b.emit(
        "req",
        dst=a1,
        dst_col=0,
        src=acc1,
        src_col=0,
        ncols=c1,
        params=b.constant(rq.params(c1)),
        zp=rq.zero_point,
        bits=rq.out_bits,
    )
    acc2, oh2, ow2 = emit_conv(b, a1, (oh1, ow1, c1), w2, a_bits=3, **geo2)
    y = b.output(TensorDesc("y", c2, "int32", 32, True, rows=oh2 * ow2))
    b.emit("store", tensor=y, dst_col=0, src=acc2, src_col=0, ncols=c2)
    b.emit("halt")
    b.attrs = {"layers": 2, "input": {"scale": 0.5, "zero_point": 0}}
    program = b.build()

    batch = 3
    xv = rng.integers(0, 8, (batch, h, w, c))
    result = simulate(program, {"x": xv.reshape(batch, h * w, c)}, backend)  # [batch, rows, C]
    hidden = rq.apply(conv_direct(xv, w1, *(geo1[k] for k in ("stride", "padding", "dilation")), 1))
    expected = conv_direct(hidden, w2, (2, 1), (0, 1, 1, 0), (1, 1), rq.zero_point)
    assert expected.shape == (batch, oh2, ow2, c2)
    assert np.array_equal(result.outputs["y"], expected.reshape(-1, c2))
    assert estimate(program, batch).counts() == result.stats.counts()
    # the program and its attrs survive the file format
    again = Program.from_bytes(program.to_bytes())
    assert again.attrs == program.attrs and again.buffer_rows == program.buffer_rows
    y2 = simulate(again, {"x": xv.reshape(batch * h * w, c)}, backend).outputs["y"]
    assert np.array_equal(y2, result.outputs["y"])


# ------------------------------------------------------------ latency


@pytest.mark.parametrize(
    ("hwc", "kernel", "cout", "geometry"),
    [
        ((8, 8, 40), (3, 3), 150, {"padding": (1, 1, 1, 1)}),  # 2 x 2 tiles
        ((9, 7, 3), (3, 3), 16, {"stride": (2, 2)}),  # one tile
        ((6, 6, 64), (1, 1), 200, {}),  # 1 x 2 tiles
    ],
)
def test_cimaq_conv_latency(hwc, kernel, cout, geometry, backend):
    """rram-4b: latency = writes * 56 us + OH*OW * writes * steps * 1.4 us per image."""
    arch = CimArch.preset("rram-4b")
    a_bits = 8
    h, w, c = hwc
    rng = np.random.default_rng(cout)
    weight = rng.integers(-7, 8, (*kernel, c, cout))
    program, (oh, ow) = conv_program(arch, hwc, weight, a_bits=a_bits, **geometry)
    k = kernel[0] * kernel[1] * c
    writes = ceil_div(k, arch.rows) * ceil_div(2 * cout, arch.cols)  # differential columns
    steps = ceil_div(a_bits, arch.dac_bits)
    for batch in (1, 2):
        expected = writes * WRITE_PS + batch * oh * ow * writes * steps * EXEC_PS
        stats = simulate(program, None, backend, functional=False, batch=batch).stats
        assert stats.crossbar_writes == writes
        assert stats.mvm_executions == batch * oh * ow * writes * steps
        assert stats.latency_ps == stats.sequential_ps == expected
        assert estimate(program, batch).counts() == stats.counts()
    x = rng.integers(0, 256, (1, h * w, c))
    result = simulate(program, {"x": x}, backend)
    assert result.stats.latency_ps == writes * WRITE_PS + oh * ow * writes * steps * EXEC_PS
    direct = conv_direct(
        x.reshape(1, h, w, c),
        weight,
        geometry.get("stride", (1, 1)),
        geometry.get("padding", (0, 0, 0, 0)),
        (1, 1),
        0,
    )
    assert np.array_equal(result.outputs["y"], direct.reshape(-1, cout))


def timed(arch: CimArch) -> CimArch:
    """Every operation class costs time, so rows scale a non-trivial schedule."""
    return arch.replace(
        write_latency_us=3.0,
        mvm_latency_us=0.7,
        adc_latency_us=0.11,
        shift_add_latency_us=0.013,
        requant_latency_us=0.05,
        load_store_latency_us=0.021,
    )


@pytest.mark.parametrize("case", range(len(CONV_CASES)))
def test_rows_scale_every_per_vector_instruction(case, backend):
    arch, (h, w, c), (kh, kw, cout), a_bits, signed, geometry = CONV_CASES[case]
    arch = timed(arch)
    weight = np.ones((kh, kw, c, cout), dtype=np.int64)
    program, _ = conv_program(arch, (h, w, c), weight, a_bits=a_bits, signed=signed, **geometry)
    lat = arch.latency_ps()
    for batch in (1, 4):
        stats = simulate(program, None, backend, functional=False, batch=batch).stats
        assert estimate(program, batch).counts() == stats.counts()
        sequential = digital = adc = 0
        for m, ops in program.instructions():
            spec = isa.BY_MNEMONIC[m]
            vectors = batch * program.buffer_rows[ops[spec.rows_from]] if spec.per_vector else 1
            sequential += lat[spec.latency_class] * vectors if spec.latency_class else 0
            digital += vectors if m in ("shadd", "acc", "req") else 0
            adc += vectors * ops["ncols"] if m == "adc" else 0
        assert stats.sequential_ps == sequential
        assert stats.digital_ops == digital
        assert stats.adc_conversions == adc
        assert stats.latency_ps <= stats.sequential_ps


# ------------------------------------------------------------ the compiled core


@pytest.mark.skipif(_core is None, reason="the compiled core is not built")
@pytest.mark.parametrize("tile", [1, 2, 5])
def test_core_row_tiles_hold_whole_items(monkeypatch, tile):
    """The core runs tiles of whole items; any tile size gives the reference's values."""
    monkeypatch.setattr(_core, "_TILE_BYTES", 1)
    monkeypatch.setattr(_core, "_MIN_TILE", tile)
    arch, hwc, (kh, kw, cout), a_bits, signed, geometry = CONV_CASES[1]
    rng = np.random.default_rng(tile)
    weight = rng.integers(-3, 4, (kh, kw, hwc[2], cout))
    program, _ = conv_program(timed(arch), hwc, weight, a_bits=a_bits, signed=signed, **geometry)
    x = rng.integers(-8, 8, (7 * hwc[0] * hwc[1], hwc[2]))
    ref = Simulator(backend="numpy").run(program, {"x": x})
    core = Simulator(backend="cython").run(program, {"x": x})
    assert np.array_equal(ref.outputs["y"], core.outputs["y"])
    assert ref.stats.counts() == core.stats.counts()


@pytest.mark.skipif(_core is None, reason="the compiled core is not built")
@pytest.mark.parametrize("adc_bits", [2, 4])
def test_core_finite_adc_parity(adc_bits):
    """Saturating ADC reads of many-row column sums: both backends agree bit for bit."""
    arch, hwc, (kh, kw, cout), a_bits, signed, geometry = CONV_CASES[4]
    rng = np.random.default_rng(adc_bits)
    weight = rng.integers(-7, 8, (kh, kw, hwc[2], cout))
    arch = timed(arch.replace(adc_bits=adc_bits))
    program, _ = conv_program(arch, hwc, weight, a_bits=a_bits, signed=signed, **geometry)
    x = rng.integers(0, 1 << a_bits, (5, hwc[0] * hwc[1], hwc[2]))
    ref = Simulator(backend="numpy").run(program, {"x": x})
    core = Simulator(backend="cython").run(program, {"x": x})
    assert np.array_equal(ref.outputs["y"], core.outputs["y"])
    assert ref.stats.counts() == core.stats.counts() == estimate(program, 5).counts()
