"""The crossbar instruction set, defined once as a table.

Every instruction is one 128-bit little-endian word: the opcode in bits 0..5, then
the operand fields in table order, each ``bits`` wide (two's complement where
``signed``). Per instruction the table also says what it costs (latency class, unit,
scaling), which buffers it reads and writes (the scoreboard and the verifier's dataflow)
and what it adds to the ``SimStats`` counters. The encoder, decoder, assembler,
disassembler, verifier, the static cost model, both simulator backends (the compiled
core's dispatch and operand layout are generated from this table) and ``docs/isa.md``
all read it. Adding an instruction is one row here, an ``execute_<mnemonic>`` in
``reference.py`` and an ``_execute_<mnemonic>`` in ``_core.pyx``.

In memory a decoded program is an ``int64`` array of shape ``[n, 1 + MAX_OPERANDS]``:
column 0 the opcode, then the operands in table order, unused columns zero.

Format version 3 widened buffer fields to 16 bits and crossbar fields to 12 (a program
may name 65,536 buffers on a chip of 4,096 crossbars) and added the ``row`` fields that
let an instruction act on a window of a buffer's rows (``im2col`` ``oh0``, ``acc``
``dst_row``). ``NARROW_FIELDS`` gives the widths of version 2 (no ``row`` fields: zero
bits, decoded as 0), which the encoder and decoder still take for older files.

This module imports nothing of the package: the build runs the core's generator on it
before the package is installed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

OPCODE_BITS = 6
WORD_BYTES = 16

#: Operand kinds, with the assembler's prefix for the kinds that index a table.
KIND_PREFIX = {"buffer": "b", "crossbar": "x", "image": "img", "const": "c", "tensor": "t"}

#: The resources an instruction may occupy: the crossbar it names, or one shared unit.
UNITS = ("crossbar", "digital", "io", "control")

#: The ``SimStats`` counters instructions add to (see ``Count``).
COUNTERS = ("crossbar_writes", "mvm_executions", "cell_macs", "adc_conversions", "digital_ops")


@dataclass(frozen=True)
class Field:
    """One operand: its name, width in bits, kind and meaning."""

    name: str
    bits: int
    kind: str  # buffer | crossbar | image | const | tensor | column | row | count | shift | flag | int
    doc: str
    signed: bool = False

    @property
    def min_value(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def max_value(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1


@dataclass(frozen=True)
class Count:
    """What one instruction adds to the ``SimStats`` counter ``counter``.

    The vectors it treats (1 for an instruction that is not per vector), times the value
    of ``operand`` where given, times the cells of the image its crossbar holds where
    ``per_cell``; for a per-item instruction, the items instead of the vectors.
    """

    counter: str
    operand: str | None = None
    per_cell: bool = False


@dataclass(frozen=True)
class InstrSpec:
    """One instruction: opcode, mnemonic, operands, cost, dataflow and counts."""

    opcode: int
    mnemonic: str
    fields: tuple[Field, ...]
    latency_class: str | None  # key of CimArch.latency_ps(), or None for free
    unit: str  # one of UNITS: the resource it occupies
    per_vector: bool  # latency and energy scale with the input vectors it treats
    doc: str
    #: Buffer operand whose rows per item give the vectors a per-vector instruction treats
    #: (``batch * rows``): the buffer it acts on.
    rows_from: str | None = None
    #: Buffer operands whose contents it reads, and those it writes.
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    counts: tuple[Count, ...] = ()
    #: Latency and counts scale with the batch's items (not its vectors): the
    #: instruction does its work once per item, as writing each item's own operand.
    per_item: bool = False
    #: Const operand whose geometry (``PROGB_PARAMS``) gives the cells the instruction
    #: writes into its crossbar, for the ``per_cell`` counts of the mvms that follow.
    cells_from: str | None = None

    def field_index(self, name: str) -> int:
        """Operand column (1-based, after the opcode) of field ``name``."""
        for i, f in enumerate(self.fields):
            if f.name == name:
                return i + 1
        raise KeyError(name)

    def field(self, name: str) -> Field:
        """The operand field ``name``."""
        return self.fields[self.field_index(name) - 1]

    def operand(self, kind: str) -> str | None:
        """Name of the first operand of ``kind``, or None."""
        return next((f.name for f in self.fields if f.kind == kind), None)


#: Widths of the index fields, by kind; every other field's width is its own.
INDEX_BITS = {"buffer": 16, "crossbar": 12, "row": 24}
#: The field widths of format version 2: 256 buffers, 256 crossbars, no row fields.
NARROW_FIELDS = {"buffer": 8, "crossbar": 8, "row": 0}
#: Field kinds the assembler lets a line omit (read as 0).
OPTIONAL_KINDS = ("flag", "row")


def _buf(name: str, doc: str) -> Field:
    return Field(name, INDEX_BITS["buffer"], "buffer", doc)


def _xb(doc: str) -> Field:
    return Field("xb", INDEX_BITS["crossbar"], "crossbar", doc)


def _col(name: str, doc: str) -> Field:
    return Field(name, 16, "column", doc)


_NCOLS = Field("ncols", 16, "count", "number of columns")


def _buffer_to_buffer(dst: str, src: str) -> tuple[Field, ...]:
    """``dst``, ``dst_col``, ``src``, ``src_col``, ``ncols``: columns of one buffer
    combined into another's; ``dst`` and ``src`` name the buffers' roles."""
    return (
        _buf("dst", f"{dst} buffer"),
        _col("dst_col", f"first {dst} column"),
        _buf("src", f"{src} buffer"),
        _col("src_col", f"first {src} column"),
        _NCOLS,
    )


#: Most columns a column field addresses: the widest buffer, tensor or weight-matrix side.
MAX_COLUMNS = _NCOLS.max_value


def _buffer_op(
    opcode: int, mnemonic: str, fields: tuple[Field, ...], latency_class: str, doc: str
) -> InstrSpec:
    """A digital instruction that combines ``src`` columns into ``dst`` columns, vector
    by vector: one digital op per vector."""
    return InstrSpec(
        opcode,
        mnemonic,
        fields,
        latency_class,
        "digital",
        True,
        doc,
        rows_from="dst",
        reads=("src",),
        writes=("dst",),
        counts=(Count("digital_ops"),),
    )


INSTRUCTIONS: tuple[InstrSpec, ...] = (
    InstrSpec(0, "halt", (), None, "control", False, "End of program; must be the last word."),
    InstrSpec(
        1,
        "prog",
        (
            _xb("crossbar to program"),
            Field("image", 16, "image", "weight-slice image to write into it"),
        ),
        "write",
        "crossbar",
        False,
        "Program crossbar `xb` with weight image `image` (one crossbar write).",
        counts=(Count("crossbar_writes"),),
    ),
    InstrSpec(
        2,
        "load",
        (
            _buf("dst", "destination buffer"),
            _col("dst_col", "first destination column"),
            Field("tensor", 8, "tensor", "input tensor"),
            _col("src_col", "first tensor column"),
            _NCOLS,
        ),
        "load_store",
        "io",
        True,
        "Copy columns of an input tensor into a buffer, for every input vector.",
        rows_from="dst",
        writes=("dst",),
    ),
    InstrSpec(
        3,
        "mvm",
        (
            _xb("crossbar to drive"),
            _buf("src", "buffer holding the integer input vectors"),
            _col("src_col", "column of `src` driving the crossbar's first input row"),
            Field("bit", 6, "shift", "lowest input bit of this step"),
            Field("signed", 1, "flag", "sign-extend the chunk (top step of signed inputs)"),
        ),
        "mvm",
        "crossbar",
        True,
        "One bit-serial step: drive the `dac_bits`-wide chunk of each input vector starting "
        "at `bit` into crossbar `xb` and hold its column sums (differential rows subtract).",
        rows_from="src",
        reads=("src",),
        counts=(Count("mvm_executions"), Count("cell_macs", per_cell=True)),
    ),
    InstrSpec(
        4,
        "adc",
        (
            _buf("dst", "destination buffer"),
            _col("dst_col", "first destination column"),
            _xb("crossbar whose held column sums are read"),
            _col("col", "first crossbar column"),
            _NCOLS,
            Field("shift", 6, "shift", "ADC step is 2**shift column-sum units (0 if lossless)"),
            Field("signed", 1, "flag", "bipolar ADC code range"),
        ),
        "adc",
        "crossbar",
        True,
        "Convert held column sums through the ADC (round, saturate to `adc_bits`) into a "
        "buffer, overwriting it.",
        rows_from="dst",
        writes=("dst",),
        counts=(Count("adc_conversions", operand="ncols"),),
    ),
    _buffer_op(
        5,
        "shadd",
        _buffer_to_buffer("accumulator", "source")
        + (
            Field("shift", 6, "shift", "left shift (input step and weight slice significance)"),
            Field("neg", 1, "flag", "subtract instead of add (negative polarity, offset)"),
            Field("bcast", 1, "flag", "broadcast the single column `src_col` to all columns"),
        ),
        "shift_add",
        "Shift-and-add: `dst[:, dst_col:+ncols] += (-1)**neg * (src[...] << shift)`.",
    ),
    InstrSpec(
        6,
        "acc",
        _buffer_to_buffer("accumulator", "partial-sum")
        + (Field("dst_row", INDEX_BITS["row"], "row", "first destination row of each item"),),
        "shift_add",
        "digital",
        True,
        "Accumulate partial sums: `dst` rows `dst_row ..` of each item `+= src` (all its rows "
        "per item; `dst_row` 0 with equal rows adds whole buffers, another crossbar's or "
        "another replica's partial sums).",
        rows_from="src",
        reads=("src",),
        writes=("dst",),
        counts=(Count("digital_ops"),),
    ),
    _buffer_op(
        7,
        "req",
        _buffer_to_buffer("destination", "accumulator")
        + (
            Field("params", 16, "const", "[3, >=ncols] constant: bias, multiplier, shift"),
            Field("zp", 16, "int", "output zero point", signed=True),
            Field("bits", 5, "count", "output code width (1..31)"),
            Field("signed", 1, "flag", "signed output codes"),
            Field("relu", 1, "flag", "clamp below at the zero point"),
        ),
        "requant",
        "Requantize: `clamp(round((src + bias) * multiplier / 2**shift) + zp)` per column.",
    ),
    InstrSpec(
        8,
        "store",
        (
            Field("tensor", 8, "tensor", "output tensor"),
            _col("dst_col", "first tensor column"),
            _buf("src", "source buffer"),
            _col("src_col", "first source column"),
            _NCOLS,
        ),
        "load_store",
        "io",
        True,
        "Copy buffer columns into an output tensor (cast to its dtype).",
        rows_from="src",
        reads=("src",),
    ),
    InstrSpec(
        9,
        "im2col",
        (
            _buf(
                "dst", "destination buffer: `OW` rows per output row of its window, `KH*KW*C` wide"
            ),
            _buf("src", "source buffer: an NHWC image, `H*W` rows of `C` columns per item"),
            Field("params", 16, "const", "[1, 15] constant: the convolution geometry"),
            Field("pad", 16, "int", "value of taps outside the image (zero point)", signed=True),
            Field("oh0", INDEX_BITS["row"], "row", "first output row `oh` of the window"),
        ),
        "load_store",
        "digital",
        True,
        "Unfold convolution windows of output rows `oh0 ..` (as many as `dst`'s rows per "
        "item cover, `OW` each): `dst` row `(oh - oh0)*OW + ow`, column `(kh*KW + kw)*C + c` "
        "becomes `src` row `h*W + w`, column `c`, where `h = oh*stride_h - pad_top + "
        "kh*dil_h` and `w = ow*stride_w - pad_left + kw*dil_w`, or `pad` where `(h, w)` "
        "falls outside the image. `params` holds `H, W, C, KH, KW, stride_h, stride_w, "
        "pad_top, pad_left, pad_bottom, pad_right, dil_h, dil_w, OH, OW`. Overwrites `dst`.",
        rows_from="dst",
        reads=("src",),
        writes=("dst",),
    ),
    InstrSpec(
        10,
        "progb",
        (
            _xb("crossbar to program"),
            _buf("src", "buffer holding each item's operand"),
            Field("params", 16, "const", "[1, 9] constant: the operand's geometry and tile"),
        ),
        "write",
        "crossbar",
        False,
        "Program crossbar `xb` from a buffer, item by item: each item's operand, the "
        "`[K, N]` matrix at `src` rows `0..K-1`, columns `col..col+N-1` of that item (with "
        "`transpose`, the transpose of rows `0..N-1`, columns `col..col+K-1`), of signed "
        "`bits`-wide integers, is sliced and sign-mapped as the arch maps weights, and the "
        "cells of its logical tile (inputs `r0..r1-1`, logical columns `c0..c1-1`) are "
        "written. The crossbar then holds one matrix per item: an `mvm` multiplies each "
        "item's vectors by its own, until a `prog` writes an image again. A value outside "
        "signed `bits` is a run-time error. `params` holds `col, K, N, transpose, bits, r0, "
        "r1, c0, c1`. One crossbar write per item.",
        reads=("src",),
        counts=(Count("crossbar_writes"),),
        per_item=True,
        cells_from="params",
    ),
)

BY_OPCODE: dict[int, InstrSpec] = {spec.opcode: spec for spec in INSTRUCTIONS}
BY_MNEMONIC: dict[str, InstrSpec] = {spec.mnemonic: spec for spec in INSTRUCTIONS}
MAX_OPERANDS = max(len(spec.fields) for spec in INSTRUCTIONS)
OP = {spec.mnemonic.upper(): spec.opcode for spec in INSTRUCTIONS}  # OP["MVM"] == 3


def table_size(kind: str) -> int:
    """Most entries a program's table of ``kind`` may hold: what its narrowest index
    field addresses (``buffer``, ``crossbar`` or ``tensor``)."""
    return min(f.max_value for s in INSTRUCTIONS for f in s.fields if f.kind == kind) + 1


#: Most buffers, and most input (or output) tensors, a program may have.
MAX_BUFFERS = table_size("buffer")
MAX_TENSORS = table_size("tensor")

#: The values of an ``im2col`` params constant (shape ``[1, 15]``), in order.
IM2COL_PARAMS = (
    "H",
    "W",
    "C",
    "KH",
    "KW",
    "stride_h",
    "stride_w",
    "pad_top",
    "pad_left",
    "pad_bottom",
    "pad_right",
    "dil_h",
    "dil_w",
    "OH",
    "OW",
)

#: The values of a ``progb`` params constant (shape ``[1, 9]``), in order: the operand's
#: first buffer column, its inputs ``K`` and outputs ``N``, whether the buffer holds it
#: transposed, its width in bits (signed), and the tile: inputs ``r0 .. r1`` (the
#: crossbar's input rows, end excluded) and logical columns ``c0 .. c1`` (end excluded).
PROGB_PARAMS = ("col", "K", "N", "transpose", "bits", "r0", "r1", "c0", "c1")
#: Widest operand a ``progb`` maps.
PROGB_MAX_BITS = 16


def progb_geometry(params) -> dict[str, int]:
    """The values of a ``progb`` params constant's row by name (``PROGB_PARAMS``)."""
    return dict(zip(PROGB_PARAMS, (int(v) for v in params)))


