"""``tvm-cim``: compile ONNX models for CIM crossbars, inspect them and run the result.

Subcommands::

    tvm-cim compile MODEL.onnx -o OUT.so [--arch PRESET|FILE] [--precision CFG]
                [--input-shape NAME:D0,D1,... ...] [--calibration FILE.npz|FILE.npy|DIR]
                [--report FILE.json] [--dump-programs DIR]
    tvm-cim inspect MODEL.onnx [--input-shape NAME:D0,D1,... ...] [--arch PRESET|FILE]
                [--precision CFG]
    tvm-cim run OUT.so --input NAME=FILE.npy ... [--output-dir DIR] [--stats FILE.json]

``compile`` partitions the model, lowers its dense and convolution operators to crossbar
programs, prints the per-operator report and exports the executable as a shared library
(``export_library``); ``run`` loads such a library in the Relax VM, which calls the
simulator for each crossbar region. Operator names are the ONNX node names.

Exit status: 0 on success, 2 for a usage error or bad input (a missing or malformed file,
a model or configuration the compiler refuses: any ``CimError``), 3 for an unexpected
error. Errors are reported as one line, ``tvm-cim: error: <message>``, on stderr. TVM is
imported only by the subcommands that need it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tvm_cim import __version__
from tvm_cim.cli import report as cli_report
from tvm_cim.cli import search as cli_search
from tvm_cim.cli import train as cli_train
from tvm_cim.core.errors import CimError

PROG = "tvm-cim"
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ERROR = 3

#: Suffix of the program files ``compile --dump-programs`` writes.
PROGRAM_SUFFIX = ".cimprog"
_MAX_FILE_STEM = 200


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """Reports usage errors as one line on stderr, with exit status 2."""

    def error(self, message: str):
        hint = f" (see '{self.prog} --help')"
        self.exit(EXIT_USAGE, f"{PROG}: error: {_one_line(message)}{hint}\n")


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------- argument types


def _input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, colon, dims = text.rpartition(":")
    if not colon or not name or not dims:
        raise argparse.ArgumentTypeError(f"expected NAME:D0,D1,..., got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected NAME:D0,D1,... with integer dimensions, got {text!r}"
        ) from None
    if any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be at least 1, got {text!r}")
    return name, shape


def _input_spec(text: str) -> tuple[str, str]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got {text!r}")
    return name, path


def _shapes(specs: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in specs:
        if name in shapes:
            raise UsageError(f"--input-shape gives input {name!r} twice")
        shapes[name] = shape
    return shapes


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.onnx", help="ONNX model")
    p.add_argument(
        "--input-shape",
        dest="input_shapes",
        action="append",
        default=[],
        type=_input_shape,
        metavar="NAME:D0,D1,...",
        help="static shape of an input, required for inputs with dynamic dimensions "
        "(repeat for each input)",
    )


def _add_arch_precision(p: argparse.ArgumentParser) -> None:
    from tvm_cim.core.arch import CimArch

    p.add_argument(
        "--arch",
        metavar="PRESET|FILE",
        help=f"target architecture: a preset ({', '.join(CimArch.presets())}) or a "
        ".yaml/.yml/.json file (default: the built-in default architecture)",
    )
    p.add_argument(
        "--precision",
        metavar="CFG",
        help="per-operator bit widths: a YAML/JSON file by ONNX node name (and 'default'), "
        "a list in offload order, or an [L, 2] .npy policy (default: W8A8 for float "
        "operators, the model's codes for quantized ones)",
    )


# ---------------------------------------------------------------------- shared helpers


def _fmt_shape(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _load_model(args: argparse.Namespace):
    from tvm_cim.compiler.frontend import load_onnx

    return load_onnx(args.model, _shapes(args.input_shapes))


def _load_arch(spec: str | None):
    from tvm_cim.core.arch import CimArch

    return CimArch.load(spec) if spec else CimArch()


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).exists():
        raise CimError(f"{what} {path} does not exist")


def _write(path: Path, write: Callable[[Path], None], what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise CimError(f"cannot write {what} {path}: {exc.strerror or exc}") from None


def _write_json(path: str, data: dict, what: str) -> None:
    _write(Path(path), lambda p: p.write_text(json.dumps(data, indent=2) + "\n"), what)


def program_file_name(region: str) -> str:
    """``<region>.cimprog``, with characters other than ``[A-Za-z0-9_.-]`` replaced and
    an over-long region name shortened (keeping a checksum of the full name)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", region).lstrip(".") or "region"
    if len(stem) > _MAX_FILE_STEM:
        stem = f"{stem[: _MAX_FILE_STEM - 9]}_{zlib.crc32(region.encode()):08x}"
    return stem + PROGRAM_SUFFIX


# ---------------------------------------------------------------------- compile


