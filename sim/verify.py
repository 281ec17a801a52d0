"""Static verification of crossbar programs.

Everything the simulator backends index is checked here, before any instruction
runs: the Cython core then executes without bounds checks. The checks follow the
ISA table (operand kinds) plus the dataflow facts a table cannot express: a crossbar
is programmed before it is driven, its column sums are held before they are read, and
the program ends with ``halt``.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.arch import CimArch
from tvm_cim.errors import ProgramError
from tvm_cim.quant import MAX_SHIFT

from . import isa
from .program import TENSOR_DTYPES, Program

MAX_BUFFERS = 1 << 8
MAX_WIDTH = (1 << 16) - 1


def check_arch(program: Program, arch: CimArch | None) -> CimArch:
    """The arch to run ``program`` on: ``arch`` if compatible, else the program's own."""
    if arch is None:
        return program.arch
    if arch.structural_key() != program.arch.structural_key():
        names = ("rows", "cols", "cell_bits", "dac_bits", "adc_bits", "mapping")
        diffs = [
            f"{n}={a!r} (program: {p!r})"
            for n, a, p in zip(names, arch.structural_key(), program.arch.structural_key())
            if a != p
        ]
        raise ProgramError("program was compiled for another arch: " + ", ".join(diffs))
    return arch


def verify(program: Program, arch: CimArch | None = None) -> None:
    """Raise ``ProgramError`` unless ``program`` is safe and meaningful on ``arch``."""
    arch = check_arch(program, arch)
    _check_tensors(program)
    _check_tables(program, arch)
    _check_code(program, arch)


def _check_tensors(program: Program) -> None:
    seen = set()
    for role, tensors in (("input", program.inputs), ("output", program.outputs)):
        if len(tensors) > 256:
            raise ProgramError(f"too many {role} tensors ({len(tensors)} > 256)")
        for t in tensors:
            where = f"{role} tensor {t.name!r}"
            if not t.name or t.name in seen:
                raise ProgramError(f"{where}: names must be unique and non-empty")
            seen.add(t.name)
            if t.dtype not in TENSOR_DTYPES:
                raise ProgramError(f"{where}: dtype {t.dtype!r} not in {sorted(TENSOR_DTYPES)}")
            if not 1 <= t.bits <= TENSOR_DTYPES[t.dtype]:
                raise ProgramError(f"{where}: {t.bits} bits do not fit {t.dtype}")
            if t.dtype.startswith("u") and t.signed:
                raise ProgramError(f"{where}: signed values in unsigned dtype {t.dtype}")
            if not 1 <= t.width <= MAX_WIDTH:
                raise ProgramError(f"{where}: width {t.width} outside 1..{MAX_WIDTH}")
            if t.batch is not None and t.batch < 1:
                raise ProgramError(f"{where}: batch {t.batch} must be positive")
    batches = {t.batch for t in program.inputs + program.outputs if t.batch is not None}
    if len(batches) > 1:
        raise ProgramError(f"tensors disagree on the batch size: {sorted(batches)}")


def _check_tables(program: Program, arch: CimArch) -> None:
    if len(program.buffers) > MAX_BUFFERS:
        raise ProgramError(f"{len(program.buffers)} buffers exceed the limit of {MAX_BUFFERS}")
    for i, width in enumerate(program.buffers):
        if not 1 <= width <= MAX_WIDTH:
            raise ProgramError(f"buffer b{i}: width {width} outside 1..{MAX_WIDTH}")
    for i, img in enumerate(program.images):
        where = f"image img{i}"
        cells = img.cells
        if cells.dtype != np.uint8 or cells.ndim != 2 or 0 in cells.shape:
            raise ProgramError(f"{where}: cells must be a non-empty 2-D uint8 array")
        if img.physical_rows > arch.rows or img.cols > arch.cols:
            raise ProgramError(
                f"{where}: {img.physical_rows}x{img.cols} cells exceed the "
                f"{arch.rows}x{arch.cols} crossbar"
            )
        if img.differential_rows and img.physical_rows % 2:
            raise ProgramError(f"{where}: differential rows need an even row count")
        if int(cells.max()) >= 1 << arch.cell_bits:
            raise ProgramError(
                f"{where}: cell value {int(cells.max())} exceeds {arch.cell_bits}-bit cells"
            )
    for i, const in enumerate(program.constants):
        if const.dtype != np.int64 or const.ndim != 2:
            raise ProgramError(f"constant c{i}: must be a 2-D int64 array")


