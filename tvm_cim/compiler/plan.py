"""The compile plan: a model partitioned for ``cim`` once, lowered as often as asked.

``plan_for_cim`` binds the parameters, partitions the model, reads each ``cim`` function
into operators once and resolves the precision once. The plan then calibrates, lowers its
regions to crossbar programs (fully, or for cost only with placeholder weights) at its own
precision or another one, and rewrites the module so that each region runs as one
``tvm_cim.run`` call carrying its program. ``build``, ``compile_for_cim``, ``cost_report``,
the ``cim`` Relax pipeline and the search's latency table all go through it, and so does
the ``relax.ext.cim`` codegen: ``plan_for_cim`` records the resolved widths and the arch on
every partitioned function, so ``RunCodegen`` lowers at the precision the partition used.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import tvm
from tvm import relax

from tvm_cim.codegen.layers import CimOp, Region
from tvm_cim.codegen.quantize import Ranges, quantize_region
from tvm_cim.codegen.region import lower_region
from tvm_cim.compiler.report import CompileReport, cpu_operators, operator_reports
from tvm_cim.compiler.runtime import RUNTIME_FUNCTION
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError, InternalCompilerError, UnsupportedOperator
from tvm_cim.core.precision import Bits, Precision
from tvm_cim.relay_passes.calibrate import calibrate
from tvm_cim.relay_passes.extract import read_region
from tvm_cim.relay_passes.partition import (
    anchor_names,
    call_packed,
    offloaded_functions,
    partition,
    rewrite_offloaded_calls,
)
from tvm_cim.sim.program import Program

#: Function attribute holding the resolved widths of a region's operators, as JSON
#: ``{name: [w_bits, a_bits] or null}`` (null: the graph's own codes).
BITS_ATTR = "cim.bits"
#: Function attribute holding the arch the region is lowered for, as JSON.
ARCH_ATTR = "cim.arch"
#: Function attribute holding the graph's batch (``CimOp.images``).
IMAGES_ATTR = "cim.images"

Bitwidths = dict[str, Bits | None]


def _check_static(mod: tvm.IRModule) -> None:
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or not all(hasattr(d, "value") for d in shape):
            raise CimError(
                f"input {param.name!r} has a dynamic shape {param.ty}; give static input shapes"
            )


def graph_images(mod: tvm.IRModule) -> int | None:
    """The graph's batch: the leading dimension of ``main``'s first tensor input."""
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is not None and len(shape) > 1:
            return int(shape[0])
    return None


def lower(
    region: Region, bits: Bitwidths, ranges: Ranges | None, arch: CimArch, copies=None
) -> Program:
    """Quantize one region as read and lower it to its crossbar program.

    ``ranges`` None lowers for cost only (placeholder weights, same instruction stream);
    ``copies`` fixes convolutions' weight copies (``codegen.region.lower_region``).

    Raises
    ------
    CimError
        The region's operators ask for what the crossbars cannot do (widths, ranges).
    InternalCompilerError
        Anything else failed: a bug, reported with the region's operator names.
    """
    try:
        return lower_region(quantize_region(region, bits, ranges), arch, copies)
    except CimError:
        raise
    except Exception as exc:
        raise InternalCompilerError(exc, "lowering", [op.name for op in region.ops]) from exc


@dataclass
class CimPlan:
    """A model partitioned for ``cim``, with its regions read and its precision resolved.

    Attributes
    ----------
    module
        The partitioned module: ``main`` calling ``Codegen="cim"`` functions, each carrying
        its operators' widths and the arch as attributes.
    arch
        The architecture every region is lowered for.
    regions
        ``(GlobalVar, Region)`` per ``cim`` function in the order ``main`` calls them, its
        operators as the graph states them.
    bits
        Widths per operator name, in offload order; None where the graph's own codes (or
        W8A8 for a float operator) apply.
    """

    module: tvm.IRModule
    arch: CimArch
    regions: list[tuple[tvm.ir.GlobalVar, Region]]
    bits: Bitwidths

    @property
    def operators(self) -> list[CimOp]:
        """Every offloaded operator, in offload order."""
        return [op for _, region in self.regions for op in region.ops]

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.operators]

    #: Operators the region reader refused, with its reason; they run on the CPU.
    refused: dict[str, str] = field(default_factory=dict)

    @cached_property
    def cpu(self) -> list[dict]:
        """Dense and convolution operators left on the CPU, with the reason."""
        return cpu_operators(self.module, self.refused)

    def resolve(self, precision) -> Bitwidths:
        """Widths per operator of another precision config (see ``tvm_cim.core.precision``;
        None is the default: W8A8 for float operators, the stated codes for quantized ones).
        """
        return Precision.load(precision).resolve(self.names)

    def calibrate(self, samples: Iterable) -> Ranges:
        """Input ranges of the float operators over ``samples`` (inputs of ``main``)."""
        return calibrate(self.module, dict(self.regions), samples)

    def programs(
        self, ranges: Ranges | None = None, bits: Bitwidths | None = None, copies=None
    ) -> list:
        """One crossbar program per region.

        Parameters
        ----------
        ranges
            Calibration ranges of the float operators; None lowers for cost only.
        bits
            Widths per operator (``resolve``); None for the plan's own.
        copies
            Weight copies by convolution name; None (or a name it lacks) lets the
            compiler choose (``codegen.replicate``).
        """
        bits = self.bits if bits is None else bits
        return [lower(region, bits, ranges, self.arch, copies) for _, region in self.regions]

    def report(self, programs: list[Program]) -> CompileReport:
        """The compile report of this plan's programs."""
        return CompileReport(
            arch=self.arch,
            operators=operator_reports(programs, self.arch),
            cpu=self.cpu,
            programs=programs,
        )

    def cost_report(self, bits: Bitwidths | None = None) -> CompileReport:
        """The latency report from cost-only programs, at ``bits`` (``resolve``; None: the
        plan's own widths)."""
        return self.report(self.programs(None, bits))

    def lower(self, calibration: Iterable | None = None) -> tuple[tvm.IRModule, CompileReport]:
        """The module with every region replaced by its ``tvm_cim.run`` call, and its report.

        ``calibration`` (inputs of ``main``) sets the activation scales of float
        operators; without it a float operator raises a ``CimError`` naming it.
        """
        needs_ranges = any(op.input is None for op in self.operators)
        ranges = self.calibrate(calibration) if needs_ranges and calibration is not None else {}
        programs = self.programs(ranges)
        return self.rewrite(programs), self.report(programs)

    def rewrite(self, programs: list[Program]) -> tvm.IRModule:
        """``module`` with each region's call replaced by ``tvm_cim.run`` on its program."""
        data = {
            gv: np.frombuffer(program.to_bytes(), dtype=np.uint8)
            for (gv, _), program in zip(self.regions, programs, strict=True)
        }

        def replace(gv, fn, call):
            return call_packed(RUNTIME_FUNCTION, [relax.const(data[gv]), *call.args], call)

        return rewrite_offloaded_calls(self.module, replace)


