"""The numpy reference backend: one ``execute_<mnemonic>`` function per instruction.

It defines the simulator's semantics in the plainest form; the Cython core must agree
with it bit for bit (the tests run both). Column sums are computed with float64 BLAS,
which is exact here: the verifier bounds cells and DAC chunks so that every partial
sum stays far below 2**53.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core import cells, quant
from tvm_cim.core.errors import InputError

from . import isa
from .timing import Timeline


class _State:
    """Every array holds ``batch * rows`` vectors, item after item (``[batch * rows, w]``)."""

    def __init__(self, prepared, inputs, batch, functional):
        self.p = prepared
        self.arch = prepared.arch
        self.functional = functional
        self.batch = batch
        self.inputs = inputs
        self.outputs = [
            np.zeros((batch * t.rows, t.width), dtype=t.dtype) for t in prepared.outputs
        ]
        # a timing-only run computes no values: it needs no buffers
        self.buffers = [
            np.zeros((batch * rows, w) if functional else (0, w), dtype=np.int64)
            for w, rows in zip(prepared.buffers, prepared.buffer_rows)
        ]
        # what each crossbar multiplies by: a folded image, [in_rows, cols], or after a
        # progb one matrix per item, [batch, in_rows, cols]
        self.weights = [None] * self.arch.crossbars
        self.held = [None] * self.arch.crossbars  # column sums after the last mvm
        self.index = 0  # of the instruction executing, for run-time errors


def execute_halt(s: _State, ops):
    pass


def execute_prog(s: _State, ops):
    s.weights[ops["xb"]] = s.p.images[ops["image"]].folded().astype(np.float64)


def operand_range_error(index, item, value, src, row, column, bits) -> InputError:
    """The error of a ``progb`` operand value outside signed ``bits``: both backends
    report the first such value (items in order, then the buffer's rows and columns)."""
    lo, hi = quant.quant_range(bits, True)
    return InputError(
        f"instruction {index}: progb: item {item}'s operand holds {value} at b{src} row "
        f"{row}, column {column}, outside signed {bits}-bit range {lo}..{hi}"
    )


def execute_progb(s: _State, ops):
    g = isa.progb_geometry(s.p.constants[ops["params"]][0])
    src, col, bits = ops["src"], g["col"], g["bits"]
    height, width = (g["N"], g["K"]) if g["transpose"] else (g["K"], g["N"])
    per_item = s.buffers[src].reshape(s.batch, s.p.buffer_rows[src], -1)
    stored = per_item[:, :height, col : col + width]  # as the buffer holds it
    lo, hi = quant.quant_range(bits, True)
    if stored.size and (stored.min() < lo or stored.max() > hi):
        item, row, column = np.unravel_index(np.argmax((stored < lo) | (stored > hi)), stored.shape)
        value = int(stored[item, row, column])
        raise operand_range_error(s.index, int(item), value, src, int(row), col + int(column), bits)
    operand = stored.transpose(0, 2, 1) if g["transpose"] else stored  # [batch, K, N]
    arch = s.arch
    pos, neg = cells.map_cells(operand[:, g["r0"] : g["r1"]], bits, arch.cell_bits, arch.mapping)
    folded = pos[..., g["c0"] : g["c1"]].astype(np.float64)
    if neg is not None:
        folded -= neg[..., g["c0"] : g["c1"]]
    s.weights[ops["xb"]] = folded


def execute_load(s: _State, ops):
    n = ops["ncols"]
    src = s.inputs[ops["tensor"]][:, ops["src_col"] : ops["src_col"] + n]
    s.buffers[ops["dst"]][:, ops["dst_col"] : ops["dst_col"] + n] = src


def execute_mvm(s: _State, ops):
    weights = s.weights[ops["xb"]]
    k = weights.shape[-2]
    x = s.buffers[ops["src"]][:, ops["src_col"] : ops["src_col"] + k]
    chunk = quant.dac_chunk(x, ops["bit"], s.arch.dac_bits, bool(ops["signed"]))
    if weights.ndim == 3:  # each item's vectors by its own matrix
        rows = s.p.buffer_rows[ops["src"]]
        held = np.matmul(chunk.astype(np.float64).reshape(s.batch, rows, k), weights)
        s.held[ops["xb"]] = held.reshape(s.batch * rows, -1)
    else:
        s.held[ops["xb"]] = chunk.astype(np.float64) @ weights


def execute_adc(s: _State, ops):
    n = ops["ncols"]
    sums = np.rint(s.held[ops["xb"]][:, ops["col"] : ops["col"] + n]).astype(np.int64)
    read = quant.adc_read(sums, s.arch.adc_bits, ops["shift"], bool(ops["signed"]))
    s.buffers[ops["dst"]][:, ops["dst_col"] : ops["dst_col"] + n] = read


def execute_shadd(s: _State, ops):
    n = ops["ncols"]
    src = s.buffers[ops["src"]][:, ops["src_col"] : ops["src_col"] + (1 if ops["bcast"] else n)]
    term = src * (np.int64(1) << np.int64(ops["shift"]))
    dst = s.buffers[ops["dst"]][:, ops["dst_col"] : ops["dst_col"] + n]
    if ops["neg"]:
        dst -= term
    else:
        dst += term


def execute_acc(s: _State, ops):
    n, first = ops["ncols"], ops["dst_row"]
    rows = s.p.buffer_rows[ops["src"]]
    src = s.buffers[ops["src"]].reshape(s.batch, rows, -1)[
        :, :, ops["src_col"] : ops["src_col"] + n
    ]
    dst = s.buffers[ops["dst"]].reshape(s.batch, s.p.buffer_rows[ops["dst"]], -1)
    dst[:, first : first + rows, ops["dst_col"] : ops["dst_col"] + n] += src


def execute_req(s: _State, ops):
    n = ops["ncols"]
    bias, multiplier, shift = s.p.constants[ops["params"]][:, :n]
    qmin, qmax = quant.quant_range(ops["bits"], bool(ops["signed"]))
    if ops["relu"]:
        qmin = max(qmin, ops["zp"])
    acc = s.buffers[ops["src"]][:, ops["src_col"] : ops["src_col"] + n]
    out = quant.requantize(acc, bias, multiplier, shift, ops["zp"], qmin, qmax)
    s.buffers[ops["dst"]][:, ops["dst_col"] : ops["dst_col"] + n] = out


def execute_store(s: _State, ops):
    n = ops["ncols"]
    src = s.buffers[ops["src"]][:, ops["src_col"] : ops["src_col"] + n]
    out = s.outputs[ops["tensor"]]
    out[:, ops["dst_col"] : ops["dst_col"] + n] = src.astype(out.dtype)


def im2col_index(params: tuple[int, ...], oh0: int = 0, window: int | None = None) -> np.ndarray:
    """Gather index ``[window*OW, KH*KW*C]`` of an ``im2col`` of output rows ``oh0 ..
    oh0 + window`` (default: all ``OH``) into one item's source.

    ``params`` are the values of ``isa.IM2COL_PARAMS``. The source is read flattened,
    ``[H*W*C]``, with one extra row of ``C`` pad values appended: taps outside the image
    point into that row.
    """
    h, w, c, kh, kw, sh, sw, pt, pl, _, _, dh, dw, oh, ow = params
    oh = oh - oh0 if window is None else window
    out_rows = oh0 + np.arange(oh)
    rows = out_rows[:, None, None, None] * sh - pt + np.arange(kh)[None, None, :, None] * dh
    cols = np.arange(ow)[None, :, None, None] * sw - pl + np.arange(kw)[None, None, None, :] * dw
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # [window rows, OW, KH, KW]
    pixel = np.where(inside, rows * w + cols, h * w)
    return (pixel[..., None] * c + np.arange(c)).reshape(oh * ow, kh * kw * c)


def im2col_window(params: tuple[int, ...], oh0: int, dst_rows: int) -> tuple:
    """``(params, oh0, window)``: the gather an ``im2col`` into ``dst_rows`` rows makes."""
    return params, oh0, dst_rows // params[isa.IM2COL_PARAMS.index("OW")]


def execute_im2col(s: _State, ops):
    params = tuple(int(v) for v in s.p.constants[ops["params"]][0])
    key = im2col_window(params, ops["oh0"], s.p.buffer_rows[ops["dst"]])
    # The index is as large as one item's output: kept per prepared program, not globally.
    cache = s.p.__dict__.setdefault("_im2col_index", {})
    index = cache.get(key)
    if index is None:
        index = cache[key] = im2col_index(*key)
    h, w, c = params[:3]
    padded = np.empty((s.batch, (h * w + 1) * c), dtype=np.int64)
    padded[:, : h * w * c] = s.buffers[ops["src"]].reshape(s.batch, h * w * c)
    padded[:, h * w * c :] = ops["pad"]
    np.take(padded, index, axis=1, out=s.buffers[ops["dst"]].reshape(s.batch, *index.shape))


EXECUTE = {
    name[len("execute_") :]: fn for name, fn in globals().items() if name.startswith("execute_")
}


# ------------------------------------------------------------------------ memory

#: Bytes of the Python objects any run makes besides its arrays (lists, stats, views).
OVERHEAD_BYTES = 64 << 10
#: Bytes one decoded instruction (a tuple holding a dict of Python ints) takes.
_DECODED_BYTES = 1024
#: Temporaries of ``vectors x ncols`` int64 an instruction holds at once, at most: the
#: rounding of ``quant.rounding_right_shift`` keeps its input, floor, remainder and a
#: term alive (plus boolean masks), behind the sum or product that feeds it.
_PLANES = {"adc": 5, "req": 6, "shadd": 1, "acc": 1, "store": 1, "load": 0, "halt": 0}


def memory_bytes(prepared, batch: int, functional: bool) -> int:
    """Most bytes ``run`` holds at once for ``batch`` items: its state (outputs, buffers,
    each crossbar's float weights, per item where a progb writes them, and held column
    sums, the im2col indices), plus the largest set of temporaries one instruction makes
    (numpy allocates a fresh array for each intermediate of an expression)."""
    per_item = sum(t.rows * t.width * np.dtype(t.dtype).itemsize for t in prepared.outputs)
    if not functional:
        return batch * per_item + _DECODED_BYTES * len(prepared.code) + OVERHEAD_BYTES
    walk = prepared.walk
    per_item += 8 * sum(t.rows * t.width for t in prepared.inputs)  # converted to int64
    per_item += 8 * sum(w * r for w, r in zip(prepared.buffers, prepared.buffer_rows))
    per_item += 8 * sum(walk.held_per_item.values())
    per_item += 8 * sum(walk.item_weights.values())
    fixed = 8 * sum(walk.weights.values()) + 8 * sum(walk.im2col_index.values())
    fixed += _DECODED_BYTES * len(prepared.code) + OVERHEAD_BYTES
    return batch * per_item + fixed + max(_transients(prepared, batch), default=0)


def _transients(prepared, batch: int):
    """Per instruction, the bytes of the temporaries executing it allocates."""
    for opcode, step in zip(prepared.code[:, 0].tolist(), prepared.walk.steps):
        mnemonic = isa.BY_OPCODE[opcode].mnemonic
        vectors = batch * step.rows
        if mnemonic == "prog":
            # cells as int64, their difference (or themselves) and its float64 copy
            yield 16 * step.cells
        elif mnemonic == "progb":
            yield _progb_bytes(prepared, batch, step.params)
        elif mnemonic == "mvm":
            # dac_chunk's shifts and masks (three planes), then chunk, its float64 copy
            # and the product, while the previous column sums are still held
            yield 8 * vectors * max(3 * step.k, 2 * step.k + step.cols)
        elif mnemonic == "im2col":
            # the padded source, np.take's buffered output and building the index
            h, w, c = step.params[:3]
            yield 8 * batch * (h * w + 1) * c + 8 * vectors * step.cols + 16 * step.index
        else:
            yield 8 * vectors * _PLANES[mnemonic] * step.cols


def _progb_bytes(prepared, batch: int, params: tuple) -> int:
    """The temporaries of a progb: ``map_cells``'s narrow copies of the operand rows (the
    values, both polarities, a slice and its mask: 2 bytes each, a few at once), its
    uint8 slices and their concatenation (positive and negative), and the float64 tile."""
    g = isa.progb_geometry(params)
    arch = prepared.arch
    inputs, _, cols = isa.progb_tile(params, False)
    logical = cells.layout(g["N"], g["bits"], arch.cell_bits, arch.mapping).logical_cols
    values = batch * inputs * g["N"]
    return 16 * values + 4 * batch * inputs * logical + 8 * batch * inputs * cols


def run(prepared, inputs: list[np.ndarray], batch: int, functional: bool):
    """Execute a verified program; returns ``(outputs, stats)``."""
    state = _State(prepared, inputs, batch, functional)
    timeline = Timeline(
        prepared.arch, batch, prepared.buffer_rows, prepared.images, prepared.constants
    )
    for index, (mnemonic, ops) in enumerate(prepared.instructions):
        if functional:
            state.index = index
            EXECUTE[mnemonic](state, ops)
        timeline.issue(mnemonic, ops)
    return state.outputs, timeline.stats
