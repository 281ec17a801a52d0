"""``cim-sim``: run, assemble, disassemble, verify and cost crossbar programs.

Subcommands::

    cim-sim run PROGRAM --input NAME=FILE.npy ... [--output-dir DIR] [--stats FILE.json]
                [--timing-only] [--batch N] [--arch PRESET|FILE] [--backend cython|numpy]
                [--memory-limit SIZE] [--work-limit N]
    cim-sim asm FILE.s -o PROGRAM
    cim-sim disasm PROGRAM [-o FILE.s]
    cim-sim verify PROGRAM [--arch PRESET|FILE]
    cim-sim stats PROGRAM [--batch N] [--arch PRESET|FILE] [--json FILE]

Exit status, as for ``tvm-cim``: 0 on success, 2 for a usage error or bad input (an invalid
program, architecture or input: any ``CimError``, or an input file that cannot be read as
``.npy``), 3 for an unexpected error. Errors are reported as one line, ``cim-sim: error:
<message>``, on stderr. Needs numpy only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tvm_cim.cli.common import (
    EXIT_OK,
    Cli,
    Command,
    FileError,
    UsageError,
    add_arch_argument,
    add_inputs_argument,
    format_shape,
    input_paths,
    load_npy,
    positive_int,
    write_file,
    write_json,
    write_npy,
    write_text,
)
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import InputError, ProgramError
from tvm_cim.sim.asm import assemble, disassemble
from tvm_cim.sim.program import Program, TensorDesc
from tvm_cim.sim.simulator import (
    MEMORY_LIMIT_VARIABLE,
    WORK_LIMIT,
    WORK_LIMIT_VARIABLE,
    Simulator,
    available_backends,
    default_backend,
)
from tvm_cim.sim.timing import SimStats, estimate
from tvm_cim.sim.verifier import verify

PROG = "cim-sim"

BACKENDS = ("cython", "numpy")


def _add_batch(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--batch", type=positive_int, metavar="N", help=help)


def _arch(args: argparse.Namespace) -> CimArch | None:
    return None if args.arch is None else CimArch.load(args.arch)


# ---------------------------------------------------------------------- summaries


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _us(ps: int) -> str:
    """Exact microseconds from picoseconds, with at least three decimals."""
    whole, frac = divmod(int(ps), 10**6)
    digits = f"{frac:06d}".rstrip("0").ljust(3, "0")
    return f"{whole}.{digits} us"


def _summary(
    stats: SimStats, program: Program, outputs: dict[str, tuple[tuple, str, str | None]]
) -> str:
    """Human-readable report; ``outputs`` maps names to (shape, dtype, written file)."""
    rows: list[tuple[str, str]] = [("batch", str(stats.batch))]
    rows.append(("latency", _us(stats.latency_ps)))
    rows.append(("sequential latency", _us(stats.sequential_ps)))
    rows.append(("cycles", str(stats.cycles)))
    rows.append(("crossbar writes", str(stats.crossbar_writes)))
    rows.append(("MVM executions", str(stats.mvm_executions)))
    rows.append(("ADC conversions", str(stats.adc_conversions)))
    rows.append(("digital ops", str(stats.digital_ops)))
    if stats.energy_nj is not None:
        rows.append(("energy", f"{stats.energy_nj:.6g} nJ"))
    total = sum(stats.instructions.values())
    counts = " ".join(f"{m}={n}" for m, n in sorted(stats.instructions.items()))
    rows.append(("instructions", f"{total} ({counts})" if counts else "0"))

    lines = [f"program {program.name!r} on {stats.arch.name}"]
    if outputs:
        lines.append("outputs:")
        width = max(len(name) for name in outputs)
        for name, (shape, dtype, file) in outputs.items():
            where = f" -> {file}" if file else ""
            lines.append(f"  {name:<{width}}  {format_shape(shape)} {dtype}{where}")
    key_width = max(len(k) for k, _ in rows) + 1
    lines.extend(f"{k + ':':<{key_width}} {v}" for k, v in rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    add_inputs_argument(
        p,
        "an input tensor, [batch, width] integers, or [batch*rows, width] or "
        "[batch, rows, width] for one with several rows per item (repeat for each input)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="write each output as DIR/NAME.npy")
    p.add_argument("--stats", metavar="FILE.json", help="write the run's statistics as JSON")
    p.add_argument(
        "--timing-only",
        action="store_true",
        help="count and time the program without computing values; inputs may be omitted",
    )
    _add_batch(p, "number of input vectors (needed with --timing-only and no inputs)")
    add_arch_argument(p, "override")
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help=f"simulator backend (default: {default_backend()})",
    )
    p.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help=f"refuse a run that would hold more memory (4G, 512M, bytes; default: "
        f"${MEMORY_LIMIT_VARIABLE}, else 2G)",
    )
    p.add_argument(
        "--work-limit",
        metavar="N",
        help=f"refuse a run of more operations (cell-MACs and vector steps, such as 5e12; "
        f"default: ${WORK_LIMIT_VARIABLE}, else {WORK_LIMIT:.0e})",
    )


def _limit(text: str | None) -> str | None:
    """An option's limit, refused as a usage error when it is empty."""
    if text is not None and not text.strip():
        raise UsageError("a limit cannot be empty")
    return text