def _compile_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT.so",
        help="shared library to write (run it with 'tvm-cim run'); required unless --cost-only",
    )
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only the latency report, from the static estimate: no weight images, no "
        "library (for models too large to simulate)",
    )
    _add_arch_precision(p)
    p.add_argument(
        "--calibration",
        metavar="FILE.npz|FILE.npy|DIR",
        help="sample inputs for float operators' activation scales: an .npz with one "
        "[samples, *input shape] array per input name, an .npy for a single-input model, "
        "or a directory of such files",
    )
    p.add_argument("--report", metavar="FILE.json", help="write the compile report as JSON")
    p.add_argument(
        "--dump-programs",
        metavar="DIR",
        help=f"write each region's crossbar program as DIR/<region>{PROGRAM_SUFFIX} "
        "(runnable with 'cim-sim run')",
    )


def _compile(args: argparse.Namespace) -> int:
    _check_file(args.precision, "precision file")
    _check_file(args.calibration, "calibration data")
    arch = _load_arch(args.arch)
    if args.cost_only and args.dump_programs:
        raise CimError("--dump-programs needs weight images; drop --cost-only")
    if not args.cost_only and not args.output:
        raise CimError("-o/--output is required unless --cost-only")
    mod, names = _load_model(args)

    from tvm_cim.compiler.flow import compile_for_cim, cost_report
    from tvm_cim.compiler.frontend import calibration_from_npz, main_inputs

    if args.cost_only:
        report = cost_report(mod, arch=arch, precision=args.precision, names=names)
        print(report.table())
        if args.report:
            data = {**report.to_dict(), "model": str(args.model), "cost_only": True}
            _write_json(args.report, data, "report")
            print(f"wrote {args.report}")
        return EXIT_OK
    calibration = None
    if args.calibration is not None:
        calibration = calibration_from_npz(args.calibration, mod)
    try:
        executable, report = compile_for_cim(
            mod, arch=arch, precision=args.precision, calibration=calibration, names=names
        )
    except CimError as exc:
        if calibration is None and "calibration" in str(exc):
            raise CimError(f"{exc}; pass --calibration FILE.npz") from None
        raise
    print(report.table())

    output = Path(args.output)
    _write(output, lambda p: executable.export_library(str(p)), "library")
    print(f"wrote {output}")
    if args.report:
        data = report.to_dict()
        data["model"] = str(args.model)
        data["library"] = str(output)
        data["inputs"] = [
            {"name": name, "shape": list(shape), "dtype": dtype}
            for name, shape, dtype in main_inputs(mod)
        ]
        _write_json(args.report, data, "report")
        print(f"wrote {args.report}")
    if args.dump_programs:
        directory = Path(args.dump_programs)
        for program in report.programs:
            region = str(program.attrs.get("region", program.name))
            file = directory / program_file_name(region)
            _write(file, program.save, "program")
        print(f"wrote {len(report.programs)} program(s) to {directory}")
    return EXIT_OK


# ---------------------------------------------------------------------- inspect


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    _add_model(p)
    _add_arch_precision(p)


def _form(op) -> str:
    if op.weight_float is not None:
        return "float"
    return "qdq" if op.weight_scale is not None else "int"


