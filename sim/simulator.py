"""The instruction-level simulator: verify, check inputs, execute on a backend.

Two backends share one semantics: the Cython core (``_core.pyx``, the default) and the
numpy reference (``reference.py``). ``TVM_CIM_PURE_PYTHON=1`` forces the reference, as
does a build without the compiled extension.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from tvm_cim.core.arch import CimArch
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

#: Refuse runs whose buffers would need more memory than this.
MEMORY_LIMIT_BYTES = 2 << 30


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

    def check_inputs(self, inputs: dict[str, np.ndarray], batch: int | None) -> tuple:
        """Validate ``inputs``; return them in program order and the batch.

        Each comes back as ``[batch * rows, width]`` int64. Shapes, the batch and the
        memory it needs are checked before anything is converted or allocated.
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
        return [self._in_range(t, a) for t, a in zip(self.inputs, raw)], batch

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
        self._check_memory(batch)
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
    def _in_range(t: TensorDesc, a: np.ndarray) -> np.ndarray:
        lo, hi = quant_range(t.bits, t.signed)
        # compare as Python ints, before any cast could wrap (uint64 inputs)
        if a.size and (int(a.min()) < lo or int(a.max()) > hi):
            kind = "signed" if t.signed else "unsigned"
            raise InputError(
                f"input {t.name!r}: values span {a.min()}..{a.max()}, outside {kind} "
                f"{t.bits}-bit range {lo}..{hi}"
            )
        return np.ascontiguousarray(a, dtype=np.int64)

    def _check_memory(self, batch: int) -> None:
        # int64 values per item: buffers, tensors and the held column sums
        values = sum(w * r for w, r in zip(self.buffers, self.buffer_rows))
        values += sum(t.width * t.rows for t in self.inputs + self.outputs)
        values += 2 * self.arch.crossbars * self.arch.cols * self.mvm_rows
        need = 8 * batch * values
        if need > MEMORY_LIMIT_BYTES:
            # A batch of hundreds of digits would overflow a float: say so in words.
            shown = f"{need / 2**30:.1f} GiB" if need < 2**70 else "more than a million GiB"
            raise InputError(
                f"a batch of {batch if batch < 10**12 else 'over 10**12'} needs {shown} of "
                f"buffers, over the {MEMORY_LIMIT_BYTES // 2**30} GiB limit; run it in "
                "smaller batches"
            )


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
    """

    def __init__(self, arch: CimArch | None = None, backend: str | None = None):
        self.arch = arch
        self.backend = backend or default_backend()
        if self.backend not in available_backends():
            raise ValueError(f"backend {self.backend!r} not available; have {available_backends()}")

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
            arrays = [np.zeros((batch * t.rows, t.width), np.int64) for t in prepared.inputs]
        else:
            arrays, batch = prepared.check_inputs(inputs or {}, batch)
        if self.backend == "cython":
            outputs, stats = _core.run(prepared, arrays, batch, functional)
        else:
            outputs, stats = reference.run(prepared, arrays, batch, functional)
        return SimResult({t.name: o for t, o in zip(prepared.outputs, outputs)}, stats)


__all__ = ["Simulator", "SimResult", "PreparedProgram", "available_backends", "isa"]
