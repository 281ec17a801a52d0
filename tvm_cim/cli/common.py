"""The scaffolding both command lines stand on: parser, subcommand table, exit statuses,
one-line errors, shared argument types and file access.

A program is a :class:`Cli`: its name and its subcommands (a table of :class:`Command`).
``Cli.main`` parses the arguments, runs the subcommand and turns whatever it raises into
one line on stderr and an exit status, the same for every program: 0 on success, 2 for a
usage error or input the program refuses (any ``CimError``), 3 for an unexpected error.
While a command runs, the warnings and log messages of the libraries it uses (TVM, PyTorch,
NumPy, ...) are silenced, those TVM's C++ side prints included, so that an error stays one
line; ``--verbose`` shows them. This module needs numpy only, so that ``cim-sim`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from tvm_cim.core.errors import CimError, InternalCompilerError
from tvm_cim.core.files import atomic_path, folder_problem
from tvm_cim.core.messages import first_line, one_line, shorten

EXIT_OK = 0
#: A malformed command line (argparse's own status for it).
EXIT_USAGE = 2
#: Input the program refuses: a ``CimError`` (a bad model, program, arch or file).
EXIT_INVALID = 2
#: Anything else: a bug (``InternalCompilerError`` among them), one line all the same.
EXIT_UNEXPECTED = 3
#: The reader of the output went away (``cim-sim disasm p.bin | head``).
EXIT_BROKEN_PIPE = 1

#: Longest error line, ``<prog>: error: `` included; longer messages are shortened.
MAX_ERROR_LINE = 200
#: Appended to the errors that are faults of the program itself (exit status 3).
BUG_HINT = " (a bug in tvm-cim: please report it, with the output of --verbose)"

Handler = Callable[[argparse.Namespace], int]
Arguments = Callable[[argparse.ArgumentParser], None]


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (exit status 2)."""


class FileError(CimError):
    """A file named on the command line cannot be read or written."""


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
        """The program's argument parser, one subparser per command.

        ``--verbose`` is taken before or after the subcommand's name.
        """
        parser = OneLineParser(prog=self.prog, description=self.description)
        if self.version is not None:
            parser.add_argument("--version", action="version", version=self.version)
        _add_verbose(parser, default=False)
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for cmd in self.commands:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
            cmd.arguments(p)
            _add_verbose(p, default=argparse.SUPPRESS)  # keeps the program-level value
            p.set_defaults(handler=cmd.handler)
        return parser

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Parse ``argv`` (``sys.argv[1:]`` when None), run the subcommand and return its
        exit status; errors become one line on stderr."""
        args = self.build_parser().parse_args(argv)
        verbose = bool(getattr(args, "verbose", False))
        _created.clear()
        try:
            with _third_party_quiet(self.prog, verbose):
                status = self._run(args, verbose)
        except BaseException:
            _remove_created()
            raise
        if status not in (EXIT_OK, EXIT_BROKEN_PIPE):
            _remove_created()  # a command that fails leaves no file it wrote behind
        _created.clear()
        return status

    def _run(self, args: argparse.Namespace, verbose: bool = False) -> int:
        try:
            return args.handler(args)
        except BrokenPipeError:
            # Point stdout at /dev/null so that the interpreter's final flush stays quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        except UsageError as exc:
            return self.fail(str(exc), EXIT_USAGE, verbose=verbose)
        except CimError as exc:
            return self.fail(str(exc) or type(exc).__name__, EXIT_INVALID, verbose=verbose)
        except InternalCompilerError as exc:  # names the operators: no "unexpected" prefix
            if verbose:
                traceback.print_exc()
            return self.fail(str(exc), EXIT_UNEXPECTED, hint=BUG_HINT, verbose=verbose)
        except Exception as exc:
            if verbose:
                traceback.print_exc()
            detail = one_line(exc) if verbose else first_line(exc)
            message = f"unexpected {type(exc).__name__}: {detail}".rstrip(": ")
            return self.fail(message, EXIT_UNEXPECTED, hint=BUG_HINT, verbose=verbose)

    def fail(self, message: str, status: int, *, hint: str = "", verbose: bool = False) -> int:
        """Print ``<prog>: error: <message><hint>`` as one line on stderr; return ``status``.

        The line is kept to ``MAX_ERROR_LINE`` characters (the message shortened, the hint
        kept) unless ``verbose``.
        """
        head = f"{self.prog}: error: "
        text = one_line(message)
        if not verbose:
            text = shorten(text, MAX_ERROR_LINE - len(head) - len(hint))
        print(f"{head}{text}{hint}", file=sys.stderr)
        return status


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=default,
        help="show the warnings and log messages of the libraries used (TVM, PyTorch, "
        "NumPy, ...), errors in full, and the traceback of an unexpected error",
    )


# ---------------------------------------------------------------------- third-party output


#: Modules whose warnings a command still shows (as one line each): the project's own.
_OWN_MODULES = r"tvm_cim(\..*)?$"


@contextlib.contextmanager
def _third_party_quiet(prog: str, verbose: bool) -> Iterator[None]:
    """Silence third-party warnings and log messages while a command runs, unless
    ``verbose``; the project's own warnings print as ``<prog>: warning: <message>``."""
    if verbose:
        yield
        return
    previous_disable = logging.root.manager.disable
    with warnings.catch_warnings(), _native_stderr_silenced():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", category=UserWarning, module=_OWN_MODULES)
        warnings.showwarning = _one_line_warning(prog)
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(previous_disable)


