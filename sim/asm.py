"""Assembly text for crossbar programs: the assembler and the disassembler.

A program reads top to bottom as directives, then code::

    .program matmul
    .arch {"rows": 256, "cols": 256, ...}        ; CimArch as one-line JSON
    .attrs {"inputs": {...}}                     ; Program.attrs as one-line JSON
    .input  x width=64 dtype=uint8 bits=8 signed=0
    .output y width=32 dtype=int32 bits=32 signed=1
    .buffer b0 width=64
    .buffer b1 width=27 rows=49                  ; rows per item, 1 if omitted
    .image img0 rows=64 cols=32 diff=0           ; then one hex line per row,
        0a0f03...                                ; two digits per cell
    .const c0 rows=3 cols=32                     ; then one line of integers per row
        0 0 0 ...
    .code
        load dst=b0 dst_col=0 tensor=t0 src_col=0 ncols=64
        mvm xb=x0 src=b0 src_col=0 bit=0         ; omitted flag operands are 0
        halt

A name that holds spaces, ``=``, quotes, ``;`` or other characters that would not read
back is written as a JSON string (``.input "my input" width=4 ...``). Operands are
``name=value``; table indices take their kind's prefix (``b`` buffers,
``x`` crossbars, ``img`` images, ``c`` constants, ``t`` tensors). Tensors take optional
``batch=`` and ``rows=`` keys. ``;`` starts a comment (the JSON of ``.arch`` and
``.attrs`` writes it as ``\\u003b``). ``disassemble`` writes exactly what ``assemble``
reads back.
"""

from __future__ import annotations

import json
import re

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import ArchError, CimError, ProgramError

from . import isa
from .builder import ProgramBuilder
from .program import Program, TensorDesc

_DECLARED = {".input", ".output", ".buffer", ".image", ".const"}


def _one_line_json(value, sort_keys: bool = False) -> str:
    # ";" can only occur inside JSON strings, where its escape reads back the same.
    return json.dumps(value, sort_keys=sort_keys).replace(";", "\\u003b")


#: Names written as they are; any other is written as a JSON string (spaces, ``=``,
#: quotes, ``;``, control characters, an empty name).
_PLAIN_NAME = re.compile(r'[^\s;="\\]+')
#: Largest rows and cols of an image and of a constant: their fields in the file format.
_IMAGE_LIMIT = 0xFFFF
_CONST_LIMIT = 0xFFFFFFFF


def _name(name: str) -> str:
    """``name`` as the assembler reads it back exactly."""
    plain = _PLAIN_NAME.fullmatch(name) and name.isprintable()
    return name if plain else _one_line_json(name)


def _program_name(name: str) -> str:
    """The program's name as ``.program`` reads it back: the rest of the line, quoted
    only where that would not hold it exactly."""
    plain = name and name == name.strip() and name.isprintable() and ";" not in name
    return name if plain and not name.startswith('"') else _one_line_json(name)


def disassemble(program: Program) -> str:
    """Canonical assembly text of ``program``."""
    lines = [
        f".program {_program_name(program.name)}",
        ".arch " + _one_line_json(program.arch.to_dict()),
    ]
    if program.attrs:
        lines.append(".attrs " + _one_line_json(program.attrs, sort_keys=True))
    for directive, tensors in ((".input", program.inputs), (".output", program.outputs)):
        for t in tensors:
            batch = "" if t.batch is None else f" batch={t.batch}"
            rows = "" if t.rows == 1 else f" rows={t.rows}"
            lines.append(
                f"{directive} {_name(t.name)} width={t.width} dtype={t.dtype} bits={t.bits} "
                f"signed={int(t.signed)}{batch}{rows}"
            )
    missing = len(program.buffers) - len(program.buffer_rows)  # unverified programs
    buffer_rows = list(program.buffer_rows) + [1] * missing
    for i, (width, rows) in enumerate(zip(program.buffers, buffer_rows)):
        lines.append(f".buffer b{i} width={width}" + ("" if rows == 1 else f" rows={rows}"))
    for i, img in enumerate(program.images):
        lines.append(
            f".image img{i} rows={img.physical_rows} cols={img.cols} "
            f"diff={int(img.differential_rows)}"
        )
        lines.extend("    " + row.tobytes().hex() for row in img.cells)
    for i, const in enumerate(program.constants):
        lines.append(f".const c{i} rows={const.shape[0]} cols={const.shape[1]}")
        lines.extend("    " + " ".join(str(int(v)) for v in row) for row in const)
    lines.append(".code")
    for index, (mnemonic, ops) in enumerate(program.instructions()):
        spec = isa.BY_MNEMONIC[mnemonic]
        words = [f"{f.name}={isa.KIND_PREFIX.get(f.kind, '')}{ops[f.name]}" for f in spec.fields]
        lines.append(f"    {' '.join([mnemonic, *words]):<72} ; {index}")
    return "\n".join(lines) + "\n"


