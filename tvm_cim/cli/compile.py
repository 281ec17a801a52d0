"""``tvm-cim compile`` and ``tvm-cim inspect``: the commands that read an ONNX model.

``compile`` partitions the model, lowers its dense and convolution operators to crossbar
programs, prints the per-operator report and exports the executable as a shared library
with its digest file beside it (see ``tvm_cim.compiler.library``); ``inspect`` lists the
operators the crossbars take and those left on the CPU. Operator names are the ONNX node
names. Output locations are checked before the model is read; a compile that fails
leaves none of its files. TVM is imported only when a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import zlib
from pathlib import Path

from tvm_cim.cli.common import (
    EXIT_OK,
    UsageError,
    add_arch_argument,
    check_output_file,
    check_output_folder,
    format_shape,
    write_file,
    write_json,
)
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError

#: Suffix of the program files ``compile --dump-programs`` writes.
PROGRAM_SUFFIX = ".cimprog"
_MAX_FILE_STEM = 200


def program_file_name(region: str) -> str:
    """``<region>.cimprog``, with characters other than ``[A-Za-z0-9_.-]`` replaced and
    an over-long region name shortened (keeping a checksum of the full name)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", region).lstrip(".") or "region"
    if len(stem) > _MAX_FILE_STEM:
        stem = f"{stem[: _MAX_FILE_STEM - 9]}_{zlib.crc32(region.encode()):08x}"
    return stem + PROGRAM_SUFFIX


# ---------------------------------------------------------------------- the model's options


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


def _shapes(specs: list[tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in specs:
        if name in shapes:
            raise UsageError(f"--input-shape gives input {name!r} twice")
        shapes[name] = shape
    return shapes


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
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
    add_arch_argument(p, "target")
    p.add_argument(
        "--precision",
        metavar="CFG",
        help="per-operator bit widths: a YAML/JSON file by ONNX node name (and 'default'), "
        "a list in offload order, or an [L, 2] .npy policy (default: W8A8 for float "
        "operators, the model's codes for quantized ones)",
    )


def _load_model(args: argparse.Namespace):
    """The model as a Relax module and its operator names."""
    from tvm_cim.compiler.frontend import load_onnx

    # TVM's frontend prints the failing operator's inputs (IR text) to stdout.
    quiet = not getattr(args, "verbose", False)
    printed = contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext()
    with printed:
        return load_onnx(args.model, _shapes(args.input_shapes))


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not Path(path).exists():
        raise CimError(f"{what} {path} does not exist")


# ---------------------------------------------------------------------- compile


def compile_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim compile``."""
    _add_model_arguments(p)
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


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, outputs that cannot be written or that overlap."""
    from tvm_cim.compiler.library import digest_path

    if args.output:
        check_output_file(args.output, "library")
        check_output_file(digest_path(args.output), "library digest")
    if args.report:
        check_output_file(args.report, "report")
        if args.output and Path(args.report).resolve() in (
            Path(args.output).resolve(),
            digest_path(args.output).resolve(),
        ):
            raise UsageError(f"--report {args.report} would overwrite the library or its digest")
    if args.dump_programs:
        check_output_folder(args.dump_programs, "programs")


def compile_model(args: argparse.Namespace) -> int:
    """``tvm-cim compile``: report, library and its digest, JSON report and program files."""
    if args.cost_only and args.dump_programs:
        raise CimError("--dump-programs needs weight images; drop --cost-only")
    if not args.cost_only and not args.output:
        raise CimError("-o/--output is required unless --cost-only")
    _check_outputs(args)
    _check_file(args.precision, "precision file")
    _check_file(args.calibration, "calibration data")
    arch = CimArch.load(args.arch or None)
    mod, names = _load_model(args)

    from tvm_cim.compiler.flow import compile_for_cim, cost_report
    from tvm_cim.compiler.frontend import calibration_from_npz, main_inputs
    from tvm_cim.compiler.library import digest_path, digest_record

    if args.cost_only:
        report = cost_report(mod, arch=arch, precision=args.precision, names=names)
        print(report.table())
        if args.report:
            data = {**report.to_dict(), "model": str(args.model), "cost_only": True}
            write_json(args.report, data, "report")
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
    if not report.programs:
        print("note: no operator of the model runs on the crossbars; it all runs on the CPU")

    output = Path(args.output)
    inputs = [
        {"name": name, "shape": [int(d) for d in shape], "dtype": str(dtype)}
        for name, shape, dtype in main_inputs(mod)
    ]
    write_file(output, lambda p: executable.export_library(str(p)), "library")
    record = digest_record(output.read_bytes(), inputs)
    write_json(digest_path(output), record, "library digest")
    print(f"wrote {output} (and its digest {digest_path(output).name})")
    if args.report:
        data = report.to_dict()
        data["model"] = str(args.model)
        data["library"] = str(output)
        data["inputs"] = inputs
        write_json(args.report, data, "report")
        print(f"wrote {args.report}")
    if args.dump_programs:
        directory = Path(args.dump_programs)
        for program in report.programs:
            region = str(program.attrs.get("region", program.name))
            file = directory / program_file_name(region)
            write_file(file, program.save, "program")
        print(f"wrote {len(report.programs)} program(s) to {directory}")
    return EXIT_OK


# ---------------------------------------------------------------------- inspect


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim inspect``."""
    _add_model_arguments(p)
    _add_arch_precision(p)


def _form(op) -> str:
    if op.is_float:
        return "float"
    return "qdq" if op.weight_scale is not None else "int"


def inspect_model(args: argparse.Namespace) -> int:
    """``tvm-cim inspect``: the offloaded operators, those left on the CPU and why."""
    _check_file(args.precision, "precision file")
    arch = CimArch.load(args.arch or None)
    mod, names = _load_model(args)

    from tvm_cim.compiler.frontend import main_inputs
    from tvm_cim.compiler.plan import plan_for_cim

    plan = plan_for_cim(
        mod, arch=arch, precision=args.precision, names=names, internal_errors="cpu"
    )
    ops = [(gv.name_hint, op) for gv, region in plan.regions for op in region.ops]
    bits = plan.bits

    print(f"model {args.model}")
    for name, shape, dtype in main_inputs(mod):
        print(f"  input {name}: {format_shape(shape)} {dtype}")
    if names is None:
        print("  (operator names are derived: the ONNX nodes do not map one to one)")
    print(f"offloaded operators ({len(ops)}, in offload order):")
    if ops:
        rows = [("#", "name", "kind", "form", "bits", "weight [K, N]", "in -> out", "region")]
        for i, (region, op) in enumerate(ops):
            weight = op.weight
            b = bits[op.name]
            if b is not None:
                tag = f"W{b.w_bits}A{b.a_bits}"
            else:
                tag = "W8A8" if op.input is None else "model"
            rows.append(
                (
                    str(i),
                    op.name,
                    op.kind,
                    _form(op),
                    tag,
                    format_shape(weight.shape),
                    f"{format_shape(op.in_shape)} -> {format_shape(op.out_shape)}",
                    region,
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
        for r in rows:
            cells = [f"{cell:<{w}}" for cell, w in zip(r, widths)]
            print("  " + "  ".join(cells + [r[-1]]))
    print(f"on the CPU ({len(plan.cpu)}):")
    for entry in plan.cpu:
        print(f"  {entry['name']} ({entry['kind']}): {entry['reason']}")
    print(f"arch {arch.name}: {arch.rows}x{arch.cols} crossbars, {arch.cell_bits}-bit cells")
    return EXIT_OK