def _inspect(args: argparse.Namespace) -> int:
    _check_file(args.precision, "precision file")
    arch = _load_arch(args.arch)
    mod, names = _load_model(args)

    from tvm_cim.compiler.flow import partition_for_cim
    from tvm_cim.compiler.frontend import main_inputs
    from tvm_cim.compiler.report import cpu_operators
    from tvm_cim.core.precision import Precision
    from tvm_cim.relay_passes.extract import read_region
    from tvm_cim.relay_passes.partition import offloaded_functions

    partitioned = partition_for_cim(mod, arch=arch, precision=args.precision, names=names)
    ops = [
        (gv.name_hint, op)
        for gv, fn in offloaded_functions(partitioned)
        for op in read_region(gv.name_hint, fn).ops
    ]
    bits = Precision.load(args.precision).resolve([op.name for _, op in ops])

    print(f"model {args.model}")
    for name, shape, dtype in main_inputs(mod):
        print(f"  input {name}: {_fmt_shape(shape)} {dtype}")
    if names is None:
        print("  (operator names are derived: the ONNX nodes do not map one to one)")
    print(f"offloaded operators ({len(ops)}, in offload order):")
    if ops:
        rows = [("#", "name", "kind", "form", "bits", "weight [K, N]", "in -> out", "region")]
        for i, (region, op) in enumerate(ops):
            weight = op.weight_float if op.weight_float is not None else op.weight_codes
            b = bits[op.name]
            if b is not None:
                tag = f"W{b.w_bits}A{b.a_bits}"
            else:
                tag = "W8A8" if op.input_codes is None else "model"
            rows.append(
                (
                    str(i),
                    op.name,
                    op.kind,
                    _form(op),
                    tag,
                    _fmt_shape(weight.shape),
                    f"{_fmt_shape(op.in_shape)} -> {_fmt_shape(op.out_shape)}",
                    region,
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [f"{cell:<{w}}" for cell, w in zip(r, widths)]
            print("  " + "  ".join(cells + [r[-1]]))
    cpu = cpu_operators(partitioned)
    print(f"on the CPU ({len(cpu)}):")
    for entry in cpu:
        print(f"  {entry['name']} ({entry['kind']}): {entry['reason']}")
    print(f"arch {arch.name}: {arch.rows}x{arch.cols} crossbars, {arch.cell_bits}-bit cells")
    return EXIT_OK


# ---------------------------------------------------------------------- run


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("library", metavar="OUT.so", help="library written by 'tvm-cim compile'")
    p.add_argument(
        "--input",
        "-i",
        dest="inputs",
        action="append",
        default=[],
        type=_input_spec,
        metavar="NAME=FILE.npy",
        help="an input of the model by its ONNX name (repeat for each input)",
    )
    p.add_argument("--output-dir", metavar="DIR", help="write each output as DIR/output_<i>.npy")
    p.add_argument(
        "--stats", metavar="FILE.json", help="write the simulated latency and per-region stats"
    )


def _load_npy(name: str, path: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if not isinstance(data, np.ndarray):
                data.close()
                raise CimError(f"input {name!r}: {path} is an .npz archive, not an .npy file")
            return data
    except OSError as exc:
        raise CimError(f"cannot read input {name!r} from {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise CimError(f"input {name!r}: {path} is not a readable .npy file ({exc})") from None


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def _run(args: argparse.Namespace) -> int:
    import tvm
    from tvm import relax

    from tvm_cim.compiler import runtime

    library = Path(args.library)
    if not library.is_file():
        raise CimError(f"library {library} does not exist")
    try:
        lib = tvm.runtime.load_module(str(library))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        arity = vm._get_function_arity("main")
        params = [vm._get_function_param_name("main", i) for i in range(arity)]
    except Exception as exc:
        raise CimError(
            f"cannot load {library} as a library from 'tvm-cim compile': {_one_line(exc)}"
        ) from None

    given: dict[str, str] = {}
    for name, path in args.inputs:
        if name in given:
            raise UsageError(f"input {name!r} given twice")
        if name not in params:
            raise CimError(f"{name!r} is not an input of the model; inputs: {', '.join(params)}")
        given[name] = path
    missing = [p for p in params if p not in given]
    if missing:
        raise CimError(
            f"missing input {missing[0]!r}: give every input ({', '.join(params)}) "
            "as --input NAME=FILE.npy"
        )
    arrays = [_load_npy(name, given[name]) for name in params]

    before = runtime.last_stats()
    try:
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    except (ValueError, RuntimeError, TypeError) as exc:
        if "loc=param" in str(exc):
            raise CimError(f"inputs do not match the model: {_one_line(exc)}") from None
        raise
    outputs = _flatten(result)
    after = runtime.last_stats()
    stats = {name: s for name, s in after.items() if before.get(name) is not s}
    latency = sum(s.latency_us for s in stats.values())

    written: list[str | None] = [None] * len(outputs)
    if args.output_dir:
        directory = Path(args.output_dir)
        for i, value in enumerate(outputs):
            file = directory / f"output_{i}.npy"
            _write(file, lambda p, v=value: np.save(p, v, allow_pickle=False), "output")
            written[i] = str(file)
    for i, (value, file) in enumerate(zip(outputs, written)):
        where = f" -> {file}" if file else ""
        print(f"output_{i}: {_fmt_shape(value.shape)} {value.dtype}{where}")
    print(f"simulated latency: {latency:.3f} us ({len(stats)} crossbar region(s))")
    if args.stats:
        _write_json(
            args.stats,
            {
                "total_latency_us": latency,
                "regions": {name: s.to_dict() for name, s in stats.items()},
            },
            "statistics",
        )
    return EXIT_OK


# ---------------------------------------------------------------------- entry point

COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "compile": (
        "compile an ONNX model for CIM crossbars and export it as a library",
        _compile_arguments,
        _compile,
    ),
    "inspect": (
        "list the operators the crossbars run and those left on the CPU",
        _inspect_arguments,
        _inspect,
    ),
    "run": ("run a compiled library on .npy inputs with the simulator", _run_arguments, _run),
    "train": (
        "train a zoo model: FP32, W8A8 QAT or mixed-precision finetuning",
        cli_train.train_arguments,
        cli_train.train,
    ),
    "report": (
        "latency study of a zoo model: per layer, total and speedup over W8A8",
        cli_report.report_arguments,
        cli_report.report,
    ),
    "search": (
        "search per-operator bit widths: DQN, DDPG, TPE or random search",
        cli_search.search_arguments,
        cli_search.search,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``tvm-cim`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Compile ONNX models for RRAM computing-in-memory crossbars with TVM.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, arguments, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        arguments(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tvm-cim``; returns the exit status.

    Parameters
    ----------
    argv
        Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (UsageError, CimError) as exc:
        return _fail(str(exc) or type(exc).__name__, EXIT_USAGE)
    except Exception as exc:
        return _fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
