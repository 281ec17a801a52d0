"""A stream of images through one region program: weight-stationary and pipelined.

``stream_program`` turns a region's program (one image) into the program of ``images``
images: every image gets its own buffers, input and output tensors, and its operators'
instruction groups (stages) are interleaved as a pipeline: at step ``t`` stage ``j`` of
image ``t - j`` is issued, so that the schedule (each unit in program order, buffers
ordered by their reads and writes) runs a layer on one image while the next layer works
on the image before.

When the program's tile writes fit the chip (no more ``prog`` than crossbars), the stream
can be weight-stationary: each write gets a crossbar of its own and is issued once, before
the first image (the model being loaded), and the images' stages drive the tiles where
they stay. The stages of a step are then merged input step by input step, as
``codegen.matmul.Lanes`` does for tiles: the one digital unit issues in program order,
and a stage emitted whole would hold the next one's shift-adds back until it ends.
Otherwise each image writes its tiles again and stages are issued whole: a stage is
self-contained (each operator writes the tiles it drives), so what every ``mvm`` reads is
that of the one-image program, and so are the values of each image.
"""

from __future__ import annotations

from dataclasses import replace

from tvm_cim.core.errors import CimError

from ..sim import isa
from ..sim.builder import ProgramBuilder
from ..sim.program import Program

#: Which of the program's tensor lists an instruction's ``tensor`` operand indexes.
_TENSOR_TABLE = {"load": "inputs", "store": "outputs"}
#: Per mnemonic, ``(name, kind)`` of its operands: an image's copy renames its buffers
#: and tensors (and, when stationary, its crossbars).
_FIELDS = {s.mnemonic: [(f.name, f.kind) for f in s.fields] for s in isa.INSTRUCTIONS}


def stages(program: Program) -> list[list[int]]:
    """The instruction indices of each operator (``attrs["operators"]``), in order."""
    operators = program.attrs.get("operators")
    if not operators:
        raise CimError(f"{program.name}: the program does not list its operators' instructions")
    groups = [
        [i for start, end in op["instructions"] for i in range(start, end)] for op in operators
    ]
    covered = sorted(i for group in groups for i in group)
    if covered != list(range(len(program) - 1)):  # every instruction but the final halt
        raise CimError(f"{program.name}: its operators do not cover its instructions once")
    return groups


def tiles_fit(program: Program) -> bool:
    """Every tile write of the program can have a crossbar of its own (no more ``prog``
    than crossbars), so that a stream of it can keep its weights. A program writing
    run-time operands (``progb``, attention's matmuls) rewrites its crossbars for every
    image anyway: its stream is not weight-stationary."""
    mnemonics = [mnemonic for mnemonic, _ in program.instructions()]
    if "progb" in mnemonics:
        return False
    return mnemonics.count("prog") <= program.arch.crossbars


#: The label ``stream_program`` gives the load's instructions (and the final halt).
LOAD = -1