def progb_tile(params, differential_rows: bool) -> tuple[int, int, int]:
    """``(inputs, physical rows, columns)`` of the tile a ``progb`` with the values of
    ``PROGB_PARAMS`` writes (differential rows take two physical rows per input)."""
    g = progb_geometry(params)
    inputs = g["r1"] - g["r0"]
    return inputs, inputs * (2 if differential_rows else 1), g["c1"] - g["c0"]


def _check_table() -> None:
    """The facts every row must respect; a broken row fails at import."""
    assert len(BY_OPCODE) == len(BY_MNEMONIC) == len(INSTRUCTIONS)
    for spec in INSTRUCTIONS:
        names = {f.name for f in spec.fields}
        kinds = {f.name: f.kind for f in spec.fields}
        where = spec.mnemonic
        assert 0 <= spec.opcode < 1 << OPCODE_BITS, where
        assert len(names) == len(spec.fields), where
        # every word must fit 128 bits
        assert OPCODE_BITS + sum(f.bits for f in spec.fields) <= 8 * WORD_BYTES, where
        assert spec.unit in UNITS, where
        assert spec.unit != "crossbar" or spec.operand("crossbar"), where
        # a per-vector instruction scales with the rows of one of its buffers
        assert (spec.rows_from is not None) == spec.per_vector, where
        assert not (spec.per_item and spec.per_vector), where
        assert spec.cells_from is None or kinds[spec.cells_from] == "const", where
        assert spec.cells_from is None or spec.unit == "crossbar", where
        assert spec.rows_from is None or kinds[spec.rows_from] == "buffer", where
        assert all(kinds.get(b) == "buffer" for b in spec.reads + spec.writes), where
        for c in spec.counts:
            assert c.counter in COUNTERS, where
            assert c.operand is None or c.operand in names, where
            assert not c.per_cell or spec.unit == "crossbar", where


