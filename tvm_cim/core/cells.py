"""Signed integers onto unsigned multi-bit cells: bit slicing and sign mapping.

A ``[K, N]`` matrix of signed ``bits``-wide integers becomes a *logical* cell matrix of
``K`` (or ``2K``) rows and ``L`` columns, before tiling onto physical crossbars. Its
columns come in contiguous blocks of ``N`` (one column per output), each block standing
for one slice of one polarity; a shift-add recombines them. The three mappings (CIM-AQ's
names):

* ``differential-column``: ``W = W+ - W-``; every slice of ``W+`` and of ``W-`` gets
  its own block (slice-major, then polarity), so ``L = 2 * slices * N``.
* ``offset``: cells hold ``W + 2**(bits-1)`` (unsigned); one extra all-ones column
  measures the input sum, and ``offset * sum(x)`` is subtracted. ``L = slices * N + 1``.
* ``differential-row``: ``W+`` in the top ``K`` rows, ``W-`` in the bottom ``K`` rows,
  driven with opposite polarity, so each column reads a signed difference.
  ``L = slices * N`` and the crossbar rows hold half as many inputs.

This is the one definition: the codegen maps compile-time weights with it, and the
simulator maps operands written into crossbars at run time (``progb``) with it (the
compiled core re-does it in C, held equal by the tests). Functions take leading batch
axes: ``[..., K, N]`` values give ``[..., K, L]`` cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The mapping names, as ``CimArch.mapping`` spells them.
OFFSET = "offset"
DIFFERENTIAL_COLUMN = "differential-column"
DIFFERENTIAL_ROW = "differential-row"


@dataclass(frozen=True)
class ColumnBlock:
    """``N`` logical columns starting at ``col0`` holding one slice of one polarity."""

    col0: int
    shift: int  # significance of the slice, in bits
    negative: bool  # subtract this block


def signed_width(bits: int, signed: bool) -> int:
    """Width of the signed integers that hold ``bits``-wide codes: one more bit for
    unsigned ones (the mappings take signed values)."""
    return bits if signed else bits + 1


def slices(bits: int, cell_bits: int) -> int:
    """Cells per value: ``ceil(bits / cell_bits)``."""
    return -(-bits // cell_bits)


@dataclass(frozen=True)
class CellLayout:
    """Where the values of a ``[K, N]`` matrix land among the logical columns, and how
    the columns recombine into the ``N`` outputs.

    ``blocks`` lists the slice blocks; ``ones_col`` (offset mapping) is the all-ones
    column, whose reading times ``offset`` is subtracted from every output.
    """

    outputs: int
    bits: int
    cell_bits: int
    mapping: str
    blocks: tuple[ColumnBlock, ...]
    logical_cols: int
    ones_col: int | None = None
    offset: int = 0

    @property
    def differential_rows(self) -> bool:
        """Whether each input drives a positive and a negative row."""
        return self.mapping == DIFFERENTIAL_ROW

    def physical_rows(self, k: int) -> int:
        """Crossbar rows ``k`` inputs take."""
        return 2 * k if self.differential_rows else k

    def column_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(lo, hi)``, ``[L]`` int64 each: the range of what one row of each logical
        column contributes to a column sum per unit of input (its cell, minus the cell of
        the negative row under differential rows), over every value in range.

        A slice of a magnitude at most ``M`` is at most ``min(mask, M >> shift)``: the
        bound on the column sums a crossbar can read whatever its values are.
        """
        mask = (1 << self.cell_bits) - 1
        lo = np.zeros(self.logical_cols, dtype=np.int64)
        hi = np.zeros(self.logical_cols, dtype=np.int64)
        n, half = self.outputs, 1 << (self.bits - 1)
        for block in self.blocks:
            cols = slice(block.col0, block.col0 + n)
            if self.mapping == OFFSET:  # values + offset span 0 .. 2**bits - 1
                hi[cols] = min(mask, ((1 << self.bits) - 1) >> block.shift)
            elif self.mapping == DIFFERENTIAL_ROW:  # W+ up to 2**(b-1) - 1, W- up to 2**(b-1)
                hi[cols] = min(mask, (half - 1) >> block.shift)
                lo[cols] = -min(mask, half >> block.shift)
            else:
                hi[cols] = min(mask, (half if block.negative else half - 1) >> block.shift)
        if self.ones_col is not None:
            lo[self.ones_col] = hi[self.ones_col] = 1
        return lo, hi


def layout(n: int, bits: int, cell_bits: int, mapping: str) -> CellLayout:
    """The layout of ``N`` outputs of signed ``bits``-wide values under ``mapping``."""
    count, cb = slices(bits, cell_bits), cell_bits
    if mapping == OFFSET:
        blocks = tuple(ColumnBlock(s * n, s * cb, False) for s in range(count))
        return CellLayout(
            n, bits, cb, mapping, blocks, count * n + 1, ones_col=count * n, offset=1 << (bits - 1)
        )
    if mapping == DIFFERENTIAL_ROW:
        blocks = tuple(ColumnBlock(s * n, s * cb, False) for s in range(count))
        return CellLayout(n, bits, cb, mapping, blocks, count * n)
    if mapping != DIFFERENTIAL_COLUMN:
        raise ValueError(f"unknown mapping {mapping!r}")
    blocks = tuple(
        ColumnBlock((2 * s + int(negative)) * n, s * cb, negative)
        for s in range(count)
        for negative in (False, True)
    )
    return CellLayout(n, bits, cb, mapping, blocks, 2 * count * n)


def logical_shape(k: int, n: int, bits: int, cell_bits: int, mapping: str) -> tuple[int, int]:
    """Physical rows and logical columns a ``[k, n]`` matrix takes under ``mapping``."""
    cells = layout(n, bits, cell_bits, mapping)
    return cells.physical_rows(k), cells.logical_cols


def _working_dtype(bits: int):
    """The narrowest integer type holding ``bits``-wide values, their negation and their
    offset (``2**bits - 1``)."""
    return np.int16 if bits <= 15 else (np.int32 if bits <= 31 else np.int64)


def _slice(values: np.ndarray, count: int, cell_bits: int) -> list[np.ndarray]:
    mask = (1 << cell_bits) - 1
    return [((values >> (s * cell_bits)) & mask).astype(np.uint8) for s in range(count)]


def map_cells(
    values: np.ndarray, bits: int, cell_bits: int, mapping: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Slice and sign-map ``values`` (``[..., K, N]`` integers within signed ``bits``).

    Returns ``(positive, negative)``: ``[..., K, L]`` uint8 cells, and with differential
    rows the cells of the bottom rows (same shape), else None. Values out of range are
    the caller's to reject: they wrap.
    """
    values = np.asarray(values).astype(_working_dtype(bits), copy=False)
    count = slices(bits, cell_bits)
    if mapping == OFFSET:
        parts = _slice(values + (1 << (bits - 1)), count, cell_bits)
        ones = np.ones(values.shape[:-1] + (1,), dtype=np.uint8)
        return np.concatenate([*parts, ones], axis=-1), None
    pos = _slice(np.maximum(values, 0), count, cell_bits)
    neg = _slice(np.maximum(-values, 0), count, cell_bits)
    if mapping == DIFFERENTIAL_ROW:
        return np.concatenate(pos, axis=-1), np.concatenate(neg, axis=-1)
    if mapping != DIFFERENTIAL_COLUMN:
        raise ValueError(f"unknown mapping {mapping!r}")
    blocks = [part for s in range(count) for part in (pos[s], neg[s])]  # slice, then polarity
    return np.concatenate(blocks, axis=-1), None
