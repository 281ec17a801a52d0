"""Compile reports: what each offloaded operator costs and what stayed on the CPU.

Per operator: name, kind, shapes, bits, the crossbar rows and columns its weights take,
tiles (crossbar writes), MVM executions per input item, its latency in the sequential
model (the sum of its instructions' latencies: with ``crossbars=1`` and free digital steps
this is CIM-AQ's formula) and its scheduled latency (how far its instructions move the
end of the schedule: the operators' scheduled latencies add up to the total) and, when the
arch gives energy figures, its energy. The total is the scheduled latency of the region
programs, which overlaps tiles on several crossbars. Every figure is the simulator's own static
estimate (``tvm_cim.sim.timing``), so the report and a simulated run agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property

from tvm_cim.core import files
from tvm_cim.core.arch import CimArch
from tvm_cim.sim.program import Program
from tvm_cim.sim.timing import SimStats, estimate, estimate_spans


@dataclass
class OperatorReport:
    name: str
    kind: str
    region: str
    in_shape: list
    out_shape: list
    weight_shape: list
    w_bits: int
    a_bits: int
    crossbar_rows: int
    crossbar_cols: int
    tiles: int
    writes: int
    mvm_executions: int
    latency_us: float  # sequential: the sum of its instructions' latencies
    scheduled_us: float  # its share of the schedule's makespan
    energy_nj: float | None  # None when the arch gives no energy figures
    share: float = 0.0
    heads: int = 1  # a matmul of two activations: independent matmuls per item

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CompileReport:
    arch: CimArch
    operators: list[OperatorReport]
    cpu: list[dict]
    programs: list[Program] = field(default_factory=list)

    @cached_property
    def _one_item(self) -> list[SimStats]:
        """The static estimate of each region program for one input item."""
        return [estimate(p, batch=1) for p in self.programs]

    @property
    def total_latency_us(self) -> float:
        """Scheduled latency of all region programs for one input item."""
        return sum(s.latency_us for s in self._one_item)

    @property
    def sequential_latency_us(self) -> float:
        return sum(op.latency_us for op in self.operators)

    @property
    def total_energy_nj(self) -> float | None:
        """Energy of all region programs for one input item; None without energy figures."""
        energies = [s.energy_nj for s in self._one_item]
        return None if None in energies else math.fsum(energies)

    def batch_figures(self, batch: int) -> dict:
        """What running ``batch`` items through the region programs costs.

        The tiles are written once per run and every instruction treats the whole batch,
        so writes (and their time and energy) are shared by the batch's items; batches
        run one after another, layers within a batch too (no pipelining).

        Returns
        -------
        dict
            ``batch``, ``latency_us`` (the batch's scheduled latency), ``throughput_per_s``
            (items per second), ``writes_per_item`` and ``energy_per_item_nj`` (None
            without energy figures).
        """
        stats = [estimate(p, batch=batch) for p in self.programs]
        latency_us = sum(s.latency_us for s in stats)
        energies = [s.energy_nj for s in stats]
        return {
            "batch": batch,
            "latency_us": latency_us,
            "throughput_per_s": batch / latency_us * 1e6 if latency_us else math.inf,
            "writes_per_item": sum(s.crossbar_writes for s in stats) / batch,
            "energy_per_item_nj": None if None in energies else math.fsum(energies) / batch,
        }

    def to_dict(self) -> dict:
        return {
            "arch": self.arch.name,
            "total_latency_us": self.total_latency_us,
            "sequential_latency_us": self.sequential_latency_us,
            "total_energy_nj": self.total_energy_nj,
            "layers": [op.to_dict() for op in self.operators],
            "cpu_operators": self.cpu,
        }

    def to_json(self, path) -> None:
        files.write_text(path, json.dumps(self.to_dict(), indent=2))

    def table(self) -> str:
        """The report as a fixed-width text table."""
        head = f"{'operator':<24} {'kind':<7} {'bits':<6} {'rows':>6} {'cols':>6} {'tiles':>5} "
        head += f"{'MVMs':>9} {'latency us':>12} {'share':>6}"
        lines = [head, "-" * len(head)]
        for op in self.operators:
            lines.append(
                f"{op.name[:24]:<24} {op.kind:<7} W{op.w_bits}A{op.a_bits:<3} "
                f"{op.crossbar_rows:>6} {op.crossbar_cols:>6} {op.tiles:>5} "
                f"{op.mvm_executions:>9} {op.latency_us:>12.1f} {100 * op.share:>5.1f}%"
            )
        total = (
            f"total latency {self.total_latency_us:.1f} us "
            f"(sequential sum {self.sequential_latency_us:.1f} us)"
        )
        if self.total_energy_nj is not None:
            total += f", energy {self.total_energy_nj / 1e3:.3f} uJ"
        lines.append(total)
        for cpu in self.cpu:
            lines.append(f"on CPU: {cpu['name']} ({cpu['kind']}): {cpu['reason']}")
        return "\n".join(lines)


def operator_reports(programs: list[Program], arch: CimArch) -> list[OperatorReport]:
    """One report per offloaded operator, in offload order.

    Counts and latency are the simulator's static estimate of each operator's
    instructions (``estimate_spans``) for one input item.
    """
    reports = []
    for program in programs:
        summaries = program.attrs["operators"]
        spans = [[(start, end) for start, end in s["instructions"]] for s in summaries]
        for summary, stats in zip(summaries, estimate_spans(program, spans, batch=1, arch=arch)):
            reports.append(
                OperatorReport(
                    name=summary["name"],
                    kind=summary["kind"],
                    region=program.attrs["region"],
                    in_shape=summary["in_shape"],
                    out_shape=summary["out_shape"],
                    weight_shape=summary["weight_shape"],
                    w_bits=summary["w_bits"],
                    a_bits=summary["a_bits"],
                    crossbar_rows=summary["crossbar_rows"],
                    crossbar_cols=summary["crossbar_cols"],
                    tiles=stats.crossbar_writes,
                    writes=stats.crossbar_writes,
                    mvm_executions=stats.mvm_executions,
                    latency_us=stats.sequential_ps / 1e6,
                    scheduled_us=stats.latency_ps / 1e6,
                    energy_nj=stats.energy_nj,
                    heads=summary.get("heads", 1),
                )
            )
    total = sum(r.latency_us for r in reports)
    for r in reports:
        r.share = r.latency_us / total if total else 0.0
    return reports


def cpu_operators(mod, refused: dict[str, str] | None = None) -> list[dict]:
    """Dense and convolution operators left on the CPU, with the reason (``refused``: the
    region reader's reason for the operators it sent back)."""
    from tvm_cim.relay_passes.explain import unsupported_reason
    from tvm_cim.relay_passes.partition import operator_name
    from tvm_cim.relay_passes.patterns import ANCHORS, computed_from_constants

    out = []
    for block in mod["main"].body.blocks:
        bindings = {b.var: b.value for b in block.bindings}
        for binding in block.bindings:
            call = binding.value
            kind = ANCHORS.get(getattr(getattr(call, "op", None), "name", None))
            if kind is None:
                continue
            if kind == "dense" and not computed_from_constants(call.args[1], bindings):
                kind = "matmul"  # of two activations
            name = operator_name(call) or binding.var.name
            reason = (refused or {}).get(name) or unsupported_reason(call, block)
            out.append({"name": name, "kind": kind, "reason": reason})
    return out