def plan_for_cim(
    mod: tvm.IRModule,
    *,
    params: dict | None = None,
    arch: CimArch | str | None = None,
    precision=None,
    names: Sequence[str] | None = None,
    internal_errors: str = "raise",
) -> CimPlan:
    """Partition ``mod`` for ``cim``, read its regions and resolve ``precision``, once.

    Parameters
    ----------
    mod
        A Relax module with a ``main`` function of static input shapes.
    params
        Weights to bind to ``main``'s parameters by name.
    arch
        ``CimArch``, a preset name or an arch file; default ``CimArch()``.
    precision
        Per-operator bit widths (see ``tvm_cim.core.precision``); default W8A8 for float
        operators and the stated codes for quantized ones.
    names
        Operator names in binding order (``tvm_cim.compiler.frontend`` passes ONNX node names).
    internal_errors
        ``"raise"``: a failure of the region reader that is a bug raises an
        ``InternalCompilerError``; ``"cpu"``: those operators stay on the CPU with the
        error as their reason (``tvm-cim inspect`` lists every operator whatever happens).
        A region the reader refuses with a ``CimError`` goes back to the CPU either way.

    Raises
    ------
    CimError
        A dynamic input shape, or a precision naming no offloaded operator or giving the
        wrong number of entries.
    InternalCompilerError
        Partitioning or (with ``internal_errors="raise"``) reading a region failed.
    """
    if internal_errors not in ("raise", "cpu"):
        raise ValueError(f"internal_errors must be 'raise' or 'cpu', got {internal_errors!r}")
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    arch = CimArch.load(arch)
    _check_static(mod)
    images = graph_images(mod)
    partitioned, regions, refused = _partition_and_read(mod, names, internal_errors, images)
    bits = Precision.load(precision).resolve([op.name for _, r in regions for op in r.ops])
    arch_json = json.dumps(arch.to_dict())
    for gv, region in regions:
        region_bits = {op.name: _bits_json(bits[op.name]) for op in region.ops}
        fn = partitioned[gv].with_attr(BITS_ATTR, json.dumps(region_bits))
        fn = fn.with_attr(ARCH_ATTR, arch_json)
        partitioned[gv] = fn if images is None else fn.with_attr(IMAGES_ATTR, images)
    return CimPlan(partitioned, arch, regions, bits, refused)


