"""``tvm-cim run``: run a library from ``tvm-cim compile`` in the Relax VM on ``.npy``
inputs; the VM calls the simulator for each crossbar region.

Before anything is loaded, the output locations are checked, the library is checked
against its ELF header and the digest file ``compile`` wrote beside it (see
``tvm_cim.compiler.library``), and the inputs against the model's names, shapes and
dtypes recorded there, NaN and infinite values refused. A run that fails leaves none of
its output files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tvm_cim.cli.common import (
    EXIT_OK,
    add_inputs_argument,
    check_output_file,
    check_output_folder,
    format_shape,
    input_paths,
    load_npy,
    write_json,
    write_npy,
)
from tvm_cim.core.errors import CimError, InputError
from tvm_cim.core.messages import tvm_message


def run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim run``."""
    p.add_argument("library", metavar="OUT.so", help="library written by 'tvm-cim compile'")
    add_inputs_argument(p, "an input of the model by its ONNX name (repeat for each input)")
    p.add_argument("--output-dir", metavar="DIR", help="write each output as DIR/output_<i>.npy")
    p.add_argument(
        "--stats", metavar="FILE.json", help="write the simulated latency and per-region stats"
    )
    p.add_argument(
        "--no-digest",
        action="store_true",
        help="load a library without the digest file 'tvm-cim compile' writes beside it "
        "(OUT.so.json); its ELF header is still checked. A library is native code and runs "
        "with your rights: load only libraries you trust",
    )


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def _check_names(params: list[str], given: dict[str, str]) -> None:
    """Every input of the model given, and no other."""
    for name in given:
        if name not in params:
            raise CimError(f"{name!r} is not an input of the model; inputs: {', '.join(params)}")
    missing = [p for p in params if p not in given]
    if missing:
        raise CimError(
            f"missing input {missing[0]!r}: give every input ({', '.join(params)}) "
            "as --input NAME=FILE.npy"
        )


def _checked_input(name: str, path: str, array: np.ndarray, spec: dict | None) -> np.ndarray:
    """``array`` as the model takes input ``name``: the dtype and shape ``spec`` records
    (when known), numbers only, no NaN or infinite values."""
    where = f"input {name!r} ({Path(path).name})"
    if array.dtype.kind not in "biuf":
        raise InputError(f"{where}: dtype {array.dtype} is not a number type")
    if spec is not None:
        if array.dtype != np.dtype(spec["dtype"]):
            raise InputError(f"{where}: dtype {array.dtype}, the model takes {spec['dtype']}")
        if list(array.shape) != spec["shape"]:
            raise InputError(
                f"{where}: shape {format_shape(array.shape)}, the model takes "
                f"{format_shape(spec['shape'])}"
            )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{where} holds NaN or infinite values")
    return np.ascontiguousarray(array)


def _load_vm(library: Path, data: bytes):
    """The Relax VM of the checked library and the names of ``main``'s parameters."""
    import tvm
    from tvm import relax

    from tvm_cim.compiler.library import LibraryError, load_library

    lib = load_library(library, data)
    try:
        vm = relax.VirtualMachine(lib, tvm.cpu())
        arity = vm._get_function_arity("main")
        params = [vm._get_function_param_name("main", i) for i in range(arity)]
    except Exception as exc:  # a TVM library, but not one with a Relax ``main``
        raise LibraryError(
            f"{library} is not a library from 'tvm-cim compile' ({tvm_message(exc, 80)})"
        ) from None
    return vm, params


def run_library(args: argparse.Namespace) -> int:
    """``tvm-cim run``: the outputs, the simulated latency and the per-region stats."""
    from tvm_cim.compiler.library import checked_library

    if args.output_dir:
        check_output_folder(args.output_dir, "outputs")
    if args.stats:
        check_output_file(args.stats, "statistics")
    library = Path(args.library)
    data, record = checked_library(library, use_digest=not args.no_digest)
    given = input_paths(args.inputs)
    specs = {spec["name"]: spec for spec in record["inputs"]} if record is not None else None
    if specs is not None:
        _check_names(list(specs), given)
    arrays = {name: load_npy(name, path) for name, path in given.items()}
    arrays = {
        name: _checked_input(name, given[name], array, specs and specs.get(name))
        for name, array in arrays.items()
    }

    import tvm

    from tvm_cim.compiler import runtime

    vm, params = _load_vm(library, data)
    _check_names(params, given)
    before = runtime.last_stats()
    try:
        result = vm["main"](*[tvm.runtime.tensor(arrays[name]) for name in params])
    except (ValueError, RuntimeError, TypeError) as exc:
        if "loc=param" in str(exc):
            raise CimError(f"inputs do not match the model: {tvm_message(exc)}") from None
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
            write_npy(file, value, "output")
            written[i] = str(file)
    if args.stats:
        write_json(
            args.stats,
            {
                "total_latency_us": latency,
                "regions": {name: s.to_dict() for name, s in stats.items()},
            },
            "statistics",
        )
    for i, (value, file) in enumerate(zip(outputs, written)):
        where = f" -> {file}" if file else ""
        print(f"output_{i}: {format_shape(value.shape)} {value.dtype}{where}")
    print(f"simulated latency: {latency:.3f} us ({len(stats)} crossbar region(s))")
    return EXIT_OK