def _output_files(directory: str | None, outputs: list[TensorDesc]) -> dict[str, Path]:
    """``DIR/NAME.npy`` per output; names that are not plain file names are refused."""
    if directory is None:
        return {}
    files = {}
    for t in outputs:
        seps = {"/", "\0", os.sep, os.altsep} - {None}
        if t.name in (".", "..") or any(sep in t.name for sep in seps):
            raise ProgramError(f"output name {t.name!r} cannot be used as a file name")
        files[t.name] = Path(directory) / f"{t.name}.npy"
    return files


def _run(args: argparse.Namespace) -> int:
    if args.timing_only and args.output_dir:
        raise UsageError("--output-dir cannot be used with --timing-only (no values are computed)")
    backend = args.backend or default_backend()
    if backend not in available_backends():
        raise UsageError(
            f"backend {backend!r} is not available in this build; have {available_backends()}"
        )
    program = Program.load(args.program)
    arch = _arch(args)
    inputs = {name: load_npy(name, path) for name, path in input_paths(args.inputs).items()}
    simulator = Simulator(
        arch, backend, memory_limit=_limit(args.memory_limit), work_limit=_limit(args.work_limit)
    )
    prepared = simulator.prepare(program)
    files = _output_files(args.output_dir, prepared.outputs)
    if args.timing_only and not inputs:
        if args.batch is None and prepared.fixed_batch is None and prepared.inputs:
            raise InputError(
                "--timing-only without inputs needs --batch: the program's batch is not fixed"
            )
        result = simulator.run(prepared, None, functional=False, batch=args.batch)
    else:
        result = simulator.run(prepared, inputs, functional=not args.timing_only, batch=args.batch)

    written: dict[str, str] = {}
    for name, file in files.items():
        write_npy(file, result.outputs[name], "output")
        written[name] = str(file)
    if args.stats:
        write_json(args.stats, result.stats.to_dict(), "statistics")

    outputs = {
        name: (value.shape, str(value.dtype), written.get(name))
        for name, value in result.outputs.items()
    }
    print(f"backend: {backend}{' (timing only)' if args.timing_only else ''}")
    print(_summary(result.stats, program, outputs))
    return EXIT_OK


# ---------------------------------------------------------------------- asm / disasm


def _asm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="FILE.s", help="assembly text")
    p.add_argument("-o", "--output", required=True, metavar="PROGRAM", help="binary to write")


def _asm(args: argparse.Namespace) -> int:
    try:
        text = Path(args.source).read_text(encoding="utf-8")
    except OSError as exc:
        raise FileError(f"cannot read {args.source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise FileError(f"{args.source} is not UTF-8 text: {exc.reason}") from None
    program = assemble(text)
    verify(program)
    write_file(args.output, program.save, "program")
    print(f"wrote {args.output}: {_count(len(program), 'instruction')}")
    return EXIT_OK


def _disasm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    p.add_argument("-o", "--output", metavar="FILE.s", help="write the text here, not stdout")


def _disasm(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    # The text of a program that fails verification is still useful for debugging, so
    # only what the disassembler cannot print is refused.
    for index, (mnemonic, _) in enumerate(program.instructions()):
        if mnemonic.startswith("<"):
            raise ProgramError(f"unknown opcode {int(program.code[index, 0])}", index=index)
    text = disassemble(program)
    if args.output:
        write_text(args.output, text, "assembly")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# ---------------------------------------------------------------------- verify / stats


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    add_arch_argument(p, "override")


def _tensors(tensors: list[TensorDesc]) -> str:
    if not tensors:
        return "none"

    def shape(t: TensorDesc) -> str:
        rows = "" if t.rows == 1 else f"{t.rows}, "
        return f"[{'*' if t.batch is None else t.batch}, {rows}{t.width}]"

    return ", ".join(f"{t.name}{shape(t)} {t.dtype}" for t in tensors)


def _verify(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    arch = _arch(args)
    verify(program, arch)
    print(
        f"ok: {_count(len(program), 'instruction')}, "
        f"{_count(len(program.images), 'crossbar image')}, "
        f"{_count(len(program.buffers), 'buffer')}, {_count(len(program.constants), 'constant')}; "
        f"inputs {_tensors(program.inputs)}; outputs {_tensors(program.outputs)}"
    )
    return EXIT_OK


def _stats_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    _add_batch(p, "number of input vectors (default: the program's fixed batch, else 1)")
    add_arch_argument(p, "override")
    p.add_argument("--json", metavar="FILE", help="write the statistics as JSON")


def _stats(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    arch = _arch(args)
    stats = estimate(program, args.batch, arch)
    if args.json:
        write_json(args.json, stats.to_dict(), "statistics")
    outputs = {t.name: ((stats.batch * t.rows, t.width), t.dtype, None) for t in program.outputs}
    print(_summary(stats, program, outputs))
    return EXIT_OK


# ---------------------------------------------------------------------- the program

CIM_SIM = Cli(
    prog=PROG,
    description="Run and inspect crossbar programs for CIM accelerators.",
    commands=(
        Command(
            "run",
            "simulate a program on .npy inputs and report its outputs and latency",
            _run_arguments,
            _run,
        ),
        Command("asm", "assemble text into a binary program", _asm_arguments, _asm),
        Command("disasm", "print a binary program as assembly text", _disasm_arguments, _disasm),
        Command("verify", "check that a program is valid", _verify_arguments, _verify),
        Command(
            "stats",
            "static latency and counts of a program, without running it",
            _stats_arguments,
            _stats,
        ),
    ),
)


#: Entry point of ``cim-sim``: ``main(argv=None)`` runs ``argv`` (``sys.argv[1:]`` when
#: None) and returns the exit status.
main = CIM_SIM.main


if __name__ == "__main__":
    sys.exit(main())
