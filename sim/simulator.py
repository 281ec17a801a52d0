"""The instruction-level simulator: verify, check inputs, execute on a backend.

Two backends share one semantics: the Cython core (``_core.pyx``, the default) and the
numpy reference (``reference.py``). ``TVM_CIM_PURE_PYTHON=1`` forces the reference, as
does a build without the compiled extension.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.arrays import format_size, parse_size
from tvm_cim.core.cells import DIFFERENTIAL_ROW
from tvm_cim.core.errors import InputError
from tvm_cim.core.quant import quant_range

from . import isa, reference
from .program import Program, TensorDesc
from .timing import SimStats
from .verifier import check_arch, verify

try:
    from . import _core
except ImportError:  # built without the extension: the reference still works
    _core = None

#: Refuse runs that would hold more memory than this (bytes), unless told otherwise.
MEMORY_LIMIT_BYTES = 2 << 30
#: The environment variable that sets the memory limit (``4G``, ``512M``, bytes).
MEMORY_LIMIT_VARIABLE = "TVM_CIM_SIM_MEMORY_LIMIT"
#: Refuse functional runs whose work (see ``PreparedProgram.work``) exceeds this: about
#: a minute of the compiled core, and six times the largest region of VGG-16 at 224x224
#: (1.7e11 at batch 1; ResNet-18's largest is 9e9).
WORK_LIMIT = 10**12
#: The environment variable that sets the work limit (a count, such as ``5e12``).
WORK_LIMIT_VARIABLE = "TVM_CIM_SIM_WORK_LIMIT"
#: Work is counted in cell-MACs, of which the compiled core does about 1.5e10 a second
#: (BLAS); treating one vector of an instruction costs it as much as this many, and one
#: column of a digital instruction (adc, shadd, acc, req, load, store, im2col) this many.
VECTOR_OPS = 256
COLUMN_OPS = 16
#: How messages name the two settings.
_MEMORY_SETTING = f"memory limit (--memory-limit, {MEMORY_LIMIT_VARIABLE})"
_WORK_SETTING = f"work limit (--work-limit, {WORK_LIMIT_VARIABLE})"


def available_backends() -> list[str]:
    return ["cython", "numpy"] if _core is not None else ["numpy"]


def default_backend() -> str:
    if os.environ.get("TVM_CIM_PURE_PYTHON", "") not in ("", "0") or _core is None:
        return "numpy"
    return "cython"


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` itself where nothing can write to it, else a read-only copy.

    Nothing can write to memory that a ``bytes`` object owns (``np.frombuffer``, as
    ``ProgramBuilder`` and ``Program.from_bytes`` make cells): numpy refuses to make any
    view of it writeable. A broadcast view is copied without the axes it repeats.
    """
    owner = a
    while isinstance(owner, np.ndarray) and not owner.flags.writeable:
        owner = owner.base
    if isinstance(owner, memoryview) and owner.readonly:
        owner = owner.obj
    if type(owner) is bytes:
        return a
    repeated = tuple(slice(0, 1) if s == 0 else slice(None) for s in a.strides)
    copy = a[repeated].copy()
    copy.setflags(write=False)
    return np.broadcast_to(copy, a.shape) if 0 in a.strides else copy


def _count_setting(text: str, what: str) -> int:
    """``text`` (``1000``, ``5e12``) as a positive integer; ``what`` names the setting."""
    try:
        value = float(text) if re.fullmatch(r"\s*\d+(\.\d*)?[eE]\d{1,3}\s*", text) else int(text)
    except (ValueError, OverflowError):
        value = 0
    if not 1 <= value < 2**63:
        raise InputError(f"{what}: {text[:40]!r} is not a positive count (such as 5e12)")
    return int(value)


