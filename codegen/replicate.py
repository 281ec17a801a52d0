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
over its window's vectors, those of every item of the batch (a copy is written once per
batch, so larger batches pay for more copies). With one crossbar (the paper's model)
``r`` is always 1.

A stream of images whose tiles all fit the chip keeps them written (weight-stationary,
``codegen.pipeline``); its layers then work side by side on successive images and the
slowest sets the pace, so ``stationary_copies`` budgets the copies over the whole chip.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm_cim.core.arch import CimArch


def layer_time_ps(
    replicas: int, tiles: int, out_rows: int, row_vectors: int, steps: int, arch: CimArch
) -> int:
    """Crossbar time of a layer whose ``tiles`` are copied ``replicas`` times, each copy
    taking ``ceil(out_rows / replicas)`` output rows of ``row_vectors`` vectors (the
    output row's pixels times the batch)."""
    per_crossbar = -(-replicas * tiles // arch.crossbars)
    drive = window_time_ps(out_rows, replicas, row_vectors, steps, arch)
    return per_crossbar * (arch.latency_ps()["write"] + drive)


def window_time_ps(out_rows: int, copies: int, row_vectors: int, steps: int, arch: CimArch) -> int:
    """The bit-serial steps of one copy over its ``ceil(out_rows / copies)`` output rows of
    ``row_vectors`` vectors."""
    ps = arch.latency_ps()
    return steps * -(-out_rows // copies) * row_vectors * (ps["mvm"] + ps["adc"])


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


@dataclass(frozen=True)
class StageShape:
    """What the weight-stationary copy budget needs to know of one layer: its tiles,
    bit-serial steps, and output rows of ``row_vectors`` vectors (1 row for dense)."""

    name: str
    tiles: int
    steps: int
    out_rows: int
    row_vectors: int
    copyable: bool  # a convolution (a dense layer's one vector cannot be split)


def stage_time_ps(layer: StageShape, copies: int, arch: CimArch) -> int:
    """Crossbar time of one image in a layer whose ``copies`` x tiles each have a crossbar
    of their own and stay written: the bit-serial steps over one copy's window."""
    return window_time_ps(layer.out_rows, copies, layer.row_vectors, layer.steps, arch)


def stationary_copies(layers: list[StageShape], arch: CimArch) -> dict[str, int] | None:
    """Weight copies per layer for a chip that holds every tile at once, or None when the
    tiles do not fit.

    In a pipeline the slowest layer sets the pace, so copies go greedily to the slowest
    layer while its next useful copy count (the next that shortens its window) fits the
    crossbars left; the greedy step stops at the first slowest layer that cannot improve
    (a dense layer, one output row per copy, or no crossbars left for its tiles).
    """
    used = sum(layer.tiles for layer in layers)
    if used > arch.crossbars:
        return None
    copies = {layer.name: 1 for layer in layers}
    while layers:
        slowest = max(layers, key=lambda layer: stage_time_ps(layer, copies[layer.name], arch))
        current = copies[slowest.name]
        window = -(-slowest.out_rows // current)
        if not slowest.copyable or window == 1:
            break
        more = -(-slowest.out_rows // (window - 1))  # fewest copies with a shorter window
        extra = (more - current) * slowest.tiles
        if used + extra > arch.crossbars:
            break
        copies[slowest.name] = more
        used += extra
    return copies
