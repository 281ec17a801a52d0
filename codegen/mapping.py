"""Compile-time weights onto crossbar cells: the codegen's view of ``tvm_cim.core.cells``.

A ``[K, N]`` weight matrix becomes a *logical* cell matrix of ``K`` (or ``2K``) rows and
``L`` columns, before tiling onto physical crossbars; ``tvm_cim.core.cells`` defines the
slicing and the three sign mappings (differential-column, offset, differential-row),
which the simulator shares for operands it writes into crossbars at run time. This
module applies them to an arch's weights and adds the placeholders of cost-only lowering.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_cim.core import cells
from tvm_cim.core.arch import CimArch

__all__ = [
    "WeightMapping",
    "cell_layout",
    "is_placeholder",
    "logical_shape",
    "map_weights",
    "placeholder_mapping",
    "placeholder_weight",
    "weight_slices",
]


@dataclass
class WeightMapping:
    """The logical cell matrix of one weight matrix and its column layout.

    ``positive`` is ``[K, L]`` uint8; with differential rows ``negative`` holds the
    cells of the bottom rows (same shape), else it is None. ``layout`` says how the
    columns recombine into the outputs (``tvm_cim.core.cells.CellLayout``).
    """

    positive: np.ndarray
    negative: np.ndarray | None
    layout: cells.CellLayout

    @property
    def outputs(self) -> int:
        return self.layout.outputs

    @property
    def logical_cols(self) -> int:
        return self.layout.logical_cols


def weight_slices(w_bits: int, cell_bits: int) -> int:
    """Cells per weight: ``ceil(w_bits / cell_bits)``."""
    return cells.slices(w_bits, cell_bits)


def cell_layout(n: int, bits: int, arch: CimArch) -> cells.CellLayout:
    """The column layout of ``n`` outputs of signed ``bits``-wide values on ``arch``."""
    return cells.layout(n, bits, arch.cell_bits, arch.mapping)


def map_weights(weight: np.ndarray, w_bits: int, arch: CimArch) -> WeightMapping:
    """Slice and sign-map ``weight`` (``[K, N]`` ints within signed ``w_bits``)."""
    weight = np.asarray(weight)
    positive, negative = cells.map_cells(weight, w_bits, arch.cell_bits, arch.mapping)
    return WeightMapping(positive, negative, cell_layout(weight.shape[1], w_bits, arch))


def is_placeholder(weight: np.ndarray) -> bool:
    """A zero-stride weight stands in for one whose values a cost estimate does not need."""
    return weight.ndim == 2 and weight.size > 0 and weight.strides == (0, 0)


def placeholder_weight(k: int, n: int) -> np.ndarray:
    """A ``[k, n]`` weight taking no memory, for cost-only lowering."""
    return np.broadcast_to(np.int8(0), (k, n))


def placeholder_mapping(k: int, n: int, w_bits: int, arch: CimArch) -> WeightMapping:
    """The mapping of a ``[k, n]`` weight with the right shapes and no cell values."""
    layout = cell_layout(n, w_bits, arch)
    zeros = np.broadcast_to(np.uint8(0), (k, layout.logical_cols))
    return WeightMapping(zeros, zeros if layout.differential_rows else None, layout)


def logical_shape(k: int, n: int, w_bits: int, arch: CimArch) -> tuple[int, int]:
    """Physical rows and logical columns a ``[k, n]`` weight takes under ``arch``'s mapping."""
    return cells.logical_shape(k, n, w_bits, arch.cell_bits, arch.mapping)