def stream_program(
    program: Program, images: int, stationary: bool | None = None
) -> tuple[Program, list[int]]:
    """The program of ``images`` images of ``program``, and each instruction's image.

    Parameters
    ----------
    program
        A region program listing its operators' instructions (``attrs["operators"]``).
    images
        Images in the stream.
    stationary
        Write every tile once, before the images (``tiles_fit`` must hold); False
        rewrites them for every image; None (default) is stationary where the tiles fit.

    Returns
    -------
    (Program, labels)
        The stream's program, inputs and outputs named ``<tensor>.<image>``, and per
        instruction the image it works for (``LOAD`` for the tile writes of a stationary
        stream and the final halt).
    """
    if not isinstance(images, int) or images < 1:
        raise CimError(f"a stream needs at least one image, got {images!r}")
    fits = tiles_fit(program)
    if stationary and not fits:
        raise CimError(
            f"{program.name}: its tile writes do not fit {program.arch.crossbars} crossbars, "
            "so its weights cannot stay"
        )
    stationary = fits if stationary is None else stationary
    groups = stages(program)
    instructions = list(program.instructions())
    crossbar_of = _own_crossbars(instructions) if stationary else None

    b = ProgramBuilder(program.arch, f"{program.name}.stream")
    b.images = program.images
    b.constants = program.constants
    b.buffers = program.buffers * images
    b.buffer_rows = program.buffer_rows * images
    b.inputs = [replace(t, name=f"{t.name}.{i}") for i in range(images) for t in program.inputs]
    b.outputs = [replace(t, name=f"{t.name}.{i}") for i in range(images) for t in program.outputs]
    shifts = {"buffer": len(program.buffers)}
    shifts.update(inputs=len(program.inputs), outputs=len(program.outputs))
    labels: list[int] = []

    def emit(k: int, image: int) -> None:
        mnemonic, ops = instructions[k]
        b.emit(mnemonic, **_renamed(mnemonic, ops, image, shifts, crossbar_of, k))
        labels.append(image)

    if stationary:
        for k, (mnemonic, _) in enumerate(instructions):
            if mnemonic == "prog":
                emit(k, LOAD)
    for step in range(images + len(groups) - 1):
        # the oldest image first: its stages are the ones the next images wait for
        active = [
            (step - j, g) for j, g in reversed(list(enumerate(groups))) if 0 <= step - j < images
        ]
        if stationary:  # the stages' input steps merged, so that they run side by side
            for image, segment in _merged(active, instructions):
                for k in segment:
                    emit(k, image)
        else:  # stages whole: each writes the crossbars it drives
            for image, group in active:
                for k in group:
                    emit(k, image)
    b.emit("halt")
    labels.append(LOAD)
    stream = b.build()
    stream.attrs = {
        "region": program.attrs.get("region"),
        "images": images,
        "stationary": stationary,
    }
    return stream, labels


def _merged(active, instructions) -> list[tuple[int, list[int]]]:
    """``(image, segment)`` of the active stages in one order: each stage's segments
    spread evenly over the step (segment ``k`` of ``n`` at ``(k + 0.5) / n``), so that a
    stage of many short steps is not held to the pace of one with few long ones."""
    placed = []
    for order, (image, group) in enumerate(active):
        segments = _segments(group, instructions)
        for k, segment in enumerate(segments):
            placed.append(((k + 0.5) / len(segments), order, image, segment))
    return [(image, segment) for _, _, image, segment in sorted(placed, key=lambda p: p[:2])]


def _segments(group: list[int], instructions) -> list[list[int]]:
    """A stage's instructions without its tile writes, cut before each ``mvm``: what comes
    before the first input step, then each input step with its conversion and sums."""
    segments: list[list[int]] = [[]]
    for k in group:
        mnemonic = instructions[k][0]
        if mnemonic == "prog":
            continue
        if mnemonic == "mvm" and segments[-1]:
            segments.append([])
        segments[-1].append(k)
    return segments


def _own_crossbars(instructions) -> dict[int, int]:
    """Instruction index -> crossbar, each tile write on a crossbar of its own: the
    ``mvm`` and ``adc`` after a write of crossbar ``x`` use the write's new crossbar."""
    crossbar_of, current, writes = {}, {}, 0
    for k, (mnemonic, ops) in enumerate(instructions):
        operand = isa.BY_MNEMONIC[mnemonic].operand("crossbar")
        if operand is None:
            continue
        if mnemonic == "prog":
            current[ops[operand]] = writes
            writes += 1
        crossbar_of[k] = current[ops[operand]]
    return crossbar_of


def _renamed(mnemonic: str, ops: dict, image: int, shifts, crossbar_of, k: int) -> dict:
    """The operands of instruction ``k`` for ``image``: its own buffers and tensors."""
    out = dict(ops)
    for name, kind in _FIELDS[mnemonic]:
        if kind == "buffer":
            out[name] += image * shifts["buffer"]
        elif kind == "tensor":
            out[name] += image * shifts[_TENSOR_TABLE[mnemonic]]
        elif kind == "crossbar" and crossbar_of is not None:
            out[name] = crossbar_of[k]
    return out
