"""The scaffolding both command lines stand on: parser, subcommand table, exit statuses,
one-line errors, shared argument types and file access.

A program is a :class:`Cli`: its name and its subcommands (a table of :class:`Command`).
``Cli.main`` parses the arguments, runs the subcommand and turns whatever it raises into
one line on stderr and an exit status, the same for every program: 0 on success, 2 for a
usage error or input the program refuses (any ``CimError``), 3 for an unexpected error.
This module needs numpy only, so that ``cim-sim`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tvm_cim.core.errors import CimError, InternalCompilerError
from tvm_cim.core.files import atomic_path

EXIT_OK = 0
#: A malformed command line (argparse's own status for it).
EXIT_USAGE = 2
#: Input the program refuses: a ``CimError`` (a bad model, program, arch or file).
EXIT_INVALID = 2
#: Anything else: a bug (``InternalCompilerError`` among them), one line all the same.
EXIT_UNEXPECTED = 3
#: The reader of the output went away (``cim-sim disasm p.bin | head``).
EXIT_BROKEN_PIPE = 1

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (exit status 2)."""


class FileError(CimError):
    """A file named on the command line cannot be read or written."""


def one_line(message: object) -> str:
    """``message`` with its lines joined by single spaces (blank lines dropped)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


class OneLineParser(argparse.ArgumentParser):
    """Reports usage errors as one line on stderr, with exit status 2."""

    def error(self, message: str):
        program = self.prog.split()[0]  # subcommand parsers are named "<program> <command>"
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"{program}: error: {one_line(message)}{hint}\n")


# ---------------------------------------------------------------------- programs


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help line, options and handler.

    ``arguments`` adds the subcommand's options to its parser; ``handler`` receives the
    parsed namespace and returns the exit status.
    """

    name: str
    help: str
    arguments: Arguments
    handler: Handler


@dataclass(frozen=True)
class Cli:
    """A command-line program made of subcommands.

    Parameters
    ----------
    prog
        The program's name, which starts every error line.
    description
        First line of ``--help``.
    commands
        The subcommands, in the order ``--help`` lists them.
    version
        Printed by ``--version``; None for no such option.
    """

    prog: str
    description: str
    commands: tuple[Command, ...]
    version: str | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.commands]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{self.prog}: subcommand(s) {', '.join(repeated)} given twice")

    def build_parser(self) -> argparse.ArgumentParser:
        """The program's argument parser, one subparser per command."""
        parser = OneLineParser(prog=self.prog, description=self.description)
        if self.version is not None:
            parser.add_argument("--version", action="version", version=self.version)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for cmd in self.commands:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            cmd.arguments(p)
            p.set_defaults(handler=cmd.handler)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv`` (``sys.argv[1:]`` when None), run the subcommand and return its
        exit status; errors become one line on stderr."""
        args = self.build_parser().parse_args(argv)
        _created.clear()
        try:
            status = self._run(args)
        except BaseException:
            _remove_created()
            raise
        if status not in (EXIT_OK, EXIT_BROKEN_PIPE):
            _remove_created()  # a command that fails leaves no file it wrote behind
        _created.clear()
        return status

    def _run(self, args: argparse.Namespace) -> int:
        try:
            return args.handler(args)
        except BrokenPipeError:
            # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except UsageError as exc:
            return self.fail(str(exc), EXIT_USAGE)
        except CimError as exc:
            return self.fail(str(exc) or type(exc).__name__, EXIT_INVALID)
        except InternalCompilerError as exc:  # names the operators: no "unexpected" prefix
            return self.fail(str(exc), EXIT_UNEXPECTED)
        except Exception as exc:
            return self.fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_UNEXPECTED)

    def fail(self, message: str, status: int) -> int:
        """Print ``<prog>: error: <message>`` as one line on stderr; return ``status``."""
        print(f"{self.prog}: error: {one_line(message)}", file=sys.stderr)
        return status


# ---------------------------------------------------------------------- argument types


#: Largest count a command line takes (batch, epochs, episodes): far above any real run,
#: far below where timing sums or memory estimates stop being exact.
MAX_COUNT = 2**40


def bounded_int(low: int, high: int = MAX_COUNT):
    """An argparse type: an integer in ``low .. high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if value < low and high == MAX_COUNT:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if not low <= value <= high:
            shown = value if abs(value) < 10**20 else f"{str(value)[:12]}... ({len(text)} digits)"
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {shown}")
        return value

    parse.__name__ = "integer"
    return parse


