"""Compile reports: what each offloaded operator costs and what stayed on the CPU.

Per operator: name, kind, shapes, bits, the crossbar rows and columns its weights take,
tiles (crossbar writes), MVM executions per input item and its latency in the sequential
model (the sum of its instructions' latencies: with ``crossbars=1`` and free digital steps
this is CIM-AQ's formula). The total is the scheduled latency of the region programs,
which overlaps tiles on several crossbars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.sim import isa
from tvm_cim.sim.program import Program
from tvm_cim.sim.timing import estimate


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
    latency_us: float
    share: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class CompileReport:
    arch: CimArch
    operators: list[OperatorReport]
    cpu: list[dict]
    programs: list[Program] = field(default_factory=list)

    @property
    def total_latency_us(self) -> float:
        """Scheduled latency of all region programs for one input item."""
        return sum(estimate(p, batch=1).latency_us for p in self.programs)

    @property
    def sequential_latency_us(self) -> float:
        return sum(op.latency_us for op in self.operators)

    def to_dict(self) -> dict:
        return {
            "arch": self.arch.name,
            "total_latency_us": self.total_latency_us,
            "sequential_latency_us": self.sequential_latency_us,
            "layers": [op.to_dict() for op in self.operators],
            "cpu_operators": self.cpu,
        }

    def to_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

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
        lines.append(
            f"total latency {self.total_latency_us:.1f} us "
            f"(sequential sum {self.sequential_latency_us:.1f} us)"
        )
        for cpu in self.cpu:
            lines.append(f"on CPU: {cpu['name']} ({cpu['kind']}): {cpu['reason']}")
        return "\n".join(lines)


def _vectors(program: Program, row: np.ndarray) -> int:
    """Vectors per item an instruction processes (its buffer's or tensor's rows)."""
    spec = isa.BY_OPCODE[int(row[0])]
    if spec.rows_from is None:
        return 1
    return program.buffer_rows[int(row[spec.field_index(spec.rows_from)])]


def operator_reports(programs: list[Program], arch: CimArch) -> list[OperatorReport]:
    """One report per offloaded operator, in offload order."""
    latency = arch.latency_ps()
    reports = []
    for program in programs:
        for summary in program.attrs["operators"]:
            writes = mvms = 0
            ps = 0
            for start, end in summary["instructions"]:
                for row in program.code[start:end]:
                    spec = isa.BY_OPCODE[int(row[0])]
                    vectors = _vectors(program, row)
                    if spec.mnemonic == "prog":
                        writes += 1
                    if spec.mnemonic == "mvm":
                        mvms += vectors
                    if spec.latency_class:
                        ps += latency[spec.latency_class] * (vectors if spec.per_vector else 1)
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
                    tiles=writes,
                    writes=writes,
                    mvm_executions=mvms,
                    latency_us=ps / 1e6,
                )
            )
    total = sum(r.latency_us for r in reports)
    for r in reports:
        r.share = r.latency_us / total if total else 0.0
    return reports


def cpu_operators(mod) -> list[dict]:
    """Dense and convolution operators left on the CPU, with the reason."""
    from tvm_cim.relay_passes.explain import unsupported_reason
    from tvm_cim.relay_passes.partition import operator_name
    from tvm_cim.relay_passes.patterns import ANCHORS

    out = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            kind = ANCHORS.get(getattr(getattr(call, "op", None), "name", None))
            if kind is None:
                continue
            out.append(
                {
                    "name": operator_name(call) or binding.var.name,
                    "kind": kind,
                    "reason": unsupported_reason(call, block),
                }
            )
    return out
