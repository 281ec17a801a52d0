"""``cim-sim``: run, assemble, disassemble, verify and cost crossbar programs.

Subcommands::

    cim-sim run PROGRAM --input NAME=FILE.npy ... [--output-dir DIR] [--stats FILE.json]
                [--timing-only] [--batch N] [--arch PRESET|FILE] [--backend cython|numpy]
    cim-sim asm FILE.s -o PROGRAM
    cim-sim disasm PROGRAM [-o FILE.s]
    cim-sim verify PROGRAM [--arch PRESET|FILE]
    cim-sim stats PROGRAM [--batch N] [--arch PRESET|FILE] [--json FILE]

Exit status: 0 on success, 2 for a usage error, 3 for an invalid program, architecture or
input (any ``CimError``, or an input file that cannot be read as ``.npy``). Errors are
reported as one line, ``cim-sim: error: <message>``, on stderr. Needs numpy only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError, InputError, ProgramError
from tvm_cim.sim.program import Program, TensorDesc
from tvm_cim.sim.simulator import Simulator, available_backends, default_backend
from tvm_cim.sim.timing import SimStats

PROG = "cim-sim"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INVALID = 3

BACKENDS = ("cython", "numpy")


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class DataError(Exception):
    """A file named on the command line cannot be read or written (exit status 3)."""


# ---------------------------------------------------------------------- command registry

Handler = Callable[[argparse.Namespace], int]
Builder = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Builder
    handler: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, *, help: str, arguments: Builder) -> Callable[[Handler], Handler]:
    """Register the decorated handler as subcommand ``name``.

    ``arguments`` adds the subcommand's options to its parser; the handler receives the
    parsed namespace and returns the exit status.
    """

    def register(handler: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = Command(name, help, arguments, handler)
        return handler

    return register


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line on stderr, with exit status 2."""

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)}{hint}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run and inspect crossbar programs for CIM accelerators.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.arguments(p)
        p.set_defaults(handler=cmd.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``cim-sim``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (CimError, DataError) as exc:
        return _fail(str(exc) or type(exc).__name__, EXIT_INVALID)
    except BrokenPipeError:
        # The reader went away (``cim-sim disasm p.bin | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------- shared arguments


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _input_spec(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def _add_arch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        metavar="PRESET|FILE",
        help="architecture to use instead of the program's own: a preset "
        f"({', '.join(CimArch.presets())}) or a .yaml/.yml/.json file; its structural "
        "fields must match the program's",
    )


def _add_batch(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--batch", type=_positive_int, metavar="N", help=help)


def _arch(args: argparse.Namespace) -> CimArch | None:
    return None if args.arch is None else CimArch.load(args.arch)


def _write_text(path: str, text: str, what: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise DataError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def _write_json(path: str, data: dict, what: str) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n", what)


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
            shape_text = "[" + ", ".join(str(d) for d in shape) + "]"
            lines.append(f"  {name:<{width}}  {shape_text} {dtype}{where}")
    key_width = max(len(k) for k, _ in rows) + 1
    lines.extend(f"{k + ':':<{key_width}} {v}" for k, v in rows)
    return "\n".join(lines)


# ---------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    p.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        type=_input_spec,
        metavar="NAME=FILE.npy",
        help="an input tensor, [batch, width] integers, or [batch*rows, width] or "
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
    _add_arch(p)
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help=f"simulator backend (default: {default_backend()})",
    )


def _load_inputs(specs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for name, path in specs:
        if name in inputs:
            raise UsageError(f"input {name!r} given twice")
        inputs[name] = _load_npy(name, path)
    return inputs


def _load_npy(name: str, path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.ndarray):  # an .npz archive
                data.close()
                raise DataError(f"input {name!r}: {path} is not a .npy file")
            return data
    except OSError as exc:
        raise DataError(f"cannot read input {name!r} from {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise DataError(f"input {name!r}: {path} is not a readable .npy file ({exc})") from None


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


@command(
    "run",
    help="simulate a program on .npy inputs and report its outputs and latency",
    arguments=_run_arguments,
)
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
    inputs = _load_inputs(args.inputs)
    simulator = Simulator(arch, backend)
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
    if files:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            for name, file in files.items():
                np.save(file, result.outputs[name], allow_pickle=False)
                written[name] = str(file)
        except OSError as exc:
            raise DataError(
                f"cannot write outputs to {args.output_dir}: {exc.strerror or exc}"
            ) from None
    if args.stats:
        _write_json(args.stats, result.stats.to_dict(), "statistics")

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


@command("asm", help="assemble text into a binary program", arguments=_asm_arguments)
def _asm(args: argparse.Namespace) -> int:
    try:
        text = Path(args.source).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {args.source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{args.source} is not UTF-8 text: {exc.reason}") from None
    program = Program.from_asm(text)
    program.verify()
    try:
        program.save(args.output)
    except OSError as exc:
        raise DataError(f"cannot write program {args.output}: {exc.strerror or exc}") from None
    print(f"wrote {args.output}: {_count(len(program), 'instruction')}")
    return EXIT_OK


def _disasm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    p.add_argument("-o", "--output", metavar="FILE.s", help="write the text here, not stdout")


@command("disasm", help="print a binary program as assembly text", arguments=_disasm_arguments)
def _disasm(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    # The text of a program that fails verification is still useful for debugging, so
    # only what the disassembler cannot print is refused.
    for index, (mnemonic, _) in enumerate(program.instructions()):
        if mnemonic.startswith("<"):
            raise ProgramError(f"unknown opcode {int(program.code[index, 0])}", index=index)
    text = program.to_asm()
    if args.output:
        _write_text(args.output, text, "assembly")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# ---------------------------------------------------------------------- verify / stats


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("program", metavar="PROGRAM", help="binary crossbar program")
    _add_arch(p)


def _tensors(tensors: list[TensorDesc]) -> str:
    if not tensors:
        return "none"

    def shape(t: TensorDesc) -> str:
        rows = "" if t.rows == 1 else f"{t.rows}, "
        return f"[{'*' if t.batch is None else t.batch}, {rows}{t.width}]"

    return ", ".join(f"{t.name}{shape(t)} {t.dtype}" for t in tensors)


@command("verify", help="check that a program is valid", arguments=_verify_arguments)
def _verify(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    arch = _arch(args)
    program.verify(arch)
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
    _add_arch(p)
    p.add_argument("--json", metavar="FILE", help="write the statistics as JSON")


@command(
    "stats",
    help="static latency and counts of a program, without running it",
    arguments=_stats_arguments,
)
def _stats(args: argparse.Namespace) -> int:
    program = Program.load(args.program)
    arch = _arch(args)
    stats = program.estimate(args.batch, arch)
    if args.json:
        _write_json(args.json, stats.to_dict(), "statistics")
    outputs = {t.name: ((stats.batch * t.rows, t.width), t.dtype, None) for t in program.outputs}
    print(_summary(stats, program, outputs))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