def _one_line_warning(prog: str):
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = shorten(one_line(message), MAX_ERROR_LINE - len(prog) - 11)
        print(f"{prog}: warning: {text}", file=file or sys.stderr)

    return show


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null while the block runs, so that what native code
    writes there (TVM's C++ ``Warning:`` lines) stays out of the error output; Python's
    ``sys.stderr`` keeps writing where it did."""
    try:
        python_fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a capture without a fd
        python_fd = None
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except OSError:  # no fd 2 at all
        yield
        return
    stream = sys.stderr
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    if python_fd == 2:
        sys.stderr = io.TextIOWrapper(
            os.fdopen(os.dup(saved), "wb", buffering=0),
            encoding=getattr(stream, "encoding", None) or "utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
    try:
        yield
    finally:
        gc.collect()  # native objects freed now print their farewells into /dev/null
        if sys.stderr is not stream:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = stream
        os.dup2(saved, 2)
        os.close(saved)


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


#: Files and folders the running command created, removed again if it fails.
_created: list[Path] = []


def _remove_created() -> None:
    """Remove the files the command created, then the folders it created, deepest
    first, where they are empty."""
    for path in reversed(_created):
        with contextlib.suppress(OSError):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
    _created.clear()


def claim_output(path: str | Path) -> Path:
    """Note that the running command is about to create ``path`` (and its missing parent
    folders), so that a failing command removes them again; what exists already is kept."""
    path = Path(path)
    missing = []
    for folder in path.parents:
        if folder.exists():
            break
        missing.append(folder)
    _created.extend(reversed(missing))
    if not path.exists():
        _created.append(path)
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """Check, before the work, that ``path`` can be written as a file.

    Raises
    ------
    FileError
        ``cannot write <what> <path>: <reason>`` (a folder, under a file, no permission).
    """
    path = Path(path)
    if path.is_dir():
        raise FileError(f"cannot write {what} {path}: it is a folder")
    _check_folder_reachable(path.parent, path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise FileError(f"cannot write {what} {path}: permission denied")
    return path


def check_output_folder(path: str | Path, what: str) -> Path:
    """Check, before the work, that files can be written into the folder ``path``
    (existing or to be created).

    Raises
    ------
    FileError
        ``cannot write <what> to <path>: <reason>``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileError(f"cannot write {what} to {path}: it is a file, not a folder")
    _check_folder_reachable(path, path, what)
    return path


def _check_folder_reachable(folder: Path, target: Path, what: str) -> None:
    """``folder`` exists or can be created, and files can be written in it."""
    problem = folder_problem(folder)
    if problem:
        raise FileError(f"cannot write {what} {target}: {problem}")


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
    claim_output(path)
    try:
        with atomic_path(path) as tmp:
            write(tmp)
    except OSError as exc:
        raise FileError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


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
    """Read input ``name`` from the ``.npy`` file ``path``, its header checked first.

    Plain numbers in this machine's byte order only (no pickles, objects, complex or
    strings), at most ``tvm_cim.core.arrays.array_limit()`` bytes.

    Raises
    ------
    CimError
        The file cannot be read, is an ``.npz`` archive, is not ``.npy`` data, or
        declares a dtype or size it may not have.
    """
    from tvm_cim.core.arrays import read_npy

    return read_npy(path, f"input {name!r}")


def format_shape(shape: Sequence[int]) -> str:
    """``[d0, d1, ...]``, the way both programs print shapes."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"
