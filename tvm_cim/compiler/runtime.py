"""The runtime function ``tvm_cim.run``: executes one offloaded region on the simulator.

A compiled model calls it as ``tvm_cim.run(program, *inputs, *outputs)`` (destination
passing), with the encoded crossbar program as a constant ``uint8`` tensor, so an exported
library carries everything it needs. The host side of the region happens here: real
inputs are quantized, NCHW tensors become rows of pixels and back (and the heads of an
attention matmul's operands columns side by side), and accumulators become
real values with the affine map the compiler recorded in ``Program.attrs``.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np

from tvm_cim.core.errors import InputError
from tvm_cim.core.quant import quantize
from tvm_cim.sim.program import Program
from tvm_cim.sim.simulator import PreparedProgram, Simulator
from tvm_cim.sim.timing import SimStats

#: The name of the runtime function a compiled model calls for each offloaded region.
RUNTIME_FUNCTION = "tvm_cim.run"

_cache: dict[bytes, tuple[Program, PreparedProgram]] = {}
#: The same, by the ``bytes`` object: a model passes one object per region on every
#: call, and hashing hundreds of megabytes of weights per call costs more than the run.
_by_object: dict[int, tuple[bytes, tuple[Program, PreparedProgram]]] = {}
#: Program tensors by their data, with the bytes copied from them (the tensor is kept,
#: so its memory cannot hold another tensor while it is here).
_encodings: dict[tuple[int, int], tuple[object, bytes]] = {}
_lock = threading.Lock()
_last_stats: dict[str, SimStats] = {}


def prepared_program(data: bytes) -> tuple[Program, PreparedProgram]:
    """Decode and verify a program once per distinct encoding."""
    with _lock:
        known = _by_object.get(id(data))
    if known is not None and known[0] is data:
        return known[1]
    # Not the file's own CRC: a CRC over data that ends in its CRC is a constant.
    key = hashlib.blake2b(data, digest_size=16).digest()
    with _lock:
        entry = _cache.get(key)
    if entry is None:
        program = Program.from_bytes(data)
        entry = (program, Simulator().prepare(program))
        with _lock:
            _cache[key] = entry
    if type(data) is bytes:  # immutable: the same object holds the same program
        with _lock:
            _by_object[id(data)] = (data, entry)
    return entry


def program_encoding(program) -> bytes:
    """The bytes of a ``uint8`` program tensor, copied once per tensor: a compiled
    model passes its constant on every call, which is never written."""
    key = (program.data_ptr(), program.numel())
    with _lock:
        known = _encodings.get(key)
    if known is not None and known[0].same_as(program):
        return known[1]
    data = program.numpy().tobytes()
    with _lock:
        _encodings[key] = (program, data)
    return data


def last_stats() -> dict[str, SimStats]:
    """Stats of the latest run of each region, by region name."""
    with _lock:
        return dict(_last_stats)


def program_inputs(program: Program, params: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The program's integer inputs made from the region's graph arguments."""
    inputs = {}
    for desc, spec in zip(program.inputs, program.attrs["inputs"]):
        value = np.asarray(params[spec["param"]])
        if spec["layout"] == "nchw":
            value = value.transpose(0, 2, 3, 1)
        elif spec["layout"] == "heads":  # [..., R, C]: R rows of every head's C columns
            rows, cols = value.shape[-2:]
            value = value.reshape(-1, spec["heads"], rows, cols).transpose(0, 2, 1, 3)
        value = value.reshape(-1, desc.width)
        q = spec["quant"]
        if q is not None:
            if not np.isfinite(value).all():  # quantize would turn NaN into INT64_MIN
                raise InputError(
                    f"{program.name}: input {desc.name!r} holds NaN or infinite values"
                )
            value = quantize(value, q["scale"], q["zero_point"], q["bits"], q["signed"])
        inputs[desc.name] = value.astype(np.int64)
    return inputs


def graph_outputs(program: Program, outputs: dict[str, np.ndarray], dtypes: list[str]):
    """The region's graph results made from the program's integer outputs."""
    results = []
    for desc, spec, dtype in zip(program.outputs, program.attrs["outputs"], dtypes):
        value = outputs[desc.name]
        shape = spec["shape"]
        affine = spec["affine"]
        if affine is not None:
            value = value.astype(np.int64) + np.asarray(affine["int_bias"], np.int64)
            if affine["scale"] is not None:
                value = value * np.asarray(affine["scale"], np.float64)
                if affine["real_bias"] is not None:
                    value = value + np.asarray(affine["real_bias"], np.float64)
            if affine["relu"]:
                value = np.maximum(value, 0)
        if spec["layout"] == "nchw":
            n, c, h, w = shape
            value = value.reshape(n, h, w, c).transpose(0, 3, 1, 2)
        elif spec["layout"] == "heads":
            rows, cols = shape[-2:]
            value = value.reshape(-1, rows, spec["heads"], cols).transpose(0, 2, 1, 3)
        results.append(np.ascontiguousarray(value.reshape(shape), dtype=dtype))
    return results


def run_region(data: bytes, params: list[np.ndarray], dtypes: list[str]) -> list[np.ndarray]:
    """Run one encoded region program on graph arrays; returns the graph results."""
    program, prepared = prepared_program(data)
    result = Simulator().run(prepared, program_inputs(program, params))
    with _lock:
        _last_stats[program.name] = result.stats
    return graph_outputs(program, result.outputs, dtypes)


def run(program, *tensors) -> None:
    """``tvm_cim.run(program, *inputs, *outputs)``, as registered with TVM."""
    run_encoded(program_encoding(program), tensors)


def run_encoded(data: bytes, tensors) -> None:
    """Run the encoded region program ``data`` on TVM tensors ``(*inputs, *outputs)``,
    writing the outputs in place."""
    program, _ = prepared_program(data)
    n_params = 1 + max((s["param"] for s in program.attrs["inputs"]), default=-1)
    n_out = len(program.outputs)
    if len(tensors) < n_out:
        raise ValueError("tvm_cim.run: fewer tensors than the program has outputs")
    params = [t.numpy() for t in tensors[: len(tensors) - n_out]]
    if len(params) < n_params:
        raise ValueError("tvm_cim.run: fewer inputs than the program reads")
    outs = tensors[len(tensors) - n_out :]
    values = run_region(data, params, [str(o.dtype) for o in outs])
    for dst, value in zip(outs, values):
        dst.copyfrom(value)