class _Checker:
    """Walks the code once, tracking which image each crossbar holds."""

    def __init__(self, program: Program, arch: CimArch):
        self.p = program
        self.arch = arch
        self.image_on = [None] * arch.crossbars  # image index per crossbar
        self.held = [False] * arch.crossbars  # column sums held since the last write

    def fail(self, i: int, message: str):
        raise ProgramError(message, index=i)

    def index(self, i: int, kind: str, value: int, count: int) -> None:
        if not 0 <= value < count:
            prefix = isa.KIND_PREFIX[kind]
            self.fail(i, f"{kind} {prefix}{value} out of range (have {count})")

    def span(self, i: int, what: str, start: int, ncols: int, width: int) -> None:
        if ncols < 1 or start + ncols > width:
            self.fail(i, f"{what} columns {start}..{start + ncols - 1} outside width {width}")

    def run(self) -> None:
        code, p = self.p.code, self.p
        if len(code) == 0 or code[-1, 0] != isa.OP["HALT"]:
            raise ProgramError("program must end with halt", index=max(len(code) - 1, 0))
        halts = np.flatnonzero(code[:, 0] == isa.OP["HALT"])
        if halts[0] != len(code) - 1:
            self.fail(int(halts[0]), "halt before the end leaves unreachable instructions")
        nbuf = len(p.buffers)
        for i, row in enumerate(code):
            spec = isa.BY_OPCODE.get(int(row[0]))
            if spec is None:
                self.fail(i, f"unknown opcode {int(row[0])}")
            ops = {f.name: int(v) for f, v in zip(spec.fields, row[1:])}
            for f in spec.fields:
                if not f.min_value <= ops[f.name] <= f.max_value:
                    self.fail(i, f"{spec.mnemonic}: {f.name}={ops[f.name]} overflows its field")
                if f.kind == "buffer":
                    self.index(i, "buffer", ops[f.name], nbuf)
                elif f.kind == "crossbar":
                    self.index(i, "crossbar", ops[f.name], self.arch.crossbars)
            getattr(self, f"check_{spec.mnemonic}")(i, ops)

    def check_halt(self, i, ops):
        pass

    def check_prog(self, i, ops):
        self.index(i, "image", ops["image"], len(self.p.images))
        self.image_on[ops["xb"]] = ops["image"]
        self.held[ops["xb"]] = False

    def check_load(self, i, ops):
        self.index(i, "tensor", ops["tensor"], len(self.p.inputs))
        width = self.p.inputs[ops["tensor"]].width
        self.span(i, "load source", ops["src_col"], ops["ncols"], width)
        self.span(i, "load destination", ops["dst_col"], ops["ncols"], self.p.buffers[ops["dst"]])

    def check_mvm(self, i, ops):
        image = self.image_on[ops["xb"]]
        if image is None:
            self.fail(i, f"mvm drives crossbar x{ops['xb']} before it was programmed")
        rows = self.p.images[image].in_rows
        self.span(i, "mvm input", ops["src_col"], rows, self.p.buffers[ops["src"]])
        self.held[ops["xb"]] = True

    def check_adc(self, i, ops):
        xb = ops["xb"]
        if self.image_on[xb] is None:
            self.fail(i, f"adc reads crossbar x{xb}, which was never programmed")
        if not self.held[xb]:
            self.fail(i, f"adc reads crossbar x{xb} before any mvm since it was programmed")
        self.span(
            i, "adc crossbar", ops["col"], ops["ncols"], self.p.images[self.image_on[xb]].cols
        )
        self.span(i, "adc destination", ops["dst_col"], ops["ncols"], self.p.buffers[ops["dst"]])
        if self.arch.adc_bits is None and ops["shift"]:
            self.fail(i, "adc shift must be 0 with a lossless ADC")
        if ops["shift"] > MAX_SHIFT:
            self.fail(i, f"adc shift {ops['shift']} exceeds {MAX_SHIFT}")

    def check_shadd(self, i, ops):
        src_cols = 1 if ops["bcast"] else ops["ncols"]
        self.span(i, "shadd source", ops["src_col"], src_cols, self.p.buffers[ops["src"]])
        self.span(i, "shadd destination", ops["dst_col"], ops["ncols"], self.p.buffers[ops["dst"]])
        if ops["shift"] > MAX_SHIFT:
            self.fail(i, f"shadd shift {ops['shift']} exceeds {MAX_SHIFT}")

    def check_acc(self, i, ops):
        self.span(i, "acc source", ops["src_col"], ops["ncols"], self.p.buffers[ops["src"]])
        self.span(i, "acc destination", ops["dst_col"], ops["ncols"], self.p.buffers[ops["dst"]])

    def check_req(self, i, ops):
        self.span(i, "req source", ops["src_col"], ops["ncols"], self.p.buffers[ops["src"]])
        self.span(i, "req destination", ops["dst_col"], ops["ncols"], self.p.buffers[ops["dst"]])
        self.index(i, "const", ops["params"], len(self.p.constants))
        params = self.p.constants[ops["params"]]
        if params.shape[0] != 3 or params.shape[1] < ops["ncols"]:
            self.fail(i, f"req params c{ops['params']} must be [3, >={ops['ncols']}]")
        shifts = params[2, : ops["ncols"]]
        if shifts.min() < 0 or shifts.max() > MAX_SHIFT:
            self.fail(i, f"req params c{ops['params']}: shifts must lie in 0..{MAX_SHIFT}")
        if not 1 <= ops["bits"] <= 31:
            self.fail(i, f"req output bits {ops['bits']} outside 1..31")

    def check_store(self, i, ops):
        self.index(i, "tensor", ops["tensor"], len(self.p.outputs))
        width = self.p.outputs[ops["tensor"]].width
        self.span(i, "store destination", ops["dst_col"], ops["ncols"], width)
        self.span(i, "store source", ops["src_col"], ops["ncols"], self.p.buffers[ops["src"]])


def _check_code(program: Program, arch: CimArch) -> None:
    _Checker(program, arch).run()
