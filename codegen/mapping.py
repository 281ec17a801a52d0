"""Signed integer weights onto unsigned multi-bit cells: bit slicing and sign mapping.

A ``[K, N]`` weight matrix becomes a *logical* cell matrix of ``K`` (or ``2K``) rows and
``L`` columns, before tiling onto physical crossbars. Its columns come in contiguous
blocks of ``N`` (one column per output), each block standing for one weight slice of
one polarity; the shift-add recombines them. The three mappings (CIM-AQ's names):

* ``differential-column``: ``W = W+ - W-``; every slice of ``W+`` and of ``W-`` gets
  its own block, so ``L = 2 * slices * N``.
* ``offset``: cells hold ``W + 2**(w_bits-1)`` (unsigned); one extra all-ones column
  measures the input sum, and ``offset * sum(x)`` is subtracted. ``L = slices * N + 1``.
* ``differential-row``: ``W+`` in the top ``K`` rows, ``W-`` in the bottom ``K`` rows,
  driven with opposite polarity, so each column reads a signed difference.
  ``L = slices * N`` and the crossbar rows hold half as many inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_cim.core.arch import CimArch


@dataclass(frozen=True)
class ColumnBlock:
    """``N`` logical columns starting at ``col0`` holding one slice of one polarity."""

    col0: int
    shift: int  # significance of the slice, in bits
    negative: bool  # subtract this block


@dataclass
class WeightMapping:
    """The logical cell matrix of one weight matrix and how to recombine its columns.

    ``positive`` is ``[K, L]`` uint8; with differential rows ``negative`` holds the
    cells of the bottom rows (same shape), else it is None. ``ones_col`` (offset
    mapping) is the all-ones column, whose reading times ``offset`` is subtracted.
    """

    positive: np.ndarray
    negative: np.ndarray | None
    outputs: int
    blocks: list[ColumnBlock]
    ones_col: int | None = None
    offset: int = 0

    @property
    def logical_cols(self) -> int:
        return int(self.positive.shape[1])


def weight_slices(w_bits: int, cell_bits: int) -> int:
    """Cells per weight: ``ceil(w_bits / cell_bits)``."""
    return -(-w_bits // cell_bits)


def _slice(values: np.ndarray, slices: int, cell_bits: int) -> list[np.ndarray]:
    mask = (1 << cell_bits) - 1
    return [((values >> (s * cell_bits)) & mask).astype(np.uint8) for s in range(slices)]


def map_weights(weight: np.ndarray, w_bits: int, arch: CimArch) -> WeightMapping:
    """Slice and sign-map ``weight`` (``[K, N]`` ints within signed ``w_bits``)."""
    weight = np.asarray(weight, dtype=np.int16)  # 8-bit weights plus their offset fit
    n = weight.shape[1]
    slices = weight_slices(w_bits, arch.cell_bits)
    cb = arch.cell_bits
    if arch.mapping == "offset":
        offset = 1 << (w_bits - 1)
        parts = _slice(weight + offset, slices, cb)
        ones = np.ones((weight.shape[0], 1), dtype=np.uint8)
        blocks = [ColumnBlock(s * n, s * cb, False) for s in range(slices)]
        return WeightMapping(
            np.hstack([*parts, ones]), None, n, blocks, ones_col=slices * n, offset=offset
        )
    pos = _slice(np.maximum(weight, 0), slices, cb)
    neg = _slice(np.maximum(-weight, 0), slices, cb)
    if arch.mapping == "differential-row":
        blocks = [ColumnBlock(s * n, s * cb, False) for s in range(slices)]
        return WeightMapping(np.hstack(pos), np.hstack(neg), n, blocks)
    # differential-column: slice-major, then polarity
    blocks = []
    cells = []
    for s in range(slices):
        for negative, part in ((False, pos[s]), (True, neg[s])):
            blocks.append(ColumnBlock(len(cells) * n, s * cb, negative))
            cells.append(part)
    return WeightMapping(np.hstack(cells), None, n, blocks)


def is_placeholder(weight: np.ndarray) -> bool:
    """A zero-stride weight stands in for one whose values a cost estimate does not need."""
    return weight.ndim == 2 and weight.size > 0 and weight.strides == (0, 0)


def placeholder_weight(k: int, n: int) -> np.ndarray:
    """A ``[k, n]`` weight taking no memory, for cost-only lowering."""
    return np.broadcast_to(np.int8(0), (k, n))


def placeholder_mapping(k: int, n: int, w_bits: int, arch: CimArch) -> WeightMapping:
    """The mapping of a ``[k, n]`` weight with the right shapes and no cell values."""
    slices = weight_slices(w_bits, arch.cell_bits)
    cb = arch.cell_bits
    if arch.mapping == "offset":
        blocks = [ColumnBlock(s * n, s * cb, False) for s in range(slices)]
        cells = np.broadcast_to(np.uint8(0), (k, slices * n + 1))
        return WeightMapping(cells, None, n, blocks, ones_col=slices * n, offset=1 << (w_bits - 1))
    if arch.mapping == "differential-row":
        blocks = [ColumnBlock(s * n, s * cb, False) for s in range(slices)]
        cells = np.broadcast_to(np.uint8(0), (k, slices * n))
        return WeightMapping(cells, cells, n, blocks)
    blocks = [
        ColumnBlock((2 * s + int(neg)) * n, s * cb, neg)
        for s in range(slices)
        for neg in (False, True)
    ]
    return WeightMapping(np.broadcast_to(np.uint8(0), (k, 2 * slices * n)), None, n, blocks)


def logical_shape(k: int, n: int, w_bits: int, arch: CimArch) -> tuple[int, int]:
    """Physical rows and logical columns a ``[k, n]`` weight takes under ``arch``'s mapping."""
    cols = n * weight_slices(w_bits, arch.cell_bits)
    if arch.mapping == "offset":
        return k, cols + 1
    if arch.mapping == "differential-row":
        return 2 * k, cols
    return k, 2 * cols