def assemble(text: str) -> Program:
    """Assemble ``text``; errors name the offending line."""
    return _Assembler(text).run()


class _Assembler:
    def __init__(self, text: str):
        self.lines = [
            (n, line.split(";", 1)[0].rstrip()) for n, line in enumerate(text.splitlines(), 1)
        ]
        self.lines = [(n, line) for n, line in self.lines if line.strip()]
        self.pos = 0
        self.name = "program"
        self.arch: CimArch | None = None
        self.builder: ProgramBuilder | None = None
        self.pending: list = []  # declarations seen before .arch
        self.attrs_seen = False

    def fail(self, line: int, message: str):
        raise ProgramError(f"line {line}: {message}")

    def run(self) -> Program:
        code_lines: list[tuple[int, str]] = []
        in_code = False
        while self.pos < len(self.lines):
            n, line = self.lines[self.pos]
            self.pos += 1
            if in_code:
                code_lines.append((n, line))
                continue
            head, _, rest = line.strip().partition(" ")
            if head == ".program":
                name, tail = self._name(n, rest.strip())
                if rest.strip().startswith('"') and tail.strip():
                    self.fail(n, f"unexpected text after the program name: {tail[:40]!r}")
                self.name = name if rest.strip().startswith('"') else rest.strip() or self.name
            elif head == ".arch":
                self._arch(n, rest)
            elif head == ".attrs":
                self._attrs(n, rest)
            elif head in _DECLARED:
                self._declare(n, head, rest)
            elif head == ".code":
                in_code = True
            else:
                self.fail(n, f"expected a directive, found {head!r}")
        if self.builder is None:
            raise ProgramError("line 1: missing .arch directive")
        if not in_code:
            last = self.lines[-1][0] if self.lines else 1
            raise ProgramError(f"line {last}: missing .code section")
        for n, line in code_lines:
            self._instruction(n, line)
        return self.builder.build()

    def _arch(self, n: int, rest: str) -> None:
        if self.builder is not None:
            self.fail(n, "duplicate .arch")
        try:
            rest = rest.strip()
            self.arch = (
                CimArch.preset(rest)
                if not rest.startswith("{")
                else CimArch.from_dict(json.loads(rest))
            )
        except (ValueError, ArchError) as exc:
            self.fail(n, f"bad .arch: {exc}")
        self.builder = ProgramBuilder(self.arch, self.name)

    def _attrs(self, n: int, rest: str) -> None:
        if self.builder is None:
            self.fail(n, ".attrs before .arch")
        if self.attrs_seen:
            self.fail(n, "duplicate .attrs")
        self.attrs_seen = True
        try:
            attrs = json.loads(rest)
        except ValueError as exc:
            self.fail(n, f"bad .attrs: {exc}")
        if not isinstance(attrs, dict):
            self.fail(n, "bad .attrs: expected a JSON object")
        self.builder.attrs = attrs

    def _keywords(self, n: int, words: list[str]) -> dict[str, str]:
        out = {}
        for word in words:
            key, eq, value = word.partition("=")
            if not eq or not key or not value:
                self.fail(n, f"expected name=value, found {word!r}")
            if key in out:
                self.fail(n, f"operand {key!r} given twice")
            out[key] = value
        return out

    def _name(self, n: int, text: str) -> tuple[str, str]:
        """The name that starts ``text`` (a word, or a JSON string) and the rest."""
        if not text.startswith('"'):
            name, _, rest = text.partition(" ")
            return name, rest
        try:
            name, end = json.JSONDecoder().raw_decode(text)
        except ValueError as exc:
            self.fail(n, f"bad quoted name: {exc}")
        if text[end : end + 1] not in ("", " ", "\t"):
            self.fail(n, f"expected a space after the quoted name, found {text[end:][:20]!r}")
        return name, text[end:]

    def _int(self, n: int, key: str, value: str, prefix: str = "") -> int:
        if prefix and value.startswith(prefix):
            value = value[len(prefix) :]
        if not re.fullmatch(r"-?\d+", value):
            self.fail(n, f"{key}={value!r} is not an integer")
        return int(value)

    def _declare(self, n: int, head: str, rest: str) -> None:
        if self.builder is None:
            self.fail(n, f"{head} before .arch")
        label, rest = self._name(n, rest.strip())
        if not label:
            self.fail(n, f"{head} needs a name")
        words = rest.split()
        kw = self._keywords(n, words)
        b = self.builder
        try:
            if head in (".input", ".output"):
                batch = kw.pop("batch", None)
                desc = TensorDesc(
                    name=label,
                    width=self._int(n, "width", kw.pop("width")),
                    dtype=kw.pop("dtype"),
                    bits=self._int(n, "bits", kw.pop("bits")),
                    signed=bool(self._int(n, "signed", kw.pop("signed"))),
                    batch=None if batch is None else self._int(n, "batch", batch),
                    rows=self._int(n, "rows", kw.pop("rows", "1")),
                )
                (b.input if head == ".input" else b.output)(desc)
            elif head == ".buffer":
                self._label(n, label, "b", len(b.buffers))
                b.buffer(
                    self._int(n, "width", kw.pop("width")),
                    self._int(n, "rows", kw.pop("rows", "1")),
                )
            elif head == ".image":
                self._label(n, label, "img", len(b.images))
                rows = self._size(n, "rows", kw.pop("rows"), _IMAGE_LIMIT)
                cols = self._size(n, "cols", kw.pop("cols"), _IMAGE_LIMIT)
                diff = bool(self._int(n, "diff", kw.pop("diff", "0")))
                b.image(self._hex_rows(n, rows, cols), differential_rows=diff)
            else:
                self._label(n, label, "c", len(b.constants))
                rows = self._size(n, "rows", kw.pop("rows"), _CONST_LIMIT)
                cols = self._size(n, "cols", kw.pop("cols"), _CONST_LIMIT)
                b.constant(self._int_rows(n, rows, cols))
        except KeyError as exc:
            self.fail(n, f"{head} is missing {exc.args[0]}=")
        if kw:
            self.fail(n, f"{head}: unknown key(s) {sorted(kw)}")

    def _size(self, n: int, key: str, value: str, limit: int) -> int:
        """A rows or cols count: within what the file format stores (data lines follow)."""
        size = self._int(n, key, value)
        if not 0 <= size <= limit:
            self.fail(n, f"{key}={value[:24]} outside 0..{limit}")
        return size

    def _label(self, n: int, label: str, prefix: str, expected: int) -> None:
        if label != f"{prefix}{expected}":
            self.fail(n, f"expected label {prefix}{expected}, found {label!r} (declare in order)")

    def _data_lines(self, n: int, rows: int) -> list[tuple[int, str]]:
        if rows < 0 or self.pos + rows > len(self.lines):
            self.fail(n, f"expected {rows} data lines")
        out = self.lines[self.pos : self.pos + rows]
        self.pos += rows
        return [(m, line.strip()) for m, line in out]

    def _hex_rows(self, n: int, rows: int, cols: int) -> np.ndarray:
        lines = self._data_lines(n, rows)  # as many lines as rows exist: then allocate
        if rows == 0 or cols == 0:
            return np.zeros((rows, cols), dtype=np.uint8)
        cells = np.zeros((rows, cols), dtype=np.uint8)
        for r, (m, line) in enumerate(lines):
            if len(line) != 2 * cols:
                self.fail(m, f"image row has {len(line) / 2:g} cells, expected {cols}")
            try:
                raw = bytes.fromhex(line)
            except ValueError:
                self.fail(m, "image rows are hex digits, two per cell")
            if len(raw) != cols:
                self.fail(m, f"image row has {len(raw)} cells, expected {cols}")
            cells[r] = np.frombuffer(raw, dtype=np.uint8)
        return cells

    def _int_rows(self, n: int, rows: int, cols: int) -> np.ndarray:
        lines = self._data_lines(n, rows)  # as many lines as rows exist
        table = []
        for m, line in lines:
            words = line.split()
            if len(words) != cols:  # so the values, read first, come from the text
                self.fail(m, f"constant row has {len(words)} values, expected {cols}")
            if not all(re.fullmatch(r"-?\d{1,19}", w) for w in words):
                self.fail(m, "constant rows hold int64 integers")
            table.append(words)
        try:
            return np.array(table, dtype=np.int64).reshape(rows, cols)
        except (ValueError, OverflowError):
            self.fail(n, "constant rows hold int64 integers")

    def _instruction(self, n: int, line: str) -> None:
        words = line.split()
        spec = isa.BY_MNEMONIC.get(words[0].lower())
        if spec is None:
            self.fail(n, f"unknown mnemonic {words[0]!r}")
        kw = self._keywords(n, words[1:])
        operands = {}
        for f in spec.fields:
            if f.name not in kw:
                if f.kind not in isa.OPTIONAL_KINDS:
                    self.fail(n, f"{spec.mnemonic}: missing operand {f.name}=")
                continue
            operands[f.name] = self._int(n, f.name, kw.pop(f.name), isa.KIND_PREFIX.get(f.kind, ""))
        if kw:
            self.fail(n, f"{spec.mnemonic}: unknown operand(s) {sorted(kw)}")
        try:
            self.builder.emit(spec.mnemonic, **operands)
        except CimError as exc:
            self.fail(n, str(exc))