@dataclass(frozen=True)
class Limits:
    """What one run may cost: bytes of memory it holds, operations of work it does.

    ``Limits.resolve()`` takes each limit given, else its environment variable
    (``TVM_CIM_SIM_MEMORY_LIMIT``, ``TVM_CIM_SIM_WORK_LIMIT``), else the default
    (2 GiB, ``WORK_LIMIT``).
    """

    memory: int = MEMORY_LIMIT_BYTES
    work: int = WORK_LIMIT

    @classmethod
    def resolve(cls, memory: int | str | None = None, work: int | str | None = None) -> Limits:
        memory = os.environ.get(MEMORY_LIMIT_VARIABLE, "").strip() if memory is None else memory
        work = os.environ.get(WORK_LIMIT_VARIABLE, "").strip() if work is None else work
        if isinstance(memory, str):
            memory = parse_size(memory, _MEMORY_SETTING) if memory else MEMORY_LIMIT_BYTES
        if isinstance(work, str):
            work = _count_setting(work, _WORK_SETTING) if work else WORK_LIMIT
        if memory < 1 or work < 1:
            raise InputError(f"limits must be positive: memory {memory}, work {work}")
        return cls(int(memory), int(work))


@dataclass(frozen=True)
class Step:
    """What one instruction touches, per item, as the cost estimates need it.

    ``rows``: vectors per item it treats (0 for one that is not per vector); ``cols``:
    columns per vector (an mvm: its image's columns, an im2col: its taps); ``k``: inputs
    an mvm drives; ``cells``: the cells of the image a prog writes or an mvm drives;
    ``index``: values of an im2col's gather index; ``params``: an im2col's or a progb's
    geometry; ``item_cells``: what a progb does per item, the cells it writes plus the
    operand values it checks.
    """

    rows: int = 0
    cols: int = 0
    k: int = 0
    cells: int = 0
    index: int = 0
    params: tuple = ()
    item_cells: int = 0


@dataclass
class Walk:
    """One pass over a verified program's code, tracking the image on each crossbar."""

    steps: list[Step]
    #: per crossbar some prog writes: the most weights (in_rows x cols) it holds
    weights: dict[int, int]
    #: per crossbar some mvm drives: the most column sums per item it holds
    held_per_item: dict[int, int]
    #: per distinct im2col geometry: the values of its gather index
    im2col_index: dict[tuple, int]
    #: per crossbar some progb writes: the most weights (in_rows x cols) it holds per item
    item_weights: dict[int, int] = field(default_factory=dict)

    def work(self, batch: int) -> int:
        """Operations of a functional run of ``batch`` items (see ``PreparedProgram.work``)."""
        per_item = sum(
            s.rows * (VECTOR_OPS + (s.cells if s.k else COLUMN_OPS * s.cols))
            + COLUMN_OPS * s.item_cells
            for s in self.steps
        )
        writes = sum(s.cells for s in self.steps if s.rows == 0)
        return batch * (per_item + len(self.steps)) + writes


def _walk(prepared: PreparedProgram) -> Walk:
    """The ``Walk`` of ``prepared`` (verified: every index is in range)."""
    images, rows_of = prepared.images, prepared.buffer_rows
    differential_rows = prepared.arch.mapping == DIFFERENTIAL_ROW
    shape_on: dict[int, tuple[int, int, int]] = {}  # (inputs, physical rows, cols) held
    steps, weights, held, index, item_weights = [], {}, {}, {}, {}
    for row in prepared.code.tolist():
        spec = isa.BY_OPCODE[row[0]]
        ops = dict(zip((f.name for f in spec.fields), row[1:]))
        rows = rows_of[ops[spec.rows_from]] if spec.per_vector else 0
        if spec.mnemonic == "prog":
            img = images[ops["image"]]
            shape_on[ops["xb"]] = (img.in_rows, img.physical_rows, img.cols)
            size = img.in_rows * img.cols
            weights[ops["xb"]] = max(weights.get(ops["xb"], 0), size)
            step = Step(cells=img.physical_rows * img.cols)
        elif spec.mnemonic == "progb":
            params = tuple(int(v) for v in prepared.constants[ops["params"]][0])
            k, physical, cols = shape_on[ops["xb"]] = isa.progb_tile(params, differential_rows)
            item_weights[ops["xb"]] = max(item_weights.get(ops["xb"], 0), k * cols)
            g = isa.progb_geometry(params)
            step = Step(params=params, item_cells=physical * cols + g["K"] * g["N"])
        elif spec.mnemonic == "mvm":
            k, physical, cols = shape_on[ops["xb"]]
            held[ops["xb"]] = max(held.get(ops["xb"], 0), rows * cols)
            step = Step(rows, cols, k, physical * cols)
        elif spec.mnemonic == "im2col":
            params = tuple(int(v) for v in prepared.constants[ops["params"]][0])
            g = dict(zip(isa.IM2COL_PARAMS, params))
            taps = g["KH"] * g["KW"] * g["C"]
            window = reference.im2col_window(params, ops["oh0"], rows)
            index[window] = rows * taps
            step = Step(rows, taps, index=index[window], params=params)
        elif spec.mnemonic == "shadd" and ops["bcast"]:
            step = Step(rows, 1)
        else:
            step = Step(rows, ops.get("ncols", 0))
        steps.append(step)
    return Walk(steps, weights, held, index, item_weights)


