"""``build`` and ``partition_for_cim``: the ``cim`` target's Python entry points.

The flow: bind parameters, name and partition the dense and convolution operators, read
each partitioned function into integer operators (calibrating float ones), lower each
function to one crossbar program, and replace its call by ``tvm_cim.run`` with the program
as a constant. The rest of the model is compiled by TVM's default pipeline for llvm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import tvm
from tvm import relax

from tvm_cim.codegen.region import lower_region
from tvm_cim.compiler.report import CompileReport, cpu_operators, operator_reports
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Precision
from tvm_cim.relay_passes.calibrate import calibrate
from tvm_cim.relay_passes.extract import read_region
from tvm_cim.relay_passes.partition import (
    call_packed,
    offloaded_functions,
    partition,
    rewrite_offloaded_calls,
)
from tvm_cim.relay_passes.quantize import quantize_region

RUNTIME_FUNCTION = "tvm_cim.run"


def _arch(arch) -> CimArch:
    return arch if isinstance(arch, CimArch) else CimArch.load(arch) if arch else CimArch()


def _check_static(mod: tvm.IRModule) -> None:
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or not all(hasattr(d, "value") for d in shape):
            raise CimError(
                f"input {param.name!r} has a dynamic shape {param.ty}; give static input shapes"
            )


def partition_for_cim(
    mod: tvm.IRModule,
    *,
    arch: CimArch | str | None = None,
    precision=None,
    names: Sequence[str] | None = None,
) -> tvm.IRModule:
    """Partition ``mod`` for the ``cim`` target.

    Parameters
    ----------
    mod
        A Relax module with a ``main`` function.
    arch
        Target architecture (checked here, used by the codegen).
    precision
        A precision config (see ``tvm_cim.core.precision``); its operator names are checked.
    names
        Operator names in binding order (the ONNX frontend passes node names).

    Returns
    -------
    tvm.IRModule
        ``main`` calling ``Codegen="cim"`` functions, one per merged region, each with a
        symbol unique to this build.
    """
    from tvm_cim.compiler.registration import register

    register()
    _arch(arch)
    _check_static(mod)
    mod = partition(mod, names)
    regions = [read_region(gv.name_hint, fn) for gv, fn in offloaded_functions(mod)]
    Precision.load(precision).resolve([op.name for r in regions for op in r.ops])
    return mod


def lower_partitioned(
    mod: tvm.IRModule,
    *,
    arch: CimArch | str | None = None,
    precision=None,
    calibration: Iterable | None = None,
) -> tuple[tvm.IRModule, CompileReport]:
    """Lower every ``cim`` function of a partitioned module to a ``tvm_cim.run`` call."""
    arch = _arch(arch)
    graph_regions = {gv: read_region(gv.name_hint, fn) for gv, fn in offloaded_functions(mod)}
    names = [op.name for r in graph_regions.values() for op in r.ops]
    bits = Precision.load(precision).resolve(names)
    needs_ranges = any(op.input_codes is None for r in graph_regions.values() for op in r.ops)
    ranges = calibrate(mod, calibration) if needs_ranges and calibration is not None else {}
    programs: dict = {}
    for gv, region in graph_regions.items():
        programs[gv] = lower_region(quantize_region(region, bits, ranges), arch)

    def rewrite(gv, fn, call):
        data = np.frombuffer(programs[gv].to_bytes(), dtype=np.uint8)
        return call_packed(RUNTIME_FUNCTION, [relax.const(data), *call.args], call)

    lowered = rewrite_offloaded_calls(mod, rewrite)
    report = CompileReport(
        arch=arch,
        operators=operator_reports(list(programs.values()), arch),
        cpu=cpu_operators(lowered),
        programs=list(programs.values()),
    )
    return lowered, report


def cost_report(
    mod: tvm.IRModule,
    *,
    params: dict | None = None,
    arch: CimArch | str | None = None,
    precision=None,
    names: Sequence[str] | None = None,
) -> CompileReport:
    """The latency report from the static estimate, without weight images or a TVM build.

    The instruction streams are those a full compile emits (placeholder weights take no
    memory), so the latencies equal the full compile's and the simulator's.
    """
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    partitioned = partition_for_cim(mod, arch=arch, precision=precision, names=names)
    arch = _arch(arch)
    graph_regions = [read_region(gv.name_hint, fn) for gv, fn in offloaded_functions(partitioned)]
    bits = Precision.load(precision).resolve([op.name for r in graph_regions for op in r.ops])
    programs = [lower_region(quantize_region(r, bits, None), arch) for r in graph_regions]
    return CompileReport(
        arch=arch,
        operators=operator_reports(programs, arch),
        cpu=cpu_operators(partitioned),
        programs=programs,
    )


def compile_for_cim(
    mod: tvm.IRModule,
    *,
    params: dict | None = None,
    arch: CimArch | str | None = None,
    precision=None,
    calibration: Iterable | None = None,
    names: Sequence[str] | None = None,
) -> tuple[tvm.runtime.Executable, CompileReport]:
    """``build``, also returning the compile report."""
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    partitioned = partition_for_cim(mod, arch=arch, precision=precision, names=names)
    lowered, report = lower_partitioned(
        partitioned, arch=arch, precision=precision, calibration=calibration
    )
    executable = tvm.compile(lowered, target="llvm")
    return executable, report


def build(
    mod: tvm.IRModule,
    target: str = "cim",
    *,
    params: dict | None = None,
    arch: CimArch | str | None = None,
    precision=None,
    calibration: Iterable | None = None,
    names: Sequence[str] | None = None,
):
    """Compile ``mod`` for the ``cim`` target; returns a TVM executable.

    Dense and convolution operators run as crossbar programs on the simulator (through
    ``tvm_cim.run``), everything else on llvm. Run it with
    ``relax.VirtualMachine(ex, tvm.cpu())``.

    Parameters
    ----------
    mod
        Relax module (from ``tvm.relax.frontend.onnx.from_onnx``,
        ``from_exported_program`` or TVMScript).
    target
        ``"cim"`` (the only target this function builds).
    params
        Weights to bind to ``main``'s parameters by name.
    arch
        ``CimArch``, a preset name or an arch file; default ``CimArch()``.
    precision
        Per-operator bit widths (see ``tvm_cim.core.precision``); default W8A8 for float
        operators and the stated codes for quantized ones.
    calibration
        Sample inputs of ``main``, required when the model has float operators.
    names
        Operator names in binding order (``tvm_cim.compiler.frontend`` passes ONNX node names).
    """
    if target != "cim":
        raise CimError(f"tvm_cim.build builds target 'cim', got {target!r}")
    return compile_for_cim(
        mod, params=params, arch=arch, precision=precision, calibration=calibration, names=names
    )[0]