_check_table()


def fingerprint() -> str:
    """Digest of what the compiled core is generated from: opcodes, operands (names,
    widths, kinds), units, scaling (per vector, per item), buffer reads and writes,
    counts and where written cells come from; not the docs."""
    facts: list = [OPCODE_BITS, UNITS, COUNTERS]
    for s in INSTRUCTIONS:
        fields = [(f.name, f.bits, f.kind, f.signed) for f in s.fields]
        counts = [(c.counter, c.operand, c.per_cell) for c in s.counts]
        facts.append(
            (s.opcode, s.mnemonic, fields, s.latency_class, s.unit, s.per_vector, s.rows_from)
            + (s.reads, s.writes, counts, s.per_item, s.cells_from)
        )
    facts.append(PROGB_PARAMS)
    return hashlib.sha256(repr(facts).encode()).hexdigest()[:16]


def _layout(spec: InstrSpec, widths: dict[str, int] | None = None) -> list[tuple[int, Field]]:
    """Bit offset of each operand field, with the widths of ``widths`` (by kind, for an
    older format) where it names the field's kind."""
    offset, out = OPCODE_BITS, []
    for f in spec.fields:
        if widths and f.kind in widths:
            f = Field(f.name, widths[f.kind], f.kind, f.doc, f.signed)
        out.append((offset, f))
        offset += f.bits
    return out


