"""``build`` and ``partition_for_cim``: the ``cim`` target's Python entry points.

The flow: bind parameters, name and partition the dense and convolution operators, read
each partitioned function into operators and resolve the precision (``plan_for_cim``,
once), calibrate float operators, lower each function to one crossbar program, and
replace its call by ``tvm_cim.run`` with the program as a constant. The rest of the model
is compiled by TVM's default pipeline for llvm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import tvm

from tvm_cim.compiler.plan import plan_for_cim
from tvm_cim.compiler.report import CompileReport
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError


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
        Target architecture, recorded on each partitioned function for the codegen.
    precision
        A precision config (see ``tvm_cim.core.precision``); its operator names are checked
        and the resolved widths recorded on each partitioned function, so that
        ``relax.transform.RunCodegen`` lowers at that precision.
    names
        Operator names in binding order (the ONNX frontend passes node names).

    Returns
    -------
    tvm.IRModule
        ``main`` calling ``Codegen="cim"`` functions, one per merged region, each with a
        symbol unique to this build.
    """
    return plan_for_cim(mod, arch=arch, precision=precision, names=names).module


def cost_report(mod: tvm.IRModule, **options) -> CompileReport:
    """The latency report from the static estimate, without weight images or a TVM build.

    The instruction streams are those a full compile emits (placeholder weights take no
    memory), so the latencies equal the full compile's and the simulator's. ``options``
    are ``plan_for_cim``'s: ``params``, ``arch``, ``precision``, ``names``.
    """
    return plan_for_cim(mod, **options).cost_report()


def compile_for_cim(
    mod: tvm.IRModule, *, calibration: Iterable | None = None, **options
) -> tuple[tvm.runtime.Executable, CompileReport]:
    """``build``, also returning the compile report."""
    lowered, report = plan_for_cim(mod, **options).lower(calibration)
    return tvm.compile(lowered, target="llvm"), report


def build(
    mod: tvm.IRModule, target: str = "cim", *, calibration: Iterable | None = None, **options
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
    calibration
        Sample inputs of ``main``, required when the model has float operators.
    **options
        How to partition and quantize, as for ``tvm_cim.compiler.plan.plan_for_cim``:
        ``params`` (weights to bind to ``main``'s parameters by name), ``arch``
        (``CimArch``, preset name or arch file; default ``CimArch()``), ``precision``
        (per-operator bit widths; default W8A8 for float operators and the stated codes
        for quantized ones) and ``names`` (operator names in binding order; the ONNX
        frontend gives node names).
    """
    if target != "cim":
        raise CimError(f"tvm_cim.build builds target 'cim', got {target!r}")
    return compile_for_cim(mod, calibration=calibration, **options)[0]
