"""A stream of images through a planned model: weight-stationary when its tiles fit.

When every tile of the model (with its weight copies) fits the chip at once, the tiles are
written once, when the model is loaded, and stay: the copies are then budgeted over the
whole chip to speed up the slowest layer (``codegen.replicate.stationary_copies``) instead
of each layer taking every crossbar in turn. Otherwise (and always for a model with
attention's matmuls, whose stored operands are written for every image) the model runs as
it compiles, rewriting its tiles for every image.

Each region program is turned into a stream program (``codegen.pipeline``), whose layers
work on successive images at once, and scheduled by the simulator's cost model
(``sim.timing.finish_times``: when each image is done; the simulator runs the same program
to the same counts and makespan). Regions
are separated by operators on the CPU, which are not timed (as everywhere in the report).
With stationary weights every region has crossbars of its own, so the regions are the
stages of a pipeline and the slowest one sets the interval between images; otherwise the
regions share the crossbars and run one after another for each image.
"""

from __future__ import annotations

import math

from tvm_cim.codegen.matmul import input_steps
from tvm_cim.codegen.pipeline import LOAD, stages, stream_program
from tvm_cim.codegen.replicate import StageShape, stationary_copies
from tvm_cim.core.errors import CimError
from tvm_cim.sim.program import Program
from tvm_cim.sim.timing import finish_times

#: Images streamed beyond the number of stages, so that the last one runs at the pace of
#: a full pipeline.
EXTRA_IMAGES = 3


def stream_figures(plan, bits=None) -> dict:
    """What a stream of images costs on ``plan``'s chip at ``bits`` (None: the plan's).

    Returns
    -------
    dict
        ``stationary``; ``copies`` (weight copies per convolution when stationary);
        ``load_us`` and ``load_writes`` (writing every tile once; 0 when not stationary);
        ``first_image_us`` (one image's latency once loaded); ``interval_us`` (between
        images in the steady state), ``throughput_per_s``, ``writes_per_image`` and
        ``energy_per_image_nj`` (None without energy figures).
    """
    if not plan.regions:
        raise CimError("the model has no operator the crossbars can run")
    bits = plan.bits if bits is None else bits
    convs = [op.name for op in plan.operators if op.conv is not None]
    layers = _stage_shapes(plan, plan.programs(None, bits, dict.fromkeys(convs, 1)))
    # Attention's matmuls write their stored operands for every image, on crossbars a
    # stationary model would have given to weights: such a model rewrites its tiles.
    run_time = any(op.stored is not None for op in plan.operators)
    copies = None if run_time else stationary_copies(layers, plan.arch)
    stationary = copies is not None
    regions = [_region_stream(p, stationary) for p in plan.programs(None, bits, copies)]
    interval_us = (max if stationary else sum)(r["interval_us"] for r in regions)
    energies = [r["energy_per_image_nj"] for r in regions]
    return {
        "stationary": stationary,
        "copies": {name: copies[name] for name in convs} if stationary else {},
        "load_us": max(r["load_us"] for r in regions),  # every crossbar written at once
        "load_writes": sum(r["load_writes"] for r in regions),
        "first_image_us": sum(r["first_image_us"] for r in regions),
        "interval_us": interval_us,
        "throughput_per_s": 1e6 / interval_us if interval_us else math.inf,
        "writes_per_image": sum(r["writes_per_image"] for r in regions),
        "energy_per_image_nj": None if None in energies else math.fsum(energies),
    }


def _stage_shapes(plan, programs: list[Program]) -> list[StageShape]:
    """Tiles, steps and output rows of every operator, from programs without copies."""
    groups = {op.name: op.groups for op in plan.operators}
    shapes = []
    for program in programs:
        instructions = list(program.instructions())
        summaries = program.attrs["operators"]
        for summary, stage in zip(summaries, stages(program), strict=True):
            conv = summary["kind"] == "conv2d"
            out_rows, row_vectors = summary["out_shape"][2:4] if conv else (1, 1)
            shapes.append(
                StageShape(
                    name=summary["name"],
                    tiles=sum(1 for k in stage if instructions[k][0] == "prog"),
                    steps=input_steps(summary["a_bits"], plan.arch.dac_bits),
                    out_rows=int(out_rows),
                    row_vectors=int(row_vectors),
                    copyable=conv and groups[summary["name"]] == 1,
                )
            )
    return shapes


def _region_stream(program: Program, stationary: bool) -> dict:
    """One region's stream: its load, when its first image is done after the load, the
    interval between its last two images, and the writes and energy of one image."""
    images = len(stages(program)) + EXTRA_IMAGES
    stream, labels = stream_program(program, images, stationary)
    stats, ends = finish_times(stream, labels)
    load = sum(1 for m, _ in stream.instructions() if m == "prog") if stationary else 0
    arch = stream.arch
    energy = stats.energy_nj
    if energy is not None:
        energy = (energy - load * (arch.write_energy_nj or 0.0)) / images
    return {
        "load_us": ends[LOAD] / 1e6 if stationary else 0.0,
        "load_writes": load,
        "first_image_us": (ends[0] - (ends[LOAD] if stationary else 0)) / 1e6,
        "interval_us": (ends[images - 1] - ends[images - 2]) / 1e6,
        "writes_per_image": (stats.crossbar_writes - load) // images,
        "energy_per_image_nj": energy,
    }
