"""Matmuls whose stored operand is an activation: attention's ``Q @ K^T`` and ``A @ V``.

``y[h] = x[h] @ S[h]`` per head ``h``, where both ``x`` and ``S`` are computed at run
time, item by item. The stored operand cannot be a compile-time image: each tile is
written from the buffer that holds ``S`` with a ``progb`` (one crossbar write per item,
mapped as weights are, ``tvm_cim.core.cells``), then driven with the bit-serial input
steps of ``codegen.matmul`` (``emit_steps``). Tiles are cut as ``TiledMatmul`` cuts a
weight's (input rows by logical columns), and the heads' tiles are dealt round-robin
over the crossbars, interleaved (``Lanes``) so that several crossbars work side by side.

The cells are unknown when the program is compiled, so each tile's ADC setting comes
from the worst case of any operand value in range (``CellLayout.column_bounds``): a read
never saturates, and with a lossless ADC, or one wide enough for those bounds at step 1,
the result is exact.
"""

from __future__ import annotations

from tvm_cim.core.cells import CellLayout, signed_width
from tvm_cim.core.errors import CimError

from ..sim import isa
from ..sim.builder import ProgramBuilder, progb_params
from ..sim.program import Program, TensorDesc
from .mapping import cell_layout
from .matmul import (
    CrossbarSums,
    Lanes,
    _check_bits,
    _smallest_dtype,
    accumulator_bits,
    adc_setting_bounds,
    emit_steps,
    tile_cuts,
)


def act_matmul_tiles(k: int, n: int, s_bits: int, b: ProgramBuilder) -> tuple[CellLayout, list]:
    """The cell layout of one head's ``[k, n]`` stored operand of signed ``s_bits`` on
    ``b``'s arch, and its crossbar tiles (see ``codegen.matmul.tile_cuts``)."""
    layout = cell_layout(n, s_bits, b.arch)
    tiles, _ = tile_cuts(k, layout.logical_cols, layout.differential_rows, b.arch)
    return layout, tiles


def _check_operands(b: ProgramBuilder, what: str, buf: int, first: int, width: int, rows: int):
    """Fail unless buffer ``buf`` holds ``width`` columns from ``first`` and at least
    ``rows`` rows per item."""
    if not 0 <= buf < len(b.buffers):
        raise CimError(f"act matmul: {what} buffer b{buf} does not exist")
    have, height = b.buffers[buf], b.buffer_rows[buf]
    if first < 0 or first + width > have:
        raise CimError(
            f"act matmul: {what} columns {first}..{first + width - 1} outside b{buf}'s width {have}"
        )
    if height < rows:
        raise CimError(f"act matmul: {what} needs {rows} rows per item, b{buf} has {height}")


def emit_act_matmul(
    b: ProgramBuilder,
    xbuf: int,
    sbuf: int,
    *,
    heads: int,
    k: int,
    n: int,
    transpose: bool,
    s_col: int = 0,
    x_col: int = 0,
    s_bits: int,
    a_bits: int,
    signed_input: bool,
    rows: int,
) -> int:
    """Emit ``y[h] = x[h] @ S[h]`` for every head ``h``; returns the accumulator buffer.

    Parameters
    ----------
    b
        The program being built; its arch gives the crossbars, cells and mapping.
    xbuf
        Buffer of the input codes: ``rows`` vectors per item (exactly), head ``h``'s ``k``
        inputs at columns ``x_col + h*k ..``.
    sbuf
        Buffer of the stored operand, per item. With ``transpose`` False, ``S[h]`` is its
        rows ``0..k-1``, columns ``s_col + h*n ..`` (``n`` wide): ``sbuf`` has at least
        ``k`` rows per item (``V`` held token by token for ``A @ V``). With ``transpose``
        True the buffer holds ``S[h]`` transposed: rows ``0..n-1``, columns ``s_col + h*k
        ..`` (``k`` wide), at least ``n`` rows per item (``K`` held token by token for
        ``Q @ K^T``).
    heads, k, n
        Heads, contraction length and outputs per head.
    transpose
        How ``sbuf`` holds the operand (above).
    s_col, x_col
        First columns of head 0's operand and inputs.
    s_bits
        Width of the stored values as signed integers, 1..``isa.PROGB_MAX_BITS``; pass
        ``bits + 1`` for unsigned ``bits``-wide codes. A value outside it is a run-time
        ``InputError``.
    a_bits, signed_input
        Width of the inputs, 1..8, and whether they are signed (the top input step is
        sign-extended).
    rows
        Vectors per item of ``xbuf``: the rows of the accumulator.

    Returns
    -------
    int
        An int64 buffer of ``rows`` rows per item and ``heads * n`` columns, head ``h``
        at columns ``h*n ..``: the exact integer products (with a lossless ADC, or a
        finite one wide enough; see the module docs).
    """
    for what, value in (("heads", heads), ("k", k), ("n", n), ("rows", rows)):
        if not isinstance(value, int) or value < 1:
            raise CimError(f"act matmul: {what} must be a positive integer, got {value!r}")
    _check_bits("a_bits", a_bits)
    if not isinstance(s_bits, int) or not 1 <= s_bits <= isa.PROGB_MAX_BITS:
        raise CimError(f"act matmul: s_bits must be an integer in 1..{isa.PROGB_MAX_BITS}")
    if heads * n > isa.MAX_COLUMNS:
        raise CimError(f"act matmul: {heads * n} outputs exceed {isa.MAX_COLUMNS} columns")
    s_width, s_rows = (k, n) if transpose else (n, k)
    _check_operands(b, "input", xbuf, x_col, heads * k, 0)
    if b.buffer_rows[xbuf] != rows:
        raise CimError(f"act matmul: rows={rows}, the input b{xbuf} has {b.buffer_rows[xbuf]}")
    _check_operands(b, "stored operand", sbuf, s_col, heads * s_width, s_rows)

    arch = b.arch
    layout, tiles = act_matmul_tiles(k, n, s_bits, b)
    cell_lo, cell_hi = layout.column_bounds()
    width = max(c1 - c0 for _, (c0, c1) in tiles)
    sums = CrossbarSums(b, heads * n, rows, heads * len(tiles), width)
    settings = {}  # per tile: the ADC settings, for unsigned and signed chunks
    for (r0, r1), (c0, c1) in tiles:
        settings[r0, r1, c0, c1] = {
            signed: adc_setting_bounds(
                cell_lo[c0:c1], cell_hi[c0:c1], r1 - r0, arch.dac_bits, signed, arch.adc_bits
            )
            for signed in (False, True)
        }
    lanes = Lanes(b)
    for h in range(heads):
        for (r0, r1), (c0, c1) in tiles:
            xb, colbuf, acc = sums.next_tile()
            params = progb_params(
                s_col + h * s_width, k, n, s_bits, (r0, r1), (c0, c1), transpose=transpose
            )
            write = {"xb": xb, "src": sbuf, "params": b.constant(params)}
            lanes.add(xb, [("progb", write)])
            emit_steps(
                lanes,
                arch,
                layout,
                xb=xb,
                colbuf=colbuf,
                acc=acc,
                xbuf=xbuf,
                x_col=x_col + h * k + r0,
                cols=(c0, c1),
                out_col=h * n,
                a_bits=a_bits,
                signed_input=signed_input,
                adc=settings[r0, r1, c0, c1],
            )
    lanes.emit()
    return sums.total()


