"""Latency, counts and energy of a crossbar program: the static cost model.

Time is kept in integer picoseconds so that sums are exact and independent of order.
Each instruction occupies one unit (its crossbar, the digital unit, or the I/O unit)
for its latency, times the vectors it treats for per-vector instructions: the batch times
the rows per item of the buffer it acts on (``InstrSpec.rows_from``); times the batch
for per-item instructions (``InstrSpec.per_item``: a ``progb`` writes each item's own
operand). Two figures come out:

* ``sequential_ps``: the sum of all latencies, every instruction after the last;
* ``latency_ps``: the makespan of an in-order list schedule in which an instruction
  starts once its unit is free and the buffers it reads were written (RAW) and the
  buffer it writes is no longer being read or written (WAR, WAW).

Units, scaling, the buffers each instruction reads and writes and what it counts all
come from the ISA table. With one crossbar and free digital steps (the ``rram-4b``
preset) both figures equal the CIM-AQ latency model. ``Timeline`` is the Python
implementation used by ``estimate``, ``estimate_spans`` and the numpy backend; the
Cython backend keeps its own tally from the same table while it executes, and the tests
hold the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tvm_cim.core.arch import CimArch
from tvm_cim.core.cells import DIFFERENTIAL_ROW
from tvm_cim.core.errors import InputError

from . import isa
from .program import Program
from .verifier import check_arch, verify

#: Per mnemonic, the operand naming its crossbar and the image it writes there (or None).
_CROSSBAR = {s.mnemonic: s.operand("crossbar") for s in isa.INSTRUCTIONS}
_IMAGE = {s.mnemonic: s.operand("image") for s in isa.INSTRUCTIONS}
#: The integer totals of ``SimStats`` that add up over instructions.
_TOTALS = ("latency_ps", "sequential_ps", *isa.COUNTERS)


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
        instructions = tuple(sorted(self.instructions.items()))
        counters = tuple(getattr(self, name) for name in isa.COUNTERS)
        head = (self.batch, self.latency_ps, self.sequential_ps, instructions)
        return head + counters + (tuple(self.busy_ps),)

    def to_dict(self) -> dict:
        return {
            "batch": self.batch,
            "latency_us": self.latency_us,
            "latency_ps": self.latency_ps,
            "sequential_latency_us": self.sequential_latency_us,
            "cycles": self.cycles,
            "instructions": dict(sorted(self.instructions.items())),
            "instruction_classes": self.instruction_classes(),
            **{name: getattr(self, name) for name in isa.COUNTERS},
            "busy_us": self.busy_us,
            "energy_nj": self.energy_nj,
        }


class Timeline:
    """Issues instructions one by one into the schedule and tallies ``SimStats``.

    ``images`` and ``constants`` are the program's tables: what a crossbar write puts on
    its crossbar (the cells later mvms count) comes from them.
    """

    def __init__(self, arch: CimArch, batch: int, buffer_rows: list[int], images, constants=()):
        self.stats = SimStats(arch, batch, busy_ps=[0] * arch.crossbars)
        self.lat = arch.latency_ps()
        self.images = images
        self.constants = constants
        self.differential_rows = arch.mapping == DIFFERENTIAL_ROW
        self.buffer_rows = buffer_rows
        self.unit_free: dict[object, int] = {}
        self.written = [0] * len(buffer_rows)  # when the last write of each buffer ends
        self.read = [0] * len(buffer_rows)  # when the last read of each buffer ends
        self.cells_on = [0] * arch.crossbars  # cells of what each crossbar holds

    def issue(self, mnemonic: str, ops: dict[str, int]) -> int:
        """Schedule one instruction; returns when it ends."""
        spec = isa.BY_MNEMONIC[mnemonic]
        st = self.stats
        st.instructions[mnemonic] = st.instructions.get(mnemonic, 0) + 1
        if spec.per_vector:
            vectors = st.batch * self.buffer_rows[ops[spec.rows_from]]
        else:
            vectors = st.batch if spec.per_item else 1
        lat = self.lat[spec.latency_class] * vectors if spec.latency_class else 0
        xb = ops[_CROSSBAR[mnemonic]] if spec.unit == "crossbar" else None
        unit = spec.unit if xb is None else ("xb", xb)

        start = self.unit_free.get(unit, 0)
        reads = [ops[name] for name in spec.reads]
        writes = [ops[name] for name in spec.writes]
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
        if xb is not None:
            st.busy_ps[xb] += lat
        self._count(spec, ops, xb, vectors)
        return end

    def _count(self, spec: isa.InstrSpec, ops: dict[str, int], xb, vectors: int) -> None:
        """Add what the instruction's ``isa.Count`` entries say to the counters."""
        if _IMAGE[spec.mnemonic] is not None:
            image = self.images[ops[_IMAGE[spec.mnemonic]]]
            self.cells_on[xb] = image.physical_rows * image.cols
        if spec.cells_from is not None:
            params = self.constants[ops[spec.cells_from]][0]
            _, rows, cols = isa.progb_tile(params, self.differential_rows)
            self.cells_on[xb] = rows * cols
        st = self.stats
        for count in spec.counts:
            n = vectors * ops[count.operand] if count.operand else vectors
            if count.per_cell:
                n *= self.cells_on[xb]
            setattr(st, count.counter, getattr(st, count.counter) + n)