def _partition_and_read(mod, names, internal_errors: str, images: int | None = None):
    """``(partitioned module, regions, refused)``: partition, read every region, and
    partition again without the operators of a region the reader refuses (a form the
    table matched but the codegen cannot take), until every region reads."""
    refused: dict[str, str] = {}
    while True:
        try:
            partitioned = partition(mod, names, refused)
        except Exception as exc:
            raise InternalCompilerError(exc, "partitioning") from exc
        regions, failed = [], {}
        for gv, fn in offloaded_functions(partitioned):
            try:
                regions.append((gv, read_region(gv.name_hint, fn, images)))
                continue
            except UnsupportedOperator as exc:
                error: Exception = exc
            except InternalCompilerError as exc:
                if internal_errors == "raise":
                    raise
                error = exc
            except Exception as exc:  # outside any one operator: a bug in the region
                error = InternalCompilerError(exc, "reading", anchor_names(fn))
                if internal_errors == "raise":
                    raise error from exc
            culprits = getattr(error, "operators", None) or anchor_names(fn)
            if not culprits or set(culprits) <= set(refused):
                raise error  # nothing left to send back to the CPU
            failed.update(dict.fromkeys(culprits, str(error)))
        if not failed:
            return partitioned, regions, refused
        refused.update(failed)


def _bits_json(bits: Bits | None) -> list[int] | None:
    return None if bits is None else [bits.w_bits, bits.a_bits]


def lower_function(fn: relax.Function, arch: CimArch | None = None) -> Program:
    """The crossbar program of one partitioned function, as ``relax.ext.cim`` makes it.

    The widths and (unless ``arch`` is given) the arch are those ``plan_for_cim`` recorded
    on the function. There is no calibration here: a float operator raises a ``CimError``
    naming it.
    """
    attrs = fn.attrs
    bits: Bitwidths = {}
    if BITS_ATTR in attrs:
        recorded = json.loads(str(attrs[BITS_ATTR]))
        bits = {name: None if b is None else Bits(*b) for name, b in recorded.items()}
    if arch is None:
        arch = CimArch.from_dict(json.loads(str(attrs[ARCH_ATTR]))) if ARCH_ATTR in attrs else None
    images = int(attrs[IMAGES_ATTR]) if IMAGES_ATTR in attrs else None
    region = read_region(str(attrs["global_symbol"]), fn, images)
    return lower(region, bits, {}, CimArch.load(arch))