@dataclass
class SimResult:
    """Outputs by name, and what the run cost."""

    outputs: dict[str, np.ndarray]
    stats: SimStats


class PreparedProgram:
    """A verified, immutable snapshot of a program, ready to run many times.

    Image cells that nothing can write (those built or loaded) are shared, not copied.
    """

    def __init__(self, program: Program, arch: CimArch):
        arch = check_arch(program, arch)
        verify(program, arch)
        self.arch = arch
        self.name = program.name
        self.code = program.code.copy()
        self.code.setflags(write=False)
        self.inputs: list[TensorDesc] = list(program.inputs)
        self.outputs: list[TensorDesc] = list(program.outputs)
        self.buffers = [int(w) for w in program.buffers]
        self.buffer_rows = [int(r) for r in program.buffer_rows]
        # Backends fold an image when a prog writes it: only the held ones take floats.
        self.images = [
            type(img)(_frozen(img.cells), img.differential_rows) for img in program.images
        ]
        self.constants = [c.copy() for c in program.constants]
        self.fixed_batch = next(
            (t.batch for t in self.inputs + self.outputs if t.batch is not None), None
        )
        mvm_src = self.code[
            self.code[:, 0] == isa.OP["MVM"], isa.BY_MNEMONIC["mvm"].field_index("src")
        ]
        #: Most rows per item an mvm drives: the height of the held column sums.
        self.mvm_rows = max((self.buffer_rows[int(b)] for b in mvm_src), default=1)

    @cached_property
    def instructions(self) -> list[tuple[str, dict[str, int]]]:
        """``(mnemonic, operands)`` per instruction: the numpy reference's view of
        ``code``, decoded on first use (the Cython core reads ``code`` itself)."""
        decoded = []
        for row in self.code.tolist():
            spec = isa.BY_OPCODE[row[0]]
            decoded.append((spec.mnemonic, {f.name: v for f, v in zip(spec.fields, row[1:])}))
        return decoded

    def check_inputs(
        self,
        inputs: dict[str, np.ndarray],
        batch: int | None,
        limits: Limits | None = None,
        backend: str | None = None,
        functional: bool = True,
    ) -> tuple:
        """Validate ``inputs``; return them in program order and the batch.

        Each comes back as ``[batch * rows, width]`` (int64 if ``functional``). Shapes,
        the batch, and the memory (and, if ``functional``, the work) a run on ``backend``
        needs within ``limits`` are checked before anything is converted or allocated.
        """
        names = [t.name for t in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise InputError(f"unknown input(s) {unknown}; the program takes {names}")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}; the program takes {names}")
        raw = [self._shaped(t, inputs[t.name]) for t in self.inputs]
        batch = self.resolve_batch({a.shape[0] // t.rows for t, a in zip(self.inputs, raw)}, batch)
        self.check_cost(batch, limits, backend, functional)
        return [self._in_range(t, a, functional) for t, a in zip(self.inputs, raw)], batch

    def resolve_batch(self, batches: set[int], batch: int | None) -> int:
        """The one batch size the inputs, the caller and the program agree on."""
        if batch is not None:
            batches.add(batch)
        if self.fixed_batch is not None:
            batches.add(self.fixed_batch)
        if len(batches) > 1:
            raise InputError(f"inputs disagree on the batch size: {sorted(batches)}")
        batch = batches.pop() if batches else 1
        if batch < 1:
            raise InputError("the batch must hold at least one input vector")
        return batch

    @staticmethod
    def _shaped(t: TensorDesc, value) -> np.ndarray:
        """``value`` as a ``[batch * rows, width]`` array (a view where possible).

        Accepted: ``[batch * rows, width]``, ``[batch, rows, width]`` and, with one row
        per item, a single ``[width]`` vector.
        """
        a = np.asarray(value)
        if a.ndim == 1 and t.rows == 1 and t.width == a.shape[0]:
            a = a[None, :]
        elif a.ndim == 3 and a.shape[1:] == (t.rows, t.width):
            a = a.reshape(-1, t.width)
        if a.ndim != 2 or a.shape[1] != t.width or a.shape[0] % t.rows:
            expected = (
                f"[batch, {t.width}]"
                if t.rows == 1
                else f"[batch*{t.rows}, {t.width}] or [batch, {t.rows}, {t.width}]"
            )
            raise InputError(f"input {t.name!r}: shape {a.shape}, expected {expected}")
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise InputError(f"input {t.name!r}: dtype {a.dtype} is not an integer type")
        return a

    @staticmethod
    def _in_range(t: TensorDesc, a: np.ndarray, convert: bool = True) -> np.ndarray:
        lo, hi = quant_range(t.bits, t.signed)
        # compare as Python ints, before any cast could wrap (uint64 inputs)
        if a.size and (int(a.min()) < lo or int(a.max()) > hi):
            kind = "signed" if t.signed else "unsigned"
            raise InputError(
                f"input {t.name!r}: values span {a.min()}..{a.max()}, outside {kind} "
                f"{t.bits}-bit range {lo}..{hi}"
            )
        # without values (timing only) nothing reads them: no int64 copy
        return np.ascontiguousarray(a, dtype=np.int64) if convert else a

    # ------------------------------------------------------------------ costs

    @cached_property
    def walk(self) -> Walk:
        """What each instruction touches per item, for the memory and work estimates."""
        return _walk(self)

    def work(self, batch: int) -> int:
        """Operations a functional run of ``batch`` items does: per item, each vector an
        instruction treats counts one plus its columns (an mvm: the cell-MACs of its
        image), plus one per instruction; each prog adds its cells once, and each
        progb its cells and its operand's values per item."""
        return self.walk.work(batch)

    def memory_bytes(self, batch: int, backend: str | None = None, functional: bool = True) -> int:
        """Most bytes a run of ``batch`` items on ``backend`` holds at once: every array
        and temporary the backend allocates (inputs converted to int64 included)."""
        backend = backend or default_backend()
        module = _core if backend == "cython" else reference
        return module.memory_bytes(self, batch, functional)

    def check_cost(
        self,
        batch: int,
        limits: Limits | None = None,
        backend: str | None = None,
        functional: bool = True,
    ) -> None:
        """Refuse a run of ``batch`` items over ``limits`` (memory; work if
        ``functional``), before anything is allocated."""
        limits = limits or Limits.resolve()
        self._check_memory(batch, backend, functional, limits.memory)
        if functional:
            self._check_work(batch, limits.work)

    def _check_memory(
        self,
        batch: int,
        backend: str | None = None,
        functional: bool = True,
        limit: int | None = None,
    ) -> None:
        limit = Limits.resolve().memory if limit is None else limit
        need = self.memory_bytes(batch, backend, functional)
        if need > limit:
            raise InputError(
                f"a batch of {_batch_words(batch)} needs {format_size(need)} of memory on the "
                f"{backend or default_backend()} backend, over the {format_size(limit)} limit; "
                f"run smaller batches or raise it ({MEMORY_LIMIT_VARIABLE}, --memory-limit)"
            )

    def _check_work(self, batch: int, limit: int) -> None:
        work = self.work(batch)
        if work > limit:
            raise InputError(
                f"a batch of {_batch_words(batch)} needs {_count_words(work)} operations, "
                f"over the limit of {_count_words(limit)}; run smaller batches or raise it "
                f"({WORK_LIMIT_VARIABLE}, --work-limit)"
            )


def _batch_words(batch: int) -> str:
    return str(batch) if batch < 10**12 else "over 10**12"


def _count_words(n: int) -> str:
    """``n`` exactly when short, else in scientific notation (any size)."""
    if n < 10**7:
        return str(n)
    digits = str(n)
    return f"{digits[0]}.{digits[1:3]}e{len(digits) - 1}"


class Simulator:
    """Runs crossbar programs bit-exactly and reports their latency.

    Parameters
    ----------
    arch
        Architecture to run on; None uses the one each program was compiled for. Its
        structural fields must match the program's; latency and energy figures may
        differ (what-if studies).
    backend
        ``"cython"`` or ``"numpy"``; default ``"cython"`` unless ``TVM_CIM_PURE_PYTHON``
        is set or the extension is missing.

    memory_limit, work_limit
        Most bytes a run may hold and most operations a functional run may do (see
        ``PreparedProgram.memory_bytes`` and ``work``); runs over them are refused with an
        ``InputError`` before anything is allocated. None takes the environment
        variables ``TVM_CIM_SIM_MEMORY_LIMIT`` (``4G``, ``512M``, bytes) and
        ``TVM_CIM_SIM_WORK_LIMIT`` (``5e12``), else 2 GiB and ``WORK_LIMIT``.
    """

    def __init__(
        self,
        arch: CimArch | None = None,
        backend: str | None = None,
        *,
        memory_limit: int | str | None = None,
        work_limit: int | str | None = None,
    ):
        self.arch = arch
        self.backend = backend or default_backend()
        if self.backend not in available_backends():
            raise ValueError(f"backend {self.backend!r} not available; have {available_backends()}")
        self.limits = Limits.resolve(memory_limit, work_limit)

    def prepare(self, program: Program) -> PreparedProgram:
        """Verify ``program`` once for repeated runs."""
        return PreparedProgram(program, self.arch)

    def run(
        self,
        program: Program | PreparedProgram,
        inputs: dict[str, np.ndarray] | None = None,
        *,
        functional: bool = True,
        batch: int | None = None,
    ) -> SimResult:
        """Execute ``program`` on ``inputs`` (a dict from input name to array).

        An input with ``rows`` vectors per item is ``[batch * rows, width]`` or
        ``[batch, rows, width]``; outputs come back as ``[batch * rows, width]``. With
        ``functional=False`` no values are computed (inputs may be omitted if ``batch``
        is given) and the outputs are zeros; the stats are the same.
        """
        prepared = program if isinstance(program, PreparedProgram) else self.prepare(program)
        if inputs is None and not functional:
            batch = prepared.resolve_batch(set(), batch)
            prepared.check_cost(batch, self.limits, self.backend, functional=False)
            # never read without values: zeros that take no memory
            zero = np.zeros((1, 1), np.int64)
            arrays = [np.broadcast_to(zero, (batch * t.rows, t.width)) for t in prepared.inputs]
        else:
            arrays, batch = prepared.check_inputs(
                inputs or {}, batch, self.limits, self.backend, functional
            )
        if self.backend == "cython":
            outputs, stats = _core.run(prepared, arrays, batch, functional)
        else:
            outputs, stats = reference.run(prepared, arrays, batch, functional)
        return SimResult({t.name: o for t, o in zip(prepared.outputs, outputs)}, stats)


__all__ = ["Limits", "Simulator", "SimResult", "PreparedProgram", "available_backends", "isa"]