def encode(code: np.ndarray, widths: dict[str, int] | None = None) -> bytes:
    """Pack decoded instructions (``[n, 1 + MAX_OPERANDS]`` int64) into 16-byte words
    (``widths``: the index widths of an older format, as ``NARROW_FIELDS``).

    Operands must already fit their fields (``Program`` checks on construction).
    """
    code = np.asarray(code, dtype=np.int64).reshape(-1, 1 + MAX_OPERANDS)
    lo = np.zeros(len(code), dtype=np.uint64)
    hi = np.zeros(len(code), dtype=np.uint64)
    for spec in INSTRUCTIONS:
        rows = code[:, 0] == spec.opcode
        if not rows.any():
            continue
        lo[rows] |= np.uint64(spec.opcode)
        for col, (offset, f) in enumerate(_layout(spec, widths), start=1):
            raw = code[rows, col].astype(np.uint64) & np.uint64((1 << f.bits) - 1)
            _put(lo, hi, rows, raw, offset, f.bits)
    return np.stack([lo, hi], axis=1).astype("<u8").tobytes()


def _put(lo, hi, rows, raw, offset, bits):
    if offset + bits <= 64:
        lo[rows] |= raw << np.uint64(offset)
    elif offset >= 64:
        hi[rows] |= raw << np.uint64(offset - 64)
    else:  # straddles the two halves
        lo[rows] |= raw << np.uint64(offset)
        hi[rows] |= raw >> np.uint64(64 - offset)


