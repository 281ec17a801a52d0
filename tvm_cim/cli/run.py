"""``tvm-cim run``: run a library from ``tvm-cim compile`` in the Relax VM on ``.npy``
inputs; the VM calls the simulator for each crossbar region."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tvm_cim.cli.common import (
    EXIT_OK,
    add_inputs_argument,
    format_shape,
    input_paths,
    load_npy,
    one_line,
    write_json,
    write_npy,
)
from tvm_cim.core.errors import CimError


def run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim run``."""
    p.add_argument("library", metavar="OUT.so", help="library written by 'tvm-cim compile'")
    add_inputs_argument(p, "an input of the model by its ONNX name (repeat for each input)")
    p.add_argument("--output-dir", metavar="DIR", help="write each output as DIR/output_<i>.npy")
    p.add_argument(
        "--stats", metavar="FILE.json", help="write the simulated latency and per-region stats"
    )


def _flatten(value) -> list:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def run_library(args: argparse.Namespace) -> int:
    """``tvm-cim run``: the outputs, the simulated latency and the per-region stats."""
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
            f"cannot load {library} as a library from 'tvm-cim compile': {one_line(exc)}"
        ) from None

    given = input_paths(args.inputs)
    for name in given:
        if name not in params:
            raise CimError(f"{name!r} is not an input of the model; inputs: {', '.join(params)}")
    missing = [p for p in params if p not in given]
    if missing:
        raise CimError(
            f"missing input {missing[0]!r}: give every input ({', '.join(params)}) "
            "as --input NAME=FILE.npy"
        )
    arrays = [load_npy(name, given[name]) for name in params]

    before = runtime.last_stats()
    try:
        result = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    except (ValueError, RuntimeError, TypeError) as exc:
        if "loc=param" in str(exc):
            raise CimError(f"inputs do not match the model: {one_line(exc)}") from None
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
    for i, (value, file) in enumerate(zip(outputs, written)):
        where = f" -> {file}" if file else ""
        print(f"output_{i}: {format_shape(value.shape)} {value.dtype}{where}")
    print(f"simulated latency: {latency:.3f} us ({len(stats)} crossbar region(s))")
    if args.stats:
        write_json(
            args.stats,
            {
                "total_latency_us": latency,
                "regions": {name: s.to_dict() for name, s in stats.items()},
            },
            "statistics",
        )
    return EXIT_OK
