"""Latency, counts and energy of a crossbar program: the static cost model.

Time is kept in integer picoseconds so that sums are exact and independent of order.
Each instruction occupies one unit (its crossbar, the digital unit, or the I/O unit)
for its latency, times the vectors it treats for per-vector instructions: the batch times
the rows per item of the buffer it acts on (``InstrSpec.rows_from``). Two figures come
out:

* ``sequential_ps``: the sum of all latencies, every instruction after the last;
* ``latency_ps``: the makespan of an in-order list schedule in which an instruction
  starts once its unit is free and the buffers it reads were written (RAW) and the
  buffer it writes is no longer being read or written (WAR, WAW).

With one crossbar and free digital steps (the ``rram-4b`` preset) both equal the
CIM-AQ latency model. ``Timeline`` is the Python implementation used by
``Program.estimate`` and the numpy backend; the Cython backend keeps its own tally
while it executes, and the tests hold the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tvm_cim.core.arch import CimArch

from . import isa

#: Which operands an instruction reads and writes (buffers only).
_READS = {
    "mvm": ("src",),
    "shadd": ("src",),
    "acc": ("src",),
    "req": ("src",),
    "store": ("src",),
    "im2col": ("src",),
}
_WRITES = {
    "load": ("dst",),
    "adc": ("dst",),
    "shadd": ("dst",),
    "acc": ("dst",),
    "req": ("dst",),
    "im2col": ("dst",),
}


@dataclass
class SimStats:
    """What running a program costs.

    Counts are exact integers; ``*_us`` and ``energy_nj`` are derived from them. A
    vector is one row of a buffer: ``batch`` items of a buffer with ``rows`` rows per
    item are ``batch * rows`` vectors.
    """

    arch: CimArch
    batch: int
    latency_ps: int = 0
    sequential_ps: int = 0
    instructions: dict[str, int] = field(default_factory=dict)  # executed, per mnemonic
    crossbar_writes: int = 0
    mvm_executions: int = 0  # one input step on one crossbar for one vector
    cell_macs: int = 0  # input chunk x cell products performed by the crossbars
    adc_conversions: int = 0  # one column, one vector
    digital_ops: int = 0  # shift-add, accumulate, requantize: one op on one vector
    busy_ps: list[int] = field(default_factory=list)  # per crossbar

    @property
    def latency_us(self) -> float:
        return self.latency_ps / 1e6

    @property
    def sequential_latency_us(self) -> float:
        return self.sequential_ps / 1e6

    @property
    def cycles(self) -> int:
        return self.arch.cycles(self.latency_ps)

    @property
    def busy_us(self) -> list[float]:
        return [ps / 1e6 for ps in self.busy_ps]

    @property
    def energy_nj(self) -> float | None:
        """Total energy, or None when the arch gives no energy figures."""
        a = self.arch
        terms = (
            (a.write_energy_nj, self.crossbar_writes),
            (a.mvm_energy_nj, self.mvm_executions),
            (a.adc_energy_nj, self.adc_conversions),
            (a.digital_energy_nj, self.digital_ops),
        )
        if all(e is None for e, _ in terms):
            return None
        return math.fsum((e or 0.0) * n for e, n in terms)

    def instruction_classes(self) -> dict[str, int]:
        """Executed instructions per latency class (``write``, ``mvm``, ...)."""
        out: dict[str, int] = {}
        for mnemonic, n in self.instructions.items():
            cls = isa.BY_MNEMONIC[mnemonic].latency_class or "control"
            out[cls] = out.get(cls, 0) + n
        return out

    def counts(self) -> tuple:
        """Every integer the stats hold, for exact comparison."""
        return (
            self.batch,
            self.latency_ps,
            self.sequential_ps,
            tuple(sorted(self.instructions.items())),
            self.crossbar_writes,
            self.mvm_executions,
            self.cell_macs,
            self.adc_conversions,
            self.digital_ops,
            tuple(self.busy_ps),
        )

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "latency_us": self.latency_us,
            "latency_ps": self.latency_ps,
            "sequential_latency_us": self.sequential_latency_us,
            "cycles": self.cycles,
            "instructions": dict(sorted(self.instructions.items())),
            "instruction_classes": self.instruction_classes(),
            "crossbar_writes": self.crossbar_writes,
            "mvm_executions": self.mvm_executions,
            "cell_macs": self.cell_macs,
            "adc_conversions": self.adc_conversions,
            "digital_ops": self.digital_ops,
            "busy_us": self.busy_us,
            "energy_nj": self.energy_nj,
        }


class Timeline:
    """Issues instructions one by one into the schedule and tallies ``SimStats``."""

    def __init__(self, arch: CimArch, batch: int, buffer_rows: list[int], images):
        self.stats = SimStats(arch, batch, busy_ps=[0] * arch.crossbars)
        self.lat = arch.latency_ps()
        self.images = images
        self.buffer_rows = buffer_rows
        self.unit_free: dict[object, int] = {}
        self.written = [0] * len(buffer_rows)  # when the last write of each buffer ends
        self.read = [0] * len(buffer_rows)  # when the last read of each buffer ends
        self.image_on = [None] * arch.crossbars

    def issue(self, mnemonic: str, ops: dict[str, int]) -> None:
        spec = isa.BY_MNEMONIC[mnemonic]
        st = self.stats
        st.instructions[mnemonic] = st.instructions.get(mnemonic, 0) + 1
        vectors = st.batch * self.buffer_rows[ops[spec.rows_from]] if spec.per_vector else 1
        lat = self.lat[spec.latency_class] * vectors if spec.latency_class else 0
        unit = ("xb", ops["xb"]) if spec.unit == "crossbar" else spec.unit

        start = self.unit_free.get(unit, 0)
        reads = [ops[name] for name in _READS.get(mnemonic, ())]
        writes = [ops[name] for name in _WRITES.get(mnemonic, ())]
        for b in reads:
            start = max(start, self.written[b])
        for b in writes:
            start = max(start, self.written[b], self.read[b])
        end = start + lat
        self.unit_free[unit] = end
        for b in reads:
            self.read[b] = max(self.read[b], end)
        for b in writes:
            self.written[b] = end
        st.latency_ps = max(st.latency_ps, end)
        st.sequential_ps += lat
        if spec.unit == "crossbar":
            st.busy_ps[ops["xb"]] += lat
        self._count(mnemonic, ops, vectors)

    def _count(self, mnemonic: str, ops: dict[str, int], vectors: int) -> None:
        st = self.stats
        if mnemonic == "prog":
            st.crossbar_writes += 1
            self.image_on[ops["xb"]] = self.images[ops["image"]]
        elif mnemonic == "mvm":
            image = self.image_on[ops["xb"]]
            st.mvm_executions += vectors
            st.cell_macs += vectors * image.physical_rows * image.cols
        elif mnemonic == "adc":
            st.adc_conversions += vectors * ops["ncols"]
        elif mnemonic in ("shadd", "acc", "req"):
            st.digital_ops += vectors


def estimate(program, batch: int | None = None, arch: CimArch | None = None) -> SimStats:
    """Static cost of running ``program`` on ``batch`` items (verified first).

    ``batch`` defaults to the program's fixed batch, else 1.
    """
    from tvm_cim.core.errors import InputError

    from .verify import check_arch, verify

    arch = check_arch(program, arch)
    verify(program, arch)
    fixed = {t.batch for t in program.inputs + program.outputs if t.batch is not None}
    if batch is None:
        batch = fixed.pop() if fixed else 1
    elif fixed and fixed != {batch}:
        raise InputError(f"the program is compiled for a batch of {fixed.pop()}, not {batch}")
    if batch < 1:
        raise InputError("the batch must hold at least one input vector")
    timeline = Timeline(arch, batch, program.buffer_rows, program.images)
    for mnemonic, ops in program.instructions():
        timeline.issue(mnemonic, ops)
    return timeline.stats
