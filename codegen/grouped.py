"""Grouped and depthwise convolutions on crossbars: groups packed into tiles by sets.

A convolution of ``G`` groups, ``Cg`` input and ``Og`` output channels each, has a
block-diagonal ``[KH*KW*C, O]`` weight (``CimOp.weight``): an output only reads its own
group's channels. Cutting that matrix into crossbar tiles like a dense one would program
mostly zero tiles, so the groups go to the crossbars in *sets* of consecutive groups
instead. A set of ``n`` groups takes the channels ``[g0*Cg, (g0+n)*Cg)`` of the image and
the outputs ``[g0*Og, (g0+n)*Og)``; its weight is the ``[KH*KW*n*Cg, n*Og]`` block of the
full matrix over those channels and outputs, in the ``(kh, kw, c)`` order of an ``im2col``
of the set's channels alone. So every set is an ordinary dense im2col matmul: its
channels are requantized (or loaded) into a buffer of their own, unfolded, and driven
through the tiles ``TiledMatmul`` cuts, and its shift-adds land in the set's columns of
the operator's accumulators. The result is bit-exact by construction.

``n`` is the most groups whose set still fits one crossbar tile (rows and logical
columns under the arch's mapping), balanced over the sets; a group that is larger than a
tile forms a set of its own, tiled as usual. The set buffers alternate between two, so
one set's unfolding overlaps the previous set's crossbar steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError

from .layers import CimOp
from .mapping import is_placeholder, logical_shape, placeholder_weight


@dataclass(frozen=True)
class GroupSets:
    """How the groups of one convolution are cut into sets of consecutive groups."""

    groups: int
    in_per_group: int  # Cg
    out_per_group: int  # Og
    taps: int  # KH * KW
    per_set: int  # groups per set (the last set may hold fewer)

    @property
    def count(self) -> int:
        """``ceil(groups / per_set)``."""
        return -(-self.groups // self.per_set)

    def group_range(self, s: int) -> tuple[int, int]:
        return s * self.per_set, min((s + 1) * self.per_set, self.groups)

    def channels(self, s: int) -> tuple[int, int]:
        """The input channels ``[c0, c1)`` of set ``s``."""
        g0, g1 = self.group_range(s)
        return g0 * self.in_per_group, g1 * self.in_per_group

    def outputs(self, s: int) -> tuple[int, int]:
        """The output channels ``[o0, o1)`` of set ``s``."""
        g0, g1 = self.group_range(s)
        return g0 * self.out_per_group, g1 * self.out_per_group

    def weight(self, weight: np.ndarray, s: int) -> np.ndarray:
        """Set ``s``'s ``[KH*KW*n*Cg, n*Og]`` block of the full block-diagonal weight."""
        (c0, c1), (o0, o1) = self.channels(s), self.outputs(s)
        if is_placeholder(weight):
            return placeholder_weight(self.taps * (c1 - c0), o1 - o0)
        channels = self.groups * self.in_per_group
        block = weight.reshape(self.taps, channels, -1)[:, c0:c1, o0:o1]
        return np.ascontiguousarray(block.reshape(self.taps * (c1 - c0), o1 - o0))

    def set_shape(self, n: int, w_bits: int, arch: CimArch) -> tuple[int, int]:
        """Physical rows and logical columns a set of ``n`` groups takes."""
        return logical_shape(
            self.taps * n * self.in_per_group, n * self.out_per_group, w_bits, arch
        )

    def logical_shape(self, w_bits: int, arch: CimArch) -> tuple[int, int]:
        """Rows and logical columns of all sets' cell matrices, side by side diagonally."""
        shapes = [
            self.set_shape(g1 - g0, w_bits, arch)
            for g0, g1 in map(self.group_range, range(self.count))
        ]
        return sum(r for r, _ in shapes), sum(c for _, c in shapes)


def group_sets(op: CimOp, arch: CimArch) -> GroupSets:
    """The sets of ``op``'s groups: as many groups per set as fit one crossbar tile."""
    g = op.groups
    sets = GroupSets(g, op.conv.channels // g, op.out_features // g, op.conv.taps, 1)
    fits = 0
    for n in range(1, g + 1):  # the footprint grows with n: stop at the first misfit
        rows, cols = sets.set_shape(n, op.w_bits, arch)
        if rows > arch.rows or cols > arch.cols:
            break
        fits = n
    count = -(-g // max(fits, 1))
    return GroupSets(g, sets.in_per_group, sets.out_per_group, sets.taps, -(-g // count))


def check_block_diagonal(op: CimOp) -> None:
    """Raise ``CimError`` when a grouped weight reads channels outside an output's group."""
    if op.groups == 1 or is_placeholder(op.weight):
        return
    g = op.groups
    w = op.weight.reshape(op.conv.taps, g, op.conv.channels // g, g, op.out_features // g)
    off = w.copy()
    off[:, np.arange(g), :, np.arange(g), :] = 0
    if np.any(off):
        raise CimError(f"{op.name}: a grouped weight must be zero outside each output's group")