def _timeline(program: Program, batch: int | None, arch: CimArch | None) -> Timeline:
    """An empty schedule for ``program`` (verified) on ``batch`` items.

    ``batch`` None means the program's fixed batch, else 1.
    """
    arch = check_arch(program, arch)
    verify(program, arch)
    fixed = {t.batch for t in program.inputs + program.outputs if t.batch is not None}
    if batch is None:
        batch = fixed.pop() if fixed else 1
    elif fixed and fixed != {batch}:
        raise InputError(f"the program is compiled for a batch of {fixed.pop()}, not {batch}")
    if batch < 1:
        raise InputError("the batch must hold at least one input vector")
    return Timeline(arch, batch, program.buffer_rows, program.images, program.constants)


def estimate(program: Program, batch: int | None = None, arch: CimArch | None = None) -> SimStats:
    """Static cost of running ``program`` on ``batch`` items (verified first).

    This is the compiler's cost model; the simulator reports the same ``SimStats``.

    Parameters
    ----------
    program
        The program; raises ``ProgramError`` where the verifier rejects it.
    batch
        Items to run; None means the program's fixed batch, else 1.
    arch
        Latency and energy figures to use; None means the program's own arch. Its
        structural fields must match the program's.
    """
    timeline = _timeline(program, batch, arch)
    for mnemonic, ops in program.instructions():
        timeline.issue(mnemonic, ops)
    return timeline.stats


def finish_times(
    program: Program, labels: list[int], batch: int | None = 1, arch: CimArch | None = None
) -> tuple[SimStats, dict[int, int]]:
    """The program's cost and, per label, when its last instruction ends (picoseconds).

    ``labels`` gives each instruction a label (an image of a stream, say); the halt
    included, every instruction needs one.
    """
    if len(labels) != len(program):
        raise InputError(f"{len(labels)} labels for a program of {len(program)} instructions")
    timeline = _timeline(program, batch, arch)
    ends: dict[int, int] = {}
    for label, (mnemonic, ops) in zip(labels, program.instructions()):
        ends[label] = max(ends.get(label, 0), timeline.issue(mnemonic, ops))
    return timeline.stats, ends


def estimate_spans(
    program: Program,
    spans: list[list[tuple[int, int]]],
    batch: int | None = 1,
    arch: CimArch | None = None,
) -> list[SimStats]:
    """The cost of groups of instructions, from one schedule of the whole program.

    Parameters
    ----------
    program, batch, arch
        As for ``estimate``.
    spans
        Groups (one per operator, say), each a list of ``(start, end)`` instruction
        index ranges, ``end`` excluded.

    Returns
    -------
    list of SimStats
        One per group. Its counts, ``instructions``, ``sequential_ps`` and ``busy_ps``
        are those of the instructions in its ranges; its ``latency_ps`` is how far they
        moved the end of the program's schedule. Groups that cover the program once add
        up to ``estimate``'s figures.
    """
    timeline = _timeline(program, batch, arch)
    for g, group in enumerate(spans):
        for start, end in group:
            if not 0 <= start <= end <= len(program):
                raise InputError(
                    f"group {g}: instruction range ({start}, {end}) is not within the "
                    f"program's {len(program)} instructions"
                )
    instructions = list(program.instructions())
    snapshots, done = {}, 0
    for boundary in sorted({i for group in spans for span in group for i in span}):
        for mnemonic, ops in instructions[done:boundary]:
            timeline.issue(mnemonic, ops)
        done = boundary
        snapshots[boundary] = _snapshot(timeline.stats)
    stats = timeline.stats
    groups = []
    for group in spans:
        total = SimStats(stats.arch, stats.batch, busy_ps=[0] * len(stats.busy_ps))
        for start, end in group:
            _add_difference(total, snapshots[start], snapshots[end])
        groups.append(total)
    return groups


def _snapshot(stats: SimStats) -> SimStats:
    return replace(stats, instructions=dict(stats.instructions), busy_ps=list(stats.busy_ps))


def _add_difference(total: SimStats, before: SimStats, after: SimStats) -> None:
    """Add to ``total`` what the instructions between two snapshots added."""
    for name in _TOTALS:
        setattr(total, name, getattr(total, name) + getattr(after, name) - getattr(before, name))
    for mnemonic, n in after.instructions.items():
        n -= before.instructions.get(mnemonic, 0)
        if n:
            total.instructions[mnemonic] = total.instructions.get(mnemonic, 0) + n
    total.busy_ps = [t + a - b for t, a, b in zip(total.busy_ps, after.busy_ps, before.busy_ps)]
