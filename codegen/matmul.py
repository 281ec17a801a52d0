"""Lowering of one integer matmul ``y = x @ weight`` onto crossbars.

The weight is sliced and sign-mapped (``mapping``), its logical cell matrix is cut into
crossbar-sized tiles (input rows by slice columns), and every tile is written once and
then driven with ``ceil(a_bits / dac_bits)`` bit-serial input steps for the whole batch.
Each step's column sums pass the ADC and are shifted and added into an accumulator by
the significance of their input step and weight slice. Tiles go round-robin over the
arch's crossbars; each crossbar accumulates on its own and the partial sums are added
at the end, so tiles on different crossbars overlap in the schedule.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.cells import CellLayout
from tvm_cim.core.errors import CimError
from tvm_cim.core.quant import MAX_SHIFT, Requantize, quant_range, rounding_right_shift

from ..sim import isa
from ..sim.builder import ProgramBuilder
from ..sim.program import Program, TensorDesc
from .mapping import WeightMapping, is_placeholder, map_weights, placeholder_mapping


def input_steps(a_bits: int, dac_bits: int) -> int:
    """Bit-serial steps per input: ``ceil(a_bits / dac_bits)``."""
    return -(-a_bits // dac_bits)


def _check_bits(what: str, bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise CimError(f"{what} must be an integer in 1..8, got {bits!r}")


def _smallest_dtype(bits: int, signed: bool) -> str:
    """The narrowest tensor dtype holding ``bits``-wide (un)signed codes."""
    for width in (8, 16):
        if bits <= width:
            return f"int{width}" if signed else f"uint{width}"
    return "int32" if bits <= (32 if signed else 31) else "int64"


def _chunk_range(dac_bits: int, signed: bool) -> tuple[int, int]:
    return quant_range(dac_bits, signed)


def adc_setting(folded: np.ndarray, dac_bits: int, signed_chunk: bool, adc_bits: int | None):
    """``(shift, signed)`` for reading a tile's columns without saturating.

    The column sums' range follows from the cells and the DAC chunk range; a finite ADC
    gets the smallest step (``2**shift``) whose code range holds that range.
    """
    lo_in, hi_in = _chunk_range(dac_bits, signed_chunk)
    if adc_bits is None:  # only the sign of the code range matters
        signed = (lo_in < 0 and int(folded.max()) > 0) or (hi_in > 0 and int(folded.min()) < 0)
        return 0, bool(signed)
    f = folded.astype(np.int64)
    hi = int(np.maximum(f * lo_in, f * hi_in).sum(axis=0).max())
    lo = int(np.minimum(f * lo_in, f * hi_in).sum(axis=0).min())
    return _read_setting(lo, hi, adc_bits)


def adc_setting_bounds(
    cell_lo: np.ndarray,
    cell_hi: np.ndarray,
    inputs: int,
    dac_bits: int,
    signed_chunk: bool,
    adc_bits: int | None,
):
    """``(shift, signed)`` for reading columns whose cells are unknown until run time
    without saturating, whatever they hold.

    Each of the ``inputs`` rows of a column contributes a cell (folded: minus its
    negative row's) between ``cell_lo`` and ``cell_hi`` (per column) times a DAC chunk:
    the column sums lie within ``inputs`` times the extremes of those products.
    """
    lo_in, hi_in = _chunk_range(dac_bits, signed_chunk)
    ends = [np.asarray(c, dtype=np.int64) * x for c in (cell_lo, cell_hi) for x in (lo_in, hi_in)]
    hi = inputs * int(np.max(np.maximum.reduce(ends)))
    lo = inputs * int(np.min(np.minimum.reduce(ends)))
    if adc_bits is None:  # only the sign of the code range matters
        return 0, lo < 0
    return _read_setting(lo, hi, adc_bits)


def _read_setting(lo: int, hi: int, adc_bits: int) -> tuple[int, bool]:
    """The smallest ADC step (``2**shift``) whose code range holds ``lo .. hi``."""
    signed = lo < 0
    qmin, qmax = quant_range(adc_bits, signed)
    for shift in range(MAX_SHIFT + 1):
        if (
            rounding_right_shift(np.int64(hi), shift) <= qmax
            and rounding_right_shift(np.int64(lo), shift) >= qmin
        ):
            return shift, signed
    return MAX_SHIFT, signed


def lower_matmul(
    weight: np.ndarray,
    *,
    w_bits: int,
    a_bits: int,
    arch: CimArch,
    signed_input: bool = False,
    batch: int | None = None,
    requant: Requantize | None = None,
    name: str = "matmul",
) -> Program:
    """Lower ``y = x @ weight`` to a crossbar program.

    Parameters
    ----------
    weight
        ``[K, N]`` integers within signed ``w_bits`` (``-2**(w-1) .. 2**(w-1)-1``).
    w_bits, a_bits
        Weight and activation widths, 1..8.
    arch
        Target architecture: crossbar size, cell and DAC bits, mapping, crossbars.
    signed_input
        Inputs are signed ``a_bits`` integers (the top input step is sign-extended)
        instead of unsigned ones.
    batch
        Fix the number of input vectors; None leaves it to each run.
    requant
        Requantize the accumulators (bias, scale, zero point, ReLU) before storing;
        None stores the raw integer products.
    name
        Program name.

    Returns
    -------
    Program
        Input ``x`` (``[batch, K]``), output ``y`` (``[batch, N]``).
    """
    _check_bits("w_bits", w_bits)
    _check_bits("a_bits", a_bits)
    weight = np.asarray(weight)
    if weight.ndim != 2 or 0 in weight.shape:
        raise CimError(f"{name}: weight must be a non-empty [K, N] matrix, got {weight.shape}")
    if not np.issubdtype(weight.dtype, np.integer):
        raise CimError(f"{name}: weight must hold integers, got dtype {weight.dtype}")
    k, n = weight.shape
    if k > isa.MAX_COLUMNS or n > isa.MAX_COLUMNS:
        raise CimError(f"{name}: weight {weight.shape} exceeds {isa.MAX_COLUMNS} rows or columns")
    wmin, wmax = quant_range(w_bits, True)
    if weight.min() < wmin or weight.max() > wmax:
        raise CimError(
            f"{name}: weight values {weight.min()}..{weight.max()} outside signed "
            f"{w_bits}-bit range {wmin}..{wmax}"
        )
    b = ProgramBuilder(arch, name)
    x_in = b.input(
        TensorDesc("x", k, _smallest_dtype(a_bits, signed_input), a_bits, signed_input, batch)
    )
    xbuf = b.buffer(k)
    b.emit("load", dst=xbuf, dst_col=0, tensor=x_in, src_col=0, ncols=k)
    acc = emit_matmul(b, xbuf, weight, w_bits=w_bits, a_bits=a_bits, signed_input=signed_input)
    if requant is not None:
        result = emit_requant(b, acc, n, requant)
        out = TensorDesc(
            "y",
            n,
            _smallest_dtype(requant.out_bits, requant.signed),
            requant.out_bits,
            requant.signed,
            batch,
        )
    else:
        result = acc
        bits = accumulator_bits(k, w_bits, a_bits, signed_input)
        out = TensorDesc("y", n, f"int{bits}", bits, True, batch)
    y_out = b.output(out)
    b.emit("store", tensor=y_out, dst_col=0, src=result, src_col=0, ncols=n)
    b.emit("halt")
    return b.build()


def accumulator_bound(k: int, w_bits: int, a_bits: int, signed_input: bool) -> int:
    """Largest ``|x @ w|`` over ``k`` products of ``a_bits`` inputs and ``w_bits`` weights."""
    in_max = 1 << (a_bits - (1 if signed_input else 0))
    return k * in_max * (1 << (w_bits - 1))


def accumulator_bits(k: int, w_bits: int, a_bits: int, signed_input: bool) -> int:
    """32 when every accumulator fits int32, else 64."""
    return 32 if accumulator_bound(k, w_bits, a_bits, signed_input) < 1 << 31 else 64


def emit_requant(
    b: ProgramBuilder,
    acc: int,
    channels: int,
    rq: Requantize,
    rows: int = 1,
    columns: tuple[int, int] | None = None,
    dst: int | None = None,
) -> int:
    """Requantize accumulator buffer ``acc`` (``channels`` wide) into a buffer of codes.

    ``columns`` ``(c0, c1)`` takes only those accumulator columns; ``dst`` is the buffer
    to write (``c1 - c0`` wide), else a new one. Returns the buffer written.
    """
    c0, c1 = (0, channels) if columns is None else columns
    params = b.constant(rq.params(channels)[:, c0:c1])
    result = b.buffer(c1 - c0, rows=rows) if dst is None else dst
    b.emit(
        "req",
        dst=result,
        dst_col=0,
        src=acc,
        src_col=c0,
        ncols=c1 - c0,
        params=params,
        zp=rq.zero_point,
        bits=rq.out_bits,
        signed=int(rq.signed),
        relu=int(rq.relu),
    )
    return result


def weight_mapping(weight: np.ndarray, w_bits: int, arch: CimArch) -> WeightMapping:
    """The mapping of ``weight``, or of its shape alone for a cost-only placeholder."""
    weight = np.asarray(weight)
    if is_placeholder(weight):
        return placeholder_mapping(*weight.shape, w_bits, arch)
    return map_weights(weight, w_bits, arch)


def emit_matmul(
    b: ProgramBuilder,
    xbuf: int,
    weight: np.ndarray,
    *,
    w_bits: int,
    a_bits: int,
    signed_input: bool,
    rows: int = 1,
) -> int:
    """Emit the crossbar part of ``x @ weight``; returns the int64 accumulator buffer.

    ``xbuf`` holds the input codes (``weight.shape[0]`` columns, ``rows`` vectors per
    item); the weight is checked by the caller. Tiles go round-robin over the crossbars.
    """
    lowering = TiledMatmul(b, weight_mapping(weight, w_bits, b.arch), w_bits, a_bits, signed_input)
    sums = CrossbarSums(b, lowering.outputs, rows, len(lowering.tiles), lowering.tile_width)
    lowering.emit(xbuf, sums)
    return sums.total()


class CrossbarSums:
    """The buffers one operator's tiles leave their results in, one set per crossbar.

    Each crossbar used reads its ADC into its own column buffer and shift-adds into its
    own ``outputs``-wide accumulator, so tiles on different crossbars never wait for each
    other; ``total`` adds the accumulators up at the end. ``next_tile`` deals the tiles
    out round-robin, from crossbar ``first``.
    """

    def __init__(
        self, b: ProgramBuilder, outputs: int, rows: int, tiles: int, width: int, first: int = 0
    ):
        self.b = b
        self.outputs = outputs
        used = min(tiles, b.arch.crossbars)
        self.colbufs = [b.buffer(width, rows=rows) for _ in range(used)]
        self.accs = [b.buffer(outputs, rows=rows) for _ in range(used)]
        self.first = first  # the crossbar of the first tile (a weight copy's own)
        self.dealt = 0

    def next_tile(self) -> tuple[int, int, int]:
        """``(crossbar, column buffer, accumulator)`` of the next tile."""
        slot = self.dealt % len(self.accs)
        xb = (self.first + self.dealt) % self.b.arch.crossbars
        self.dealt += 1
        return xb, self.colbufs[slot], self.accs[slot]

    def total(self) -> int:
        """Add every crossbar's accumulator into the first; returns that buffer."""
        for acc in self.accs[1:]:
            self.b.emit("acc", dst=self.accs[0], dst_col=0, src=acc, src_col=0, ncols=self.outputs)
        return self.accs[0]


class Lanes:
    """Instruction groups per crossbar, emitted round-robin across the crossbars.

    The schedule issues each unit's instructions in program order, so a tile emitted
    whole after another would wait for the other's digital steps (its shift-adds, on the
    one digital unit) even on a crossbar of its own. Emitting one group per crossbar in
    turn (a tile's write, then each input step: mvm, adc, shift-adds) lets the crossbars
    run side by side. Groups of one crossbar keep their order; different crossbars' groups
    touch different buffers, so the values are those of any order.
    """

    def __init__(self, b: ProgramBuilder):
        self.b = b
        self.groups: dict[int, list[list[tuple[str, dict]]]] = {}

    def add(self, xb: int, group: list[tuple[str, dict]]) -> None:
        self.groups.setdefault(xb, []).append(group)

    def emit(self) -> None:
        lanes = list(self.groups.values())
        for turn in range(max(map(len, lanes), default=0)):
            for lane in lanes:
                if turn < len(lane):
                    for mnemonic, operands in lane[turn]:
                        self.b.emit(mnemonic, **operands)
        self.groups = {}


def tile_cuts(
    k: int, logical_cols: int, differential_rows: bool, arch: CimArch
) -> tuple[list[tuple[tuple[int, int], tuple[int, int]]], int]:
    """The crossbar tiles of a logical cell matrix of ``k`` inputs and ``logical_cols``
    columns: ``((r0, r1), (c0, c1))`` each (ends excluded), input rows by logical
    columns, row-major; and the widest tile's columns."""
    rows_per_tile = arch.rows // 2 if differential_rows else arch.rows
    row_tiles = [(r, min(r + rows_per_tile, k)) for r in range(0, k, rows_per_tile)]
    col_tiles = [(c, min(c + arch.cols, logical_cols)) for c in range(0, logical_cols, arch.cols)]
    return [(r, c) for r in row_tiles for c in col_tiles], max(c1 - c0 for c0, c1 in col_tiles)


def emit_steps(
    lanes: Lanes,
    arch: CimArch,
    layout: CellLayout,
    *,
    xb: int,
    colbuf: int,
    acc: int,
    xbuf: int,
    x_col: int,
    cols: tuple[int, int],
    out_col: int,
    a_bits: int,
    signed_input: bool,
    adc: dict[bool, tuple[int, int]],
) -> None:
    """The bit-serial input steps of one tile written on crossbar ``xb``.

    Per step (one lane group each): an mvm of the inputs at ``xbuf`` columns ``x_col ..``,
    the adc of the tile's logical columns ``cols = (c0, c1)`` into ``colbuf``, and the
    shift-adds that recombine them into accumulator ``acc`` columns ``out_col ..``: each
    slice block's part in the tile at its significance and polarity, and the offset
    mapping's ones column, times the offset, subtracted from every output.

    ``layout`` says what the columns mean (``blocks``, ``outputs``, ``ones_col``,
    ``offset``); ``adc`` maps
    "the chunk is signed" to the tile's ``(shift, signed)`` ADC setting.
    """
    c0, c1 = cols
    steps = input_steps(a_bits, arch.dac_bits)
    for step in range(steps):
        signed = signed_input and step == steps - 1
        bit = step * arch.dac_bits
        shift, adc_signed = adc[signed]
        group = [
            ("mvm", {"xb": xb, "src": xbuf, "src_col": x_col, "bit": bit, "signed": int(signed)}),
            (
                "adc",
                {
                    "dst": colbuf,
                    "dst_col": 0,
                    "xb": xb,
                    "col": 0,
                    "ncols": c1 - c0,
                    "shift": shift,
                    "signed": int(adc_signed),
                },
            ),
        ]
        for block in layout.blocks:  # the parts of each slice block inside this tile
            lo, hi = max(block.col0, c0), min(block.col0 + layout.outputs, c1)
            if lo < hi:
                shadd = {
                    "dst": acc,
                    "dst_col": out_col + lo - block.col0,
                    "src": colbuf,
                    "src_col": lo - c0,
                    "ncols": hi - lo,
                    "shift": bit + block.shift,
                    "neg": int(block.negative),
                }
                group.append(("shadd", shadd))
        if layout.ones_col is not None and c0 <= layout.ones_col < c1:
            offset = {
                "dst": acc,
                "dst_col": out_col,
                "src": colbuf,
                "src_col": layout.ones_col - c0,
                "ncols": layout.outputs,
                "shift": bit + layout.offset.bit_length() - 1,  # the offset is a power of 2
                "neg": 1,
                "bcast": 1,
            }
            group.append(("shadd", offset))
        lanes.add(xb, group)


class TiledMatmul:
    """One weight mapping cut into crossbar tiles: input rows by logical columns."""

    def __init__(self, b: ProgramBuilder, mapping: WeightMapping, w_bits, a_bits, signed_input):
        self.b = b
        self.arch = b.arch
        self.m = mapping
        self.w_bits = w_bits
        self.a_bits = a_bits
        self.signed_input = signed_input
        self.tiles, self.tile_width = tile_cuts(
            mapping.positive.shape[0],
            mapping.logical_cols,
            mapping.layout.differential_rows,
            self.arch,
        )
        self.images: dict[tuple, int] = {}  # (rows, cols) of a tile -> its image

    @property
    def outputs(self) -> int:
        return self.m.outputs

    def emit(
        self, xbuf: int, sums: CrossbarSums, out_col: int = 0, lanes: Lanes | None = None
    ) -> None:
        """Every tile, on the crossbars ``sums`` deals; the results go to accumulator
        columns ``out_col ..``. The instructions go to ``lanes`` when given (the caller
        emits them), else they are emitted here, interleaved across the crossbars."""
        own = lanes is None
        lanes = Lanes(self.b) if own else lanes
        for rows, cols in self.tiles:
            self._tile(lanes, *sums.next_tile(), rows, cols, xbuf, out_col)
        if own:
            lanes.emit()

    def _image(self, rows, cols) -> int:
        """The image of one tile, made once: copies of the weights program the same one."""
        if (rows, cols) not in self.images:
            (r0, r1), (c0, c1) = rows, cols
            m = self.m
            cells = m.positive[r0:r1, c0:c1]
            if m.negative is not None:
                cells = np.vstack([cells, m.negative[r0:r1, c0:c1]])
            self.images[rows, cols] = self.b.image(cells, differential_rows=m.negative is not None)
        return self.images[rows, cols]

    def _tile(self, lanes, xb, colbuf, acc, rows, cols, xbuf, out_col) -> None:
        arch = self.arch
        image = self._image(rows, cols)
        folded = self.b.images[image].folded()
        lanes.add(xb, [("prog", {"xb": xb, "image": image})])
        adc = {s: adc_setting(folded, arch.dac_bits, s, arch.adc_bits) for s in (False, True)}
        emit_steps(
            lanes,
            arch,
            self.m.layout,
            xb=xb,
            colbuf=colbuf,
            acc=acc,
            xbuf=xbuf,
            x_col=rows[0],
            cols=cols,
            out_col=out_col,
            a_bits=self.a_bits,
            signed_input=self.signed_input,
            adc=adc,
        )
