"""Crossbar programs: the in-memory form and the binary file format.

File layout (all integers little-endian)::

    offset 0   magic  b"CIMPROG\\0"          8 bytes
           8   format version                u16
          10   reserved (0)                  u16
          12   section count                 u32
          16   sections, each: tag (4 ASCII bytes), reserved u32, payload length u64,
               then the payload
         end   CRC-32 of every byte before it  u32

Sections, in this order: ``META`` (UTF-8 JSON: program name, the arch it was compiled
for, input and output tensor descriptions, buffer widths and rows, free metadata
``attrs``), ``IMGS`` (crossbar weight images), ``CNST`` (int64 constants) and ``INST``
(16-byte instruction words, see ``isa``). Parsing never trusts a length: every failure is
a ``ProgramError`` naming the file offset.

Version 3 widened the buffer and crossbar fields of the instruction words (see ``isa``);
files of version 2 still load, and are written back as version 3.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tvm_cim.core import files
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import ArchError, ProgramError

from . import isa

MAGIC = b"CIMPROG\0"
FORMAT_VERSION = 3
#: The versions this build reads, with the index widths of their instruction words.
READ_VERSIONS = {2: isa.NARROW_FIELDS, 3: None}
SECTION_TAGS = (b"META", b"IMGS", b"CNST", b"INST")
_HEADER = struct.Struct("<8sHHI")
_SECTION = struct.Struct("<4sIQ")
_IMAGE = struct.Struct("<HHB3x")
_CONST = struct.Struct("<II")

#: Integer dtypes a tensor may have, with their widths.
TENSOR_DTYPES = {"int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32, "int64": 64}


@dataclass(frozen=True)
class TensorDesc:
    """An input or output of a program: ``batch`` items of ``rows`` vectors of ``width``
    integers, held as a ``[batch * rows, width]`` array (row ``item * rows + r``).

    ``batch`` None means any number of items, fixed per run. ``rows`` is more than one for
    a tensor with several vectors per item, such as an NHWC image (``rows = H * W``,
    ``width = C``). ``bits`` and ``signed`` give the value range an input must respect
    (outputs: informative).
    """

    name: str
    width: int
    dtype: str = "int32"
    bits: int = 32
    signed: bool = True
    batch: int | None = None
    rows: int = 1

    @property
    def shape(self) -> tuple[int | None, int]:
        """``(batch * rows, width)``; the first entry is None while the batch is free."""
        return (None if self.batch is None else self.batch * self.rows, self.width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TensorDesc:
        try:
            return cls(
                name=str(d["name"]),
                width=int(d["width"]),
                dtype=str(d["dtype"]),
                bits=int(d["bits"]),
                signed=bool(d["signed"]),
                batch=None if d.get("batch") is None else int(d["batch"]),
                rows=int(d.get("rows", 1)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProgramError(f"malformed tensor description {d!r}: {exc}") from None


@dataclass
class CrossbarImage:
    """The cell values one crossbar write programs.

    ``cells`` is ``[physical_rows, cols]`` uint8, each below ``2**cell_bits``. With
    ``differential_rows`` the bottom half holds negative weights: input ``k`` drives row
    ``k`` positively and row ``k + in_rows`` negatively, so a column reads their
    difference. ``ProgramBuilder`` and ``Program.from_bytes`` make read-only cells.
    """

    cells: np.ndarray
    differential_rows: bool = False

    @property
    def physical_rows(self) -> int:
        return int(self.cells.shape[0])

    @property
    def cols(self) -> int:
        return int(self.cells.shape[1])

    @property
    def in_rows(self) -> int:
        """Number of inputs (buffer columns) one MVM reads."""
        return self.physical_rows // 2 if self.differential_rows else self.physical_rows

    def folded(self) -> np.ndarray:
        """``[in_rows, cols]`` signed int64: what an MVM multiplies the inputs by."""
        cells = self.cells.astype(np.int64)
        if self.differential_rows:
            return cells[: self.in_rows] - cells[self.in_rows :]
        return cells


@dataclass
class Program:
    """A crossbar program: instructions plus the data they refer to.

    Build one with ``codegen.lower_matmul``, ``ProgramBuilder``, the assembler
    (``sim.assemble``) or ``Program.load``; ``sim.verify`` checks it and ``sim.estimate``
    gives its cost. ``code`` is the decoded instruction array (see ``isa``).

    Buffer ``i`` holds ``buffer_rows[i]`` vectors of ``buffers[i]`` integers per item
    (``batch * buffer_rows[i]`` in all); ``buffer_rows`` defaults to all ones. ``attrs``
    is free JSON-serializable metadata that travels with the program (for instance the
    host-side quantization of inputs and dequantization of outputs); the simulator does
    not read it.
    """

    arch: CimArch
    code: np.ndarray
    inputs: list[TensorDesc] = field(default_factory=list)
    outputs: list[TensorDesc] = field(default_factory=list)
    buffers: list[int] = field(default_factory=list)
    images: list[CrossbarImage] = field(default_factory=list)
    constants: list[np.ndarray] = field(default_factory=list)
    name: str = "program"
    buffer_rows: list[int] = field(default_factory=list)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.code = np.ascontiguousarray(self.code, dtype=np.int64).reshape(
            -1, 1 + isa.MAX_OPERANDS
        )
        self.constants = [np.ascontiguousarray(c, dtype=np.int64) for c in self.constants]
        if not self.buffer_rows:
            self.buffer_rows = [1] * len(self.buffers)

    def __len__(self) -> int:
        return len(self.code)

    # ------------------------------------------------------------------ views
    def instructions(self):
        """Yield ``(mnemonic, {field: value})`` per instruction, in order."""
        for row in self.code:
            spec = isa.BY_OPCODE.get(int(row[0]))
            if spec is None:
                yield f"<opcode {int(row[0])}>", {}
            else:
                yield spec.mnemonic, {f.name: int(v) for f, v in zip(spec.fields, row[1:])}

    def input_index(self, name: str) -> int:
        return [t.name for t in self.inputs].index(name)

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        files.write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> Program:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ProgramError(f"cannot read program {path}: {exc.strerror}") from None
        return cls.from_bytes(data)

    def to_bytes(self) -> bytes:
        meta = {
            "name": self.name,
            "arch": self.arch.to_dict(),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "buffers": [int(w) for w in self.buffers],
            "buffer_rows": [int(r) for r in self.buffer_rows],
            "attrs": self.attrs,
        }
        imgs = [struct.pack("<I", len(self.images))]
        for img in self.images:
            imgs.append(_IMAGE.pack(img.physical_rows, img.cols, int(img.differential_rows)))
            imgs.append(np.ascontiguousarray(img.cells, dtype=np.uint8).tobytes())
        consts = [struct.pack("<I", len(self.constants))]
        for c in self.constants:
            consts.append(_CONST.pack(*c.shape))
            consts.append(c.astype("<i8").tobytes())
        payloads = {
            b"META": _meta_json(meta),
            b"IMGS": b"".join(imgs),
            b"CNST": b"".join(consts),
            b"INST": struct.pack("<I", len(self.code)) + isa.encode(self.code),
        }
        parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(SECTION_TAGS))]
        for tag in SECTION_TAGS:
            parts.append(_SECTION.pack(tag, 0, len(payloads[tag])))
            parts.append(payloads[tag])
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> Program:
        return _Parser(bytes(data)).parse()


def _meta_json(meta: dict) -> bytes:
    try:
        text = json.dumps(meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ProgramError(f"program attrs are not plain JSON: {exc}") from None
    return text.encode()


class _Parser:
    """Reads the binary format; every read is bounds-checked."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise ProgramError(f"truncated {what}: needs {n} bytes", offset=self.pos)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def parse(self) -> Program:
        data = self.data
        if len(data) < _HEADER.size + 4:
            raise ProgramError(f"file too short ({len(data)} bytes)", offset=0)
        self.end = len(data) - 4
        magic, version, _, count = self.unpack(_HEADER, "header")
        if magic != MAGIC:
            raise ProgramError(f"bad magic {magic!r}, not a tvm-cim program", offset=0)
        if version not in READ_VERSIONS:
            readable = ", ".join(map(str, READ_VERSIONS))
            raise ProgramError(
                f"unsupported format version {version} (this build reads {readable})",
                offset=8,
            )
        self.widths = READ_VERSIONS[version]
        (stored_crc,) = struct.unpack("<I", data[-4:])
        if zlib.crc32(data[:-4]) != stored_crc:
            raise ProgramError("checksum mismatch: the file is corrupt", offset=len(data) - 4)
        if count != len(SECTION_TAGS):
            raise ProgramError(f"expected {len(SECTION_TAGS)} sections, got {count}", offset=12)
        sections = {}
        for expected in SECTION_TAGS:
            start = self.pos
            tag, _, length = self.unpack(_SECTION, "section header")
            if tag != expected:
                raise ProgramError(f"expected section {expected!r}, found {tag!r}", offset=start)
            sections[tag] = (self.pos, self.take(length, f"section {tag.decode()}"))
        if self.pos != self.end:
            raise ProgramError("trailing bytes after the last section", offset=self.pos)

        meta = self._meta(*sections[b"META"])
        images = self._images(*sections[b"IMGS"])
        constants = self._constants(*sections[b"CNST"])
        code = self._code(*sections[b"INST"])
        return Program(code=code, images=images, constants=constants, **meta)

    def _sub(self, base: int, payload: bytes) -> _Parser:
        sub = _Parser(self.data)
        sub.pos, sub.end = base, base + len(payload)
        return sub

    def _meta(self, base: int, payload: bytes) -> dict:
        try:
            meta = json.loads(payload.decode("utf-8"))
            arch = CimArch.from_dict(meta["arch"])
            inputs = [TensorDesc.from_dict(t) for t in meta["inputs"]]
            outputs = [TensorDesc.from_dict(t) for t in meta["outputs"]]
            buffers = [int(w) for w in meta["buffers"]]
            buffer_rows = [int(r) for r in meta.get("buffer_rows", [1] * len(buffers))]
            if len(buffer_rows) != len(buffers):
                raise ProgramError(
                    f"{len(buffer_rows)} buffer_rows for {len(buffers)} buffers in META"
                )
            attrs = meta.get("attrs", {})
            if not isinstance(attrs, dict):
                raise ProgramError(f"META attrs must be a JSON object, not {type(attrs).__name__}")
            name = str(meta.get("name", "program"))
        except ArchError as exc:
            raise ProgramError(f"invalid arch in META: {exc}", offset=base) from None
        except ProgramError as exc:
            raise ProgramError(str(exc), offset=base) from None
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise ProgramError(f"malformed META section: {exc!r}", offset=base) from None
        return {
            "arch": arch,
            "inputs": inputs,
            "outputs": outputs,
            "buffers": buffers,
            "buffer_rows": buffer_rows,
            "attrs": attrs,
            "name": name,
        }

    def _images(self, base: int, payload: bytes) -> list[CrossbarImage]:
        sub = self._sub(base, payload)
        (count,) = sub.unpack(struct.Struct("<I"), "image count")
        images = []
        for i in range(count):
            rows, cols, flags = sub.unpack(_IMAGE, f"image {i} header")
            if flags > 1:
                raise ProgramError(f"image {i}: unknown flags {flags}", offset=sub.pos - 4)
            raw = sub.take(rows * cols, f"image {i} cells")
            # read-only over the bytes taken: prepared programs share it
            cells = np.frombuffer(raw, dtype=np.uint8).reshape(rows, cols)
            images.append(CrossbarImage(cells, differential_rows=bool(flags)))
        if sub.pos != sub.end:
            raise ProgramError("trailing bytes in IMGS", offset=sub.pos)
        return images

    def _constants(self, base: int, payload: bytes) -> list[np.ndarray]:
        sub = self._sub(base, payload)
        (count,) = sub.unpack(struct.Struct("<I"), "constant count")
        consts = []
        for i in range(count):
            rows, cols = sub.unpack(_CONST, f"constant {i} header")
            raw = sub.take(8 * rows * cols, f"constant {i} data")
            consts.append(np.frombuffer(raw, dtype="<i8").reshape(rows, cols).astype(np.int64))
        if sub.pos != sub.end:
            raise ProgramError("trailing bytes in CNST", offset=sub.pos)
        return consts

    def _code(self, base: int, payload: bytes) -> np.ndarray:
        sub = self._sub(base, payload)
        (count,) = sub.unpack(struct.Struct("<I"), "instruction count")
        start = sub.pos
        words = sub.take(count * isa.WORD_BYTES, "instructions")
        if sub.pos != sub.end:
            raise ProgramError("trailing bytes in INST", offset=sub.pos)
        bad = np.flatnonzero(isa.unused_operand_bits(words, self.widths))
        if len(bad):
            i = int(bad[0])
            raise ProgramError(
                "instruction word sets bits outside its fields",
                index=i,
                offset=start + i * isa.WORD_BYTES,
            )
        return isa.decode(words, self.widths)