def decode(words: bytes, widths: dict[str, int] | None = None) -> np.ndarray:
    """Unpack 16-byte words into ``[n, 1 + MAX_OPERANDS]`` int64 rows (``widths`` as for
    ``encode``).

    Unknown opcodes are kept in column 0 with zero operands; the verifier rejects them.
    """
    pairs = np.frombuffer(words, dtype="<u8").reshape(-1, 2)
    lo, hi = pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64)
    code = np.zeros((len(pairs), 1 + MAX_OPERANDS), dtype=np.int64)
    code[:, 0] = (lo & np.uint64((1 << OPCODE_BITS) - 1)).astype(np.int64)
    for spec in INSTRUCTIONS:
        rows = code[:, 0] == spec.opcode
        if not rows.any():
            continue
        for col, (offset, f) in enumerate(_layout(spec, widths), start=1):
            raw = _get(lo[rows], hi[rows], offset, f.bits).astype(np.int64)
            if f.signed:
                raw = np.where(raw >= (1 << (f.bits - 1)), raw - (1 << f.bits), raw)
            code[rows, col] = raw
    return code


def _get(lo, hi, offset, bits):
    mask = np.uint64((1 << bits) - 1)
    if offset + bits <= 64:
        return (lo >> np.uint64(offset)) & mask
    if offset >= 64:
        return (hi >> np.uint64(offset - 64)) & mask
    return ((lo >> np.uint64(offset)) | (hi << np.uint64(64 - offset))) & mask


def unused_operand_bits(words: bytes, widths: dict[str, int] | None = None) -> np.ndarray:
    """Boolean per word: does it set bits beyond its opcode's fields (``widths`` as for
    ``encode``)?

    A well-formed encoder never does; the verifier treats such words as corrupt.
    """
    pairs = np.frombuffer(words, dtype="<u8").reshape(-1, 2)
    lo, hi = pairs[:, 0], pairs[:, 1]
    ops = (lo & np.uint64((1 << OPCODE_BITS) - 1)).astype(np.int64)
    bad = np.zeros(len(pairs), dtype=bool)
    for spec in INSTRUCTIONS:
        offset, last = _layout(spec, widths)[-1] if spec.fields else (OPCODE_BITS, None)
        used = offset + (last.bits if last else 0)
        rows = ops == spec.opcode
        if used < 64:
            bad[rows] = ((lo[rows] >> np.uint64(used)) != 0) | (hi[rows] != 0)
        else:
            bad[rows] = (hi[rows] >> np.uint64(used - 64)) != 0 if used < 128 else False
    return bad