positive_int = bounded_int(1)
#: Seeds: what every seeded library (NumPy, PyTorch, Optuna, SB3) takes.
SEED = bounded_int(0, 2**32 - 1)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not (value > 0 and value != float("inf")):  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text[:40]}")
    return value


def input_spec(text: str) -> tuple[str, str]:
    """An argparse type: ``NAME=FILE.npy`` as ``(name, path)``."""
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def add_inputs_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--input/-i NAME=FILE.npy``, repeatable, collected in ``args.inputs``."""
    parser.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        type=input_spec,
        metavar="NAME=FILE.npy",
        help=help,
    )


def input_paths(specs: list[tuple[str, str]]) -> dict[str, str]:
    """The ``--input`` specs by name; an input given twice is a usage error."""
    paths: dict[str, str] = {}
    for name, path in specs:
        if name in paths:
            raise UsageError(f"input {name!r} given twice")
        paths[name] = path
    return paths


ArchRole = Literal["override", "target", "study"]

#: How ``--arch`` reads in each of its roles: (default, help after the list of presets).
_ARCH_ROLES = {
    "override": (
        None,
        "architecture to use instead of the program's own: a preset ({presets}) or a "
        ".yaml/.yml/.json file; its structural fields must match the program's",
    ),
    "target": (
        None,
        "target architecture: a preset ({presets}) or a .yaml/.yml/.json file (default: "
        "the built-in default architecture)",
    ),
    "study": ("rram-4b", "arch preset or file (tvm-cim or CIM-AQ YAML/JSON; default rram-4b)"),
}


def add_arch_argument(parser: argparse.ArgumentParser, role: ArchRole) -> None:
    """``--arch PRESET|FILE``, worded for its role.

    Parameters
    ----------
    parser
        The subcommand's parser.
    role
        ``"override"``: replaces a program's own architecture, no default (``cim-sim``);
        ``"target"``: the compile target, default the built-in ``CimArch()`` (``tvm-cim
        compile``/``inspect``); ``"study"``: default ``rram-4b``, CIM-AQ files accepted
        (``tvm-cim search``/``report``).
    """
    from tvm_cim.core.arch import CimArch

    default, help_text = _ARCH_ROLES[role]
    parser.add_argument(
        "--arch",
        default=default,
        metavar="PRESET|FILE",
        help=help_text.format(presets=", ".join(CimArch.presets())),
    )


# ---------------------------------------------------------------------- files


#: Files the running command created, removed again if it fails.
_created: list[Path] = []


def _remove_created() -> None:
    for path in _created:
        path.unlink(missing_ok=True)
    _created.clear()


def write_file(path: str | Path, write: Callable[[Path], None], what: str) -> None:
    """Run ``write`` on a temporary file that replaces ``path`` once written (parent
    folders created; a failed write leaves ``path`` as it was, and nothing beside it).
    A file this creates is removed again if the running command fails (``Cli.main``).

    Raises
    ------
    FileError
        ``cannot write <what> <path>: <reason>`` when the system refuses.
    """
    path = Path(path)
    existed = path.exists()
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise FileError(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    if not existed:
        _created.append(path)


def write_text(path: str | Path, text: str, what: str) -> None:
    """Write ``text`` to ``path`` (see :func:`write_file`)."""
    write_file(path, lambda p: p.write_text(text), what)


def write_json(path: str | Path, data: object, what: str) -> None:
    """Write ``data`` as indented JSON with a final newline (see :func:`write_file`)."""
    write_text(path, json.dumps(data, indent=2) + "\n", what)


def write_npy(path: str | Path, array: np.ndarray, what: str) -> None:
    """Save ``array`` as an ``.npy`` file (see :func:`write_file`)."""
    write_file(path, lambda p: np.save(p, array, allow_pickle=False), what)


def load_npy(name: str, path: str) -> np.ndarray:
    """Read input ``name`` from the ``.npy`` file ``path`` (no pickles).

    Raises
    ------
    FileError
        The file cannot be read, is an ``.npz`` archive or is not ``.npy`` data.
    """
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.ndarray):
                data.close()
                raise FileError(f"input {name!r}: {path} is an .npz archive, not an .npy file")
            return data
    except OSError as exc:
        raise FileError(f"cannot read input {name!r} from {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise FileError(f"input {name!r}: {path} is not a readable .npy file ({exc})") from None


def format_shape(shape: Sequence[int]) -> str:
    """``[d0, d1, ...]``, the way both programs print shapes."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"