def lower_act_matmul(
    *,
    heads: int,
    rows: int,
    k: int,
    n: int,
    s_rows: int | None = None,
    transpose: bool,
    s_bits: int,
    a_bits: int,
    arch,
    signed_input: bool = False,
    signed_stored: bool = True,
    batch: int | None = None,
    name: str = "act_matmul",
) -> Program:
    """Lower ``y[h] = x[h] @ S[h]`` with a run-time ``S`` to a standalone program.

    Parameters
    ----------
    heads, rows, k, n
        Heads, vectors per item of ``x``, contraction length and outputs per head.
    s_rows
        Rows per item of the stored operand's input ``s``; None means the operand's own
        (``k``, or ``n`` with ``transpose``).
    transpose
        ``s`` holds each head's operand transposed (see ``emit_act_matmul``).
    s_bits, signed_stored
        Width of the stored codes, 1..8, and whether they are signed.
    a_bits, signed_input
        Width of the input codes, 1..8, and whether they are signed.
    arch
        Target architecture.
    batch
        Fix the number of items; None leaves it to each run.
    name
        Program name.

    Returns
    -------
    Program
        Inputs ``x`` (``rows`` vectors of ``heads*k`` per item) and ``s`` (``s_rows``
        vectors of ``heads*n``, or ``heads*k`` with ``transpose``); output ``y``, ``rows``
        vectors of ``heads*n`` raw integer accumulators per item.
    """
    _check_bits("s_bits", s_bits)
    _check_bits("a_bits", a_bits)
    stored_bits = signed_width(s_bits, signed_stored)
    s_width = heads * (k if transpose else n)
    s_rows = (n if transpose else k) if s_rows is None else s_rows
    b = ProgramBuilder(arch, name)
    x_dtype = _smallest_dtype(a_bits, signed_input)
    x_in = b.input(TensorDesc("x", heads * k, x_dtype, a_bits, signed_input, batch, rows=rows))
    s_dtype = _smallest_dtype(s_bits, signed_stored)
    s_in = b.input(TensorDesc("s", s_width, s_dtype, s_bits, signed_stored, batch, rows=s_rows))
    xbuf = b.buffer(heads * k, rows=rows)
    sbuf = b.buffer(s_width, rows=s_rows)
    b.emit("load", dst=xbuf, dst_col=0, tensor=x_in, src_col=0, ncols=heads * k)
    b.emit("load", dst=sbuf, dst_col=0, tensor=s_in, src_col=0, ncols=s_width)
    acc = emit_act_matmul(
        b,
        xbuf,
        sbuf,
        heads=heads,
        k=k,
        n=n,
        transpose=transpose,
        s_bits=stored_bits,
        a_bits=a_bits,
        signed_input=signed_input,
        rows=rows,
    )
    bits = accumulator_bits(k, stored_bits, a_bits, signed_input)
    y_out = b.output(TensorDesc("y", heads * n, f"int{bits}", bits, True, batch, rows=rows))
    b.emit("store", tensor=y_out, dst_col=0, src=acc, src_col=0, ncols=heads * n)
    b.emit("halt")
    return b.build()
