"""Weight duplication: a convolution's tiles replicated on idle crossbars.

A convolution drives every tile with all its output positions (``OH * OW`` vectors per
item), one after another. On a chip with more crossbars than the layer has tiles, the
compiler writes ``r`` copies of the tiles and gives each copy a window of output rows
(``im2col`` ``oh0``), so the copies drive their windows at the same time; ``acc`` at
``dst_row`` puts each window's partial sums back in place.

How many copies: the layers of a program run one after another (each reads the one
before), so the makespan is the sum of the layer times and each layer's best ``r`` is
found on its own, by trying every ``r`` up to ``OH`` (at most a few hundred) against
the crossbar-time model below. A crossbar that holds several tiles runs them in turn:
``ceil(r * tiles / crossbars)`` tiles, each one write plus ``steps`` bit-serial steps
over its window's vectors. With one crossbar (the paper's model) ``r`` is always 1.
"""

from __future__ import annotations

from tvm_cim.core.arch import CimArch


def layer_time_ps(
    replicas: int, tiles: int, out_rows: int, row_vectors: int, steps: int, arch: CimArch
) -> int:
    """Crossbar time of one item of a layer whose ``tiles`` are copied ``replicas`` times,
    each copy taking ``ceil(out_rows / replicas)`` output rows of ``row_vectors`` vectors."""
    ps = arch.latency_ps()
    per_crossbar = -(-replicas * tiles // arch.crossbars)
    window = -(-out_rows // replicas) * row_vectors
    return per_crossbar * (ps["write"] + steps * window * (ps["mvm"] + ps["adc"]))


def replication(tiles: int, out_rows: int, row_vectors: int, steps: int, arch: CimArch) -> int:
    """The number of copies (1 .. ``out_rows``) with the least ``layer_time_ps``; the
    fewest copies among equals (fewer writes). Copies may pay even without an idle
    crossbar: 3 tiles on 2 crossbars take two passes, 6 half-window tiles three shorter
    ones."""
    return min(
        range(1, out_rows + 1),
        key=lambda r: (layer_time_ps(r, tiles, out_rows, row_vectors, steps, arch), r),
    )


def output_windows(out_rows: int, replicas: int) -> list[tuple[int, int]]:
    """``(first output row, rows)`` of each copy: ``out_rows`` split as evenly as possible."""
    base, extra = divmod(out_rows, replicas)
    windows, first = [], 0
    for q in range(replicas):
        rows = base + (1 if q < extra else 0)
        windows.append((first, rows))
        first += rows
    return windows
