"""Static verification of crossbar programs.

Everything the simulator backends index is checked here, before any instruction
runs: the Cython core then executes without bounds checks. The checks follow the
ISA table (operand kinds) plus the dataflow facts a table cannot express: a crossbar
is programmed before it is driven, its column sums are held before they are read (into a
buffer with as many rows per item as the mvm's source), an ``im2col`` or ``progb`` source
was written first, a ``progb`` tile fits its crossbar, and the program ends with ``halt``.
The values a ``progb`` maps are known only at run time: the backends check their range.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core import cells
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import ProgramError
from tvm_cim.core.quant import MAX_SHIFT

from . import isa
from .program import TENSOR_DTYPES, Program

#: Most vectors per item of a tensor or buffer (a 4096 x 4096 image).
MAX_ROWS = 1 << 24
#: Widest output code a ``req`` writes: what its ``bits`` field holds.
_REQ_BITS = isa.BY_MNEMONIC["req"].field("bits").max_value


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
        if len(tensors) > isa.MAX_TENSORS:
            raise ProgramError(f"too many {role} tensors ({len(tensors)} > {isa.MAX_TENSORS})")
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
            if not 1 <= t.width <= isa.MAX_COLUMNS:
                raise ProgramError(f"{where}: width {t.width} outside 1..{isa.MAX_COLUMNS}")
            if t.batch is not None and t.batch < 1:
                raise ProgramError(f"{where}: batch {t.batch} must be positive")
            if not 1 <= t.rows <= MAX_ROWS:
                raise ProgramError(f"{where}: rows {t.rows} outside 1..{MAX_ROWS}")
    batches = {t.batch for t in program.inputs + program.outputs if t.batch is not None}
    if len(batches) > 1:
        raise ProgramError(f"tensors disagree on the batch size: {sorted(batches)}")


def _check_tables(program: Program, arch: CimArch) -> None:
    if len(program.buffers) > isa.MAX_BUFFERS:
        raise ProgramError(f"{len(program.buffers)} buffers exceed the limit of {isa.MAX_BUFFERS}")
    for i, width in enumerate(program.buffers):
        if not 1 <= width <= isa.MAX_COLUMNS:
            raise ProgramError(f"buffer b{i}: width {width} outside 1..{isa.MAX_COLUMNS}")
    if len(program.buffer_rows) != len(program.buffers):
        raise ProgramError(
            f"{len(program.buffer_rows)} buffer_rows entries for {len(program.buffers)} buffers"
        )
    for i, rows in enumerate(program.buffer_rows):
        if not 1 <= rows <= MAX_ROWS:
            raise ProgramError(f"buffer b{i}: rows {rows} outside 1..{MAX_ROWS}")
    if not isinstance(program.attrs, dict):
        raise ProgramError(f"program attrs must be a dict, not {type(program.attrs).__name__}")
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
    """Walks the code once, tracking what each crossbar holds, the rows of the column
    sums it holds, and which buffers have been written."""

    def __init__(self, program: Program, arch: CimArch):
        self.p = program
        self.arch = arch
        self.shape_on = [None] * arch.crossbars  # (inputs, columns) each crossbar holds
        self.held = [0] * arch.crossbars  # rows per item of the held column sums (0: none)
        self.written = [False] * len(program.buffers)

    def fail(self, i: int, message: str):
        raise ProgramError(message, index=i)

    def same_rows(self, i: int, mnemonic: str, what: str, rows: int, buf: int) -> None:
        """Fail unless buffer ``buf`` has ``rows`` rows per item; ``what`` says whose
        rows those are ("input tensor 'x' has")."""
        have = self.p.buffer_rows[buf]
        if rows != have:
            self.fail(i, f"{mnemonic}: rows per item differ: {what} {rows}, b{buf} has {have}")

    def same_source_rows(self, i: int, mnemonic: str, ops: dict) -> None:
        src_rows = self.p.buffer_rows[ops["src"]]
        self.same_rows(i, mnemonic, f"source b{ops['src']} has", src_rows, ops["dst"])

    def index(self, i: int, kind: str, value: int, count: int) -> None:
        if not 0 <= value < count:
            prefix = isa.KIND_PREFIX[kind]
            self.fail(i, f"{kind} {prefix}{value} out of range (have {count})")

    def span(self, i: int, what: str, start: int, ncols: int, width: int) -> None:
        if ncols < 1 or start + ncols > width:
            self.fail(i, f"{what} columns {start}..{start + ncols - 1} outside width {width}")

    def buffer_span(self, i: int, what: str, ops: dict, operand: str, ncols: int) -> None:
        """Fail unless ``ncols`` columns from ``<operand>_col`` lie in buffer ``operand``."""
        self.span(i, what, ops[f"{operand}_col"], ncols, self.p.buffers[ops[operand]])

    def buffer_to_buffer(self, i: int, mnemonic: str, ops: dict, src_cols: int) -> None:
        """The spans of ``shadd``, ``acc`` and ``req``: ``src_cols`` source columns,
        ``ncols`` destination columns."""
        self.buffer_span(i, f"{mnemonic} source", ops, "src", src_cols)
        self.buffer_span(i, f"{mnemonic} destination", ops, "dst", ops["ncols"])

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
            # The table's checks above are all an instruction needs unless it has dataflow
            # facts of its own: those are a ``check_<mnemonic>`` method.
            check = getattr(self, f"check_{spec.mnemonic}", None)
            if check is not None:
                check(i, ops)
            for name in spec.writes:
                self.written[ops[name]] = True

    def check_prog(self, i, ops):
        self.index(i, "image", ops["image"], len(self.p.images))
        img = self.p.images[ops["image"]]
        self.shape_on[ops["xb"]] = (img.in_rows, img.cols)
        self.held[ops["xb"]] = 0

    def check_progb(self, i, ops):
        src, c = ops["src"], ops["params"]
        if not self.written[src]:
            self.fail(i, f"progb reads b{src} before any instruction wrote it")
        self.index(i, "const", c, len(self.p.constants))
        const = self.p.constants[c]
        if const.shape != (1, len(isa.PROGB_PARAMS)):
            self.fail(i, f"progb params c{c} must be [1, {len(isa.PROGB_PARAMS)}]")
        g = isa.progb_geometry(const[0])
        where = f"progb params c{c}"
        limits = {"K": (1, isa.MAX_COLUMNS), "N": (1, isa.MAX_COLUMNS), "col": (0, isa.MAX_COLUMNS)}
        limits |= {"transpose": (0, 1), "bits": (1, isa.PROGB_MAX_BITS)}
        for name, (low, high) in limits.items():
            if not low <= g[name] <= high:
                self.fail(i, f"{where}: {name}={g[name]} outside {low}..{high}")
        k, n = g["K"], g["N"]
        rows, width = (n, k) if g["transpose"] else (k, n)
        have = self.p.buffer_rows[src]
        if have < rows:
            self.fail(i, f"progb: the operand spans {rows} rows per item, b{src} has {have}")
        self.span(i, "progb operand", g["col"], width, self.p.buffers[src])
        layout = cells.layout(n, g["bits"], self.arch.cell_bits, self.arch.mapping)
        r0, r1, c0, c1 = g["r0"], g["r1"], g["c0"], g["c1"]
        if not 0 <= r0 < r1 <= k:
            self.fail(i, f"{where}: inputs {r0}..{r1} are not a range within K={k}")
        if not 0 <= c0 < c1 <= layout.logical_cols:
            self.fail(
                i,
                f"{where}: columns {c0}..{c1} are not a range within the "
                f"{layout.logical_cols} logical columns of N={n} at {g['bits']} bits",
            )
        tile_rows, tile_cols = layout.physical_rows(r1 - r0), c1 - c0
        if tile_rows > self.arch.rows or tile_cols > self.arch.cols:
            self.fail(
                i,
                f"{where}: a tile of {tile_rows}x{tile_cols} cells exceeds the "
                f"{self.arch.rows}x{self.arch.cols} crossbar",
            )
        self.shape_on[ops["xb"]] = (r1 - r0, tile_cols)
        self.held[ops["xb"]] = 0

    def transfer(self, i: int, mnemonic: str, ops: dict, role: str, tensor_end: str) -> None:
        """The checks of ``load`` and ``store``: ``ncols`` columns between tensor
        ``ops["tensor"]`` (input or output, per ``role``), at its ``tensor_end`` (``src``
        or ``dst``), and the buffer at the other end, which has the tensor's rows."""
        tensors = self.p.inputs if role == "input" else self.p.outputs
        self.index(i, "tensor", ops["tensor"], len(tensors))
        t = tensors[ops["tensor"]]
        buffer_end = "dst" if tensor_end == "src" else "src"
        ends = {"src": "source", "dst": "destination"}
        start = ops[f"{tensor_end}_col"]
        self.span(i, f"{mnemonic} {ends[tensor_end]}", start, ops["ncols"], t.width)
        self.buffer_span(i, f"{mnemonic} {ends[buffer_end]}", ops, buffer_end, ops["ncols"])
        self.same_rows(i, mnemonic, f"{role} tensor {t.name!r} has", t.rows, ops[buffer_end])

    def check_load(self, i, ops):
        self.transfer(i, "load", ops, "input", tensor_end="src")

    def check_mvm(self, i, ops):
        shape = self.shape_on[ops["xb"]]
        if shape is None:
            self.fail(i, f"mvm drives crossbar x{ops['xb']} before it was programmed")
        rows = shape[0]
        self.span(i, "mvm input", ops["src_col"], rows, self.p.buffers[ops["src"]])
        self.held[ops["xb"]] = self.p.buffer_rows[ops["src"]]

    def check_adc(self, i, ops):
        xb = ops["xb"]
        if self.shape_on[xb] is None:
            self.fail(i, f"adc reads crossbar x{xb}, which was never programmed")
        if not self.held[xb]:
            self.fail(i, f"adc reads crossbar x{xb} before any mvm since it was programmed")
        self.span(i, "adc crossbar", ops["col"], ops["ncols"], self.shape_on[xb][1])
        self.buffer_span(i, "adc destination", ops, "dst", ops["ncols"])
        self.same_rows(i, "adc", f"crossbar x{xb} holds sums for", self.held[xb], ops["dst"])
        if self.arch.adc_bits is None and ops["shift"]:
            self.fail(i, "adc shift must be 0 with a lossless ADC")
        if ops["shift"] > MAX_SHIFT:
            self.fail(i, f"adc shift {ops['shift']} exceeds {MAX_SHIFT}")

    def check_shadd(self, i, ops):
        self.buffer_to_buffer(i, "shadd", ops, 1 if ops["bcast"] else ops["ncols"])
        if ops["shift"] > MAX_SHIFT:
            self.fail(i, f"shadd shift {ops['shift']} exceeds {MAX_SHIFT}")
        self.same_source_rows(i, "shadd", ops)

    def check_acc(self, i, ops):
        self.buffer_to_buffer(i, "acc", ops, ops["ncols"])
        dst, first = ops["dst"], ops["dst_row"]
        src_rows, dst_rows = self.p.buffer_rows[ops["src"]], self.p.buffer_rows[dst]
        if first + src_rows > dst_rows:  # (a buffer into itself: dst_row 0, all its rows)
            self.fail(
                i,
                f"acc: rows {first}..{first + src_rows - 1} of each item outside b{dst}'s "
                f"{dst_rows} rows",
            )

    def check_req(self, i, ops):
        self.buffer_to_buffer(i, "req", ops, ops["ncols"])
        self.same_source_rows(i, "req", ops)
        self.index(i, "const", ops["params"], len(self.p.constants))
        params = self.p.constants[ops["params"]]
        if params.shape[0] != 3 or params.shape[1] < ops["ncols"]:
            self.fail(i, f"req params c{ops['params']} must be [3, >={ops['ncols']}]")
        shifts = params[2, : ops["ncols"]]
        if shifts.min() < 0 or shifts.max() > MAX_SHIFT:
            self.fail(i, f"req params c{ops['params']}: shifts must lie in 0..{MAX_SHIFT}")
        if not 1 <= ops["bits"] <= _REQ_BITS:
            self.fail(i, f"req output bits {ops['bits']} outside 1..{_REQ_BITS}")

    def check_store(self, i, ops):
        self.transfer(i, "store", ops, "output", tensor_end="dst")

    def check_im2col(self, i, ops):
        dst, src, c = ops["dst"], ops["src"], ops["params"]
        if dst == src:
            self.fail(i, f"im2col writes its own source b{src}")
        if not self.written[src]:
            self.fail(i, f"im2col reads b{src} before any instruction wrote it")
        self.index(i, "const", c, len(self.p.constants))
        const = self.p.constants[c]
        if const.shape != (1, len(isa.IM2COL_PARAMS)):
            self.fail(i, f"im2col params c{c} must be [1, {len(isa.IM2COL_PARAMS)}]")
        g = dict(zip(isa.IM2COL_PARAMS, (int(v) for v in const[0])))
        where = f"im2col params c{c}"
        for name, v in g.items():
            low = 0 if name.startswith("pad_") else 1
            if not low <= v <= MAX_ROWS:
                self.fail(i, f"{where}: {name}={v} outside {low}..{MAX_ROWS}")
        for axis, size, before, after in (("h", "H", "top", "bottom"), ("w", "W", "left", "right")):
            k = g[f"K{size}"]
            extent = g[size] + g[f"pad_{before}"] + g[f"pad_{after}"]
            span = g[f"dil_{axis}"] * (k - 1) + 1
            out = (extent - span) // g[f"stride_{axis}"] + 1
            if out < 1:
                self.fail(i, f"{where}: the kernel spans {span} > padded {size}={extent}")
            if g[f"O{size}"] != out:
                self.fail(i, f"{where}: O{size}={g[f'O{size}']}, the geometry gives {out}")
        hw, taps = g["H"] * g["W"], g["KH"] * g["KW"] * g["C"]
        self.same_rows(i, "im2col", "the H*W source image needs", hw, src)
        if self.p.buffers[src] != g["C"]:
            self.fail(i, f"im2col: source b{src} has width {self.p.buffers[src]}, not C={g['C']}")
        window, rest = divmod(self.p.buffer_rows[dst], g["OW"])
        if rest or not 1 <= window <= g["OH"] - ops["oh0"]:
            self.fail(
                i,
                f"im2col: b{dst}'s {self.p.buffer_rows[dst]} rows are not whole output rows "
                f"(OW={g['OW']}) within rows {ops['oh0']}..{g['OH'] - 1}",
            )
        if self.p.buffers[dst] != taps:
            self.fail(
                i, f"im2col: destination b{dst} has width {self.p.buffers[dst]}, not KH*KW*C={taps}"
            )


def _check_code(program: Program, arch: CimArch) -> None:
    _Checker(program, arch).run()
