"""The binary program format, assembly text and instruction encoding round-trip."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import random_weights
from tvm_cim import CimArch
from tvm_cim.codegen import lower_matmul
from tvm_cim.core.errors import ProgramError
from tvm_cim.core.quant import Requantize
from tvm_cim.sim import (
    Program,
    ProgramBuilder,
    TensorDesc,
    assemble,
    disassemble,
    im2col_params,
    isa,
    verify,
)
from tvm_cim.sim import program as program_module


def assert_same_program(a: Program, b: Program) -> None:
    assert a.name == b.name
    assert a.arch == b.arch
    assert a.code.dtype == b.code.dtype == np.int64
    assert np.array_equal(a.code, b.code)
    assert a.inputs == b.inputs
    assert a.outputs == b.outputs
    assert a.buffers == b.buffers
    assert a.buffer_rows == b.buffer_rows
    assert a.attrs == b.attrs
    assert len(a.images) == len(b.images)
    for ia, ib in zip(a.images, b.images):
        assert ia.cells.dtype == ib.cells.dtype == np.uint8
        assert np.array_equal(ia.cells, ib.cells)
        assert ia.differential_rows == ib.differential_rows
    assert len(a.constants) == len(b.constants)
    for ca, cb in zip(a.constants, b.constants):
        assert ca.dtype == cb.dtype == np.int64
        assert np.array_equal(ca, cb)


def hand_built() -> Program:
    """Two inputs, two outputs, a constant and a fixed batch, built by hand."""
    arch = CimArch(rows=12, cols=6, cell_bits=3, dac_bits=2, adc_bits=7, crossbars=2, name="hand")
    b = ProgramBuilder(arch, "hand built")
    x = b.input(TensorDesc("x", 5, "int8", 6, True, 4))
    z = b.input(TensorDesc("z", 3, "uint16", 12, False, 4))
    y = b.output(TensorDesc("y", 4, "int16", 9, True, 4))
    b.output(TensorDesc("w", 3, "int64", 64, True, 4))
    buf = b.buffer(8)
    acc = b.buffer(6)
    out = b.buffer(6)
    img = b.image(np.arange(20, dtype=np.uint8).reshape(10, 2) % 8, differential_rows=True)
    b.image(np.full((8, 6), 7, dtype=np.uint8))
    c = b.constant(np.array([[1, -2, 3, -4, 5, 6], [7, 8, 9, 10, 11, 12], [0, 1, 2, 3, 4, 62]]))
    b.constant(np.array([[-(2**63), 2**63 - 1]]))
    b.emit("load", dst=buf, dst_col=1, tensor=x, src_col=0, ncols=5)
    b.emit("load", dst=acc, dst_col=0, tensor=z, src_col=0, ncols=3)
    b.emit("prog", xb=1, image=img)
    b.emit("mvm", xb=1, src=buf, src_col=2, bit=4, signed=1)
    b.emit("adc", dst=out, dst_col=3, xb=1, col=0, ncols=2, shift=3, signed=1)
    b.emit("shadd", dst=acc, dst_col=0, src=out, src_col=3, ncols=4, shift=62, neg=1, bcast=1)
    b.emit("acc", dst=acc, dst_col=2, src=out, src_col=1, ncols=4)
    b.emit("req", dst=out, dst_col=0, src=acc, src_col=0, ncols=6, params=c, zp=-32768, bits=31)
    b.emit(
        "req",
        dst=out,
        dst_col=0,
        src=acc,
        src_col=0,
        ncols=4,
        params=c,
        zp=32767,
        bits=1,
        signed=1,
        relu=1,
    )
    b.emit("store", tensor=y, dst_col=0, src=out, src_col=2, ncols=4)
    b.emit("halt")
    return b.build()


def conv_built() -> Program:
    """Rows per item, im2col and attrs: a 3x3 conv of a 4x5x2 image, fixed batch 2."""
    arch = CimArch(rows=18, cols=8, cell_bits=2, crossbars=1, name="conv; with a semicolon")
    b = ProgramBuilder(arch, "conv")
    x = b.input(TensorDesc("x", 2, "uint8", 4, False, 2, rows=20))
    y = b.output(TensorDesc("y", 8, "int32", 32, True, 2, rows=6))
    src, cols, out = b.buffer(2, rows=20), b.buffer(18, rows=6), b.buffer(8, rows=6)
    b.buffer(3)
    img = b.image(np.arange(144, dtype=np.uint8).reshape(18, 8) % 4)
    params = b.constant(im2col_params(4, 5, 2, (3, 3), (1, 2), (0, 1, 1, 0), (1, 1)))
    b.emit("load", dst=src, dst_col=0, tensor=x, src_col=0, ncols=2)
    b.emit("im2col", dst=cols, src=src, params=params, pad=-32768)
    b.emit("prog", xb=0, image=img)
    b.emit("mvm", xb=0, src=cols, src_col=0, bit=0)
    b.emit("adc", dst=out, dst_col=0, xb=0, col=0, ncols=8)
    b.emit("store", tensor=y, dst_col=0, src=out, src_col=0, ncols=8)
    b.emit("halt")
    b.attrs = {
        "inputs": {"x": {"scale": 0.025, "zero_point": 3, "layout": "NHWC", "shape": [4, 5, 2]}},
        "outputs": {"y": {"scale": [0.5, 0.25], "note": 'a; b "quoted" \u00e9\n'}},
        "empty": {},
        "none": None,
    }
    return b.build()


def example_programs() -> dict[str, Program]:
    rng = np.random.default_rng(0)
    w = random_weights(rng, 30, 7, 6)
    small = CimArch(rows=16, cols=24, cell_bits=2, adc_bits=5, crossbars=3)
    return {
        "dc": lower_matmul(w, w_bits=6, a_bits=5, arch=small, name="dc"),
        "dr": lower_matmul(
            w, w_bits=6, a_bits=5, arch=small.replace(mapping="dr"), signed_input=True
        ),
        "of-requant": lower_matmul(
            w,
            w_bits=6,
            a_bits=8,
            arch=small.replace(mapping="of", adc_bits=None, clock_ghz=1.25, adc_energy_nj=0.5),
            requant=Requantize(
                multiplier=np.arange(1, 8) * 1000, shift=np.arange(10, 17), zero_point=-7, bias=5
            ),
            batch=3,
            name="offset with requant",
        ),
        "paper": lower_matmul(
            random_weights(rng, 300, 20, 8), w_bits=8, a_bits=8, arch=CimArch.preset("rram-2b")
        ),
        "hand": hand_built(),
        "conv": conv_built(),
    }


PROGRAMS = example_programs()


@pytest.mark.parametrize("key", sorted(PROGRAMS))
def test_save_load_round_trip(key, tmp_path):
    program = PROGRAMS[key]
    verify(program)
    path = tmp_path / f"{key}.cimprog"
    program.save(path)
    loaded = Program.load(path)
    assert_same_program(program, loaded)
    verify(loaded)
    assert loaded.to_bytes() == program.to_bytes() == path.read_bytes()


@pytest.mark.parametrize("key", sorted(PROGRAMS))
def test_asm_round_trip(key):
    program = PROGRAMS[key]
    text = disassemble(program)
    assembled = assemble(text)
    assert_same_program(program, assembled)
    reloaded = Program.from_bytes(assembled.to_bytes())
    assert disassemble(reloaded) == text
    assert_same_program(program, reloaded)


def test_asm_is_readable():
    text = disassemble(PROGRAMS["hand"])
    lines = text.splitlines()
    assert lines[0] == ".program hand built"
    assert lines[1].startswith(".arch {")
    assert ".input x width=5 dtype=int8 bits=6 signed=1 batch=4" in lines
    assert ".buffer b2 width=6" in lines
    code = lines[lines.index(".code") + 1 :]
    assert len(code) == len(PROGRAMS["hand"])
    assert code[0].split(";")[0].split() == [
        "load",
        "dst=b0",
        "dst_col=1",
        "tensor=t0",
        "src_col=0",
        "ncols=5",
    ]
    assert "zp=-32768" in code[7]
    assert code[-1].split()[0] == "halt"


def test_asm_rows_and_attrs():
    program = PROGRAMS["conv"]
    text = disassemble(program)
    lines = text.splitlines()
    assert ".input x width=2 dtype=uint8 bits=4 signed=0 batch=2 rows=20" in lines
    assert ".output y width=8 dtype=int32 bits=32 signed=1 batch=2 rows=6" in lines
    assert ".buffer b1 width=18 rows=6" in lines
    assert ".buffer b3 width=3" in lines  # one row per item: the old syntax
    attrs = [line for line in lines if line.startswith(".attrs ")]
    assert len(attrs) == 1 and ";" not in attrs[0]
    assert json.loads(attrs[0][len(".attrs ") :]) == program.attrs
    assert ";" not in lines[1]  # the arch's name, escaped
    code = lines[lines.index(".code") + 1 :]
    assert code[1].split(";")[0].split() == [
        "im2col",
        "dst=b1",
        "src=b0",
        "params=c0",
        "pad=-32768",
        "oh0=0",
    ]
    # rows and attrs may be written by hand, in any order of keys
    edited = text.replace(".buffer b1 width=18 rows=6", ".buffer b1 rows=6 width=18")
    assert_same_program(assemble(edited), program)
    without = "\n".join(line for line in lines if not line.startswith(".attrs"))
    assert assemble(without).attrs == {}
    assert ".attrs" not in disassemble(PROGRAMS["hand"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace(".attrs {", ".attrs {{"), r"line 3: bad \.attrs"),
        (lambda t: t.replace(".attrs {", ".attrs [{") + "]", r"line 3: bad \.attrs"),
        (
            lambda t: t.replace(".input", '.attrs {"a": 1}\n.input', 1),
            r"line 4: duplicate \.attrs",
        ),
        (lambda t: '.attrs {"a": 1}\n' + t, r"line 1: \.attrs before \.arch"),
        (lambda t: t.replace("rows=6\n", "rows=six\n", 1), r"rows='six' is not an integer"),
        (lambda t: t.replace(".attrs {", '.attrs ["not", "an", "object"] ; {'), r"expected a JSON"),
    ],
)
def test_asm_attrs_errors(edit, match):
    text = disassemble(PROGRAMS["conv"])
    with pytest.raises(ProgramError, match=match):
        assemble(edit(text))


def test_attrs_must_be_json():
    program = conv_built()
    program.attrs = {"x": np.int64(3)}
    with pytest.raises(ProgramError, match="program attrs are not plain JSON"):
        program.to_bytes()
    program.attrs = {"x": [1, 2.5, "s", None, True, {"y": []}]}
    assert Program.from_bytes(program.to_bytes()).attrs == program.attrs


def test_asm_accepts_comments_and_omitted_flags():
    text = disassemble(PROGRAMS["hand"])
    edited = text.replace("signed=0 relu=0", "").replace(".code", "; the code\n.code ; starts")
    assert edited != text
    assert_same_program(assemble(edited), PROGRAMS["hand"])


# --------------------------------------------------------------- instructions


def word_from_fields(spec: isa.InstrSpec, values: list[int]) -> int:
    """The 128-bit word, built with Python ints from the documented layout."""
    word, offset = spec.opcode, isa.OPCODE_BITS
    for f, v in zip(spec.fields, values):
        word |= (v & ((1 << f.bits) - 1)) << offset
        offset += f.bits
    return word


def random_row(rng: np.random.Generator, spec: isa.InstrSpec) -> list[int]:
    row = [spec.opcode]
    for f in spec.fields:
        pick = rng.integers(4)
        if pick == 0:
            row.append(f.min_value)
        elif pick == 1:
            row.append(f.max_value)
        else:
            row.append(int(rng.integers(f.min_value, f.max_value + 1)))
    return row + [0] * (1 + isa.MAX_OPERANDS - len(row))


@pytest.mark.parametrize("spec", isa.INSTRUCTIONS, ids=lambda s: s.mnemonic)
def test_encode_decode_every_instruction(spec):
    rng = np.random.default_rng(spec.opcode)
    rows = [random_row(rng, spec) for _ in range(300)]
    rows.append([spec.opcode] + [f.min_value for f in spec.fields])
    rows.append([spec.opcode] + [f.max_value for f in spec.fields])
    rows = [r + [0] * (1 + isa.MAX_OPERANDS - len(r)) for r in rows]
    code = np.array(rows, dtype=np.int64)
    words = isa.encode(code)
    assert len(words) == isa.WORD_BYTES * len(code)
    assert np.array_equal(isa.decode(words), code)
    assert not isa.unused_operand_bits(words).any()
    for i, row in enumerate(rows):
        raw = int.from_bytes(words[16 * i : 16 * (i + 1)], "little")
        assert raw == word_from_fields(spec, row[1:]), (spec.mnemonic, row)
        assert raw & ((1 << isa.OPCODE_BITS) - 1) == spec.opcode


@given(st.data())
def test_encode_decode_mixed_programs(data):
    specs = data.draw(st.lists(st.sampled_from(isa.INSTRUCTIONS), min_size=1, max_size=30))
    rows = []
    for spec in specs:
        values = [data.draw(st.integers(f.min_value, f.max_value)) for f in spec.fields]
        rows.append([spec.opcode, *values] + [0] * (isa.MAX_OPERANDS - len(values)))
    code = np.array(rows, dtype=np.int64)
    words = isa.encode(code)
    assert np.array_equal(isa.decode(words), code)
    for i, (spec, row) in enumerate(zip(specs, rows)):
        assert int.from_bytes(words[16 * i : 16 * i + 16], "little") == word_from_fields(
            spec, row[1:]
        )


@pytest.mark.parametrize("zp", [-32768, -32767, -1, 0, 1, 12345, 32767])
def test_signed_zero_point_field(zp):
    spec = isa.BY_MNEMONIC["req"]
    col = spec.field_index("zp")
    row = np.zeros((1, 1 + isa.MAX_OPERANDS), dtype=np.int64)
    row[0, 0] = spec.opcode
    row[0, col] = zp
    words = isa.encode(row)
    assert isa.decode(words)[0, col] == zp
    offset = isa.OPCODE_BITS + sum(f.bits for f in spec.fields[: col - 1])
    raw = int.from_bytes(words, "little")
    assert (raw >> offset) & 0xFFFF == zp & 0xFFFF  # two's complement in 16 bits


def test_every_field_bit_is_decoded():
    """Setting any single operand bit changes exactly one decoded operand."""
    for spec in isa.INSTRUCTIONS:
        used = isa.OPCODE_BITS + sum(f.bits for f in spec.fields)
        for bit in range(isa.OPCODE_BITS, 128):
            word = (spec.opcode | (1 << bit)).to_bytes(16, "little")
            assert bool(isa.unused_operand_bits(word)[0]) == (bit >= used)
            if bit < used:
                decoded = isa.decode(word)[0]
                assert decoded[0] == spec.opcode
                assert np.count_nonzero(decoded[1:]) == 1


def test_isa_table_is_consistent():
    assert [s.opcode for s in isa.INSTRUCTIONS] == list(range(len(isa.INSTRUCTIONS)))
    assert isa.INSTRUCTIONS[0].mnemonic == "halt"
    for spec in isa.INSTRUCTIONS:
        assert isa.OPCODE_BITS + sum(f.bits for f in spec.fields) <= 128
        assert len(spec.fields) <= isa.MAX_OPERANDS
        assert isa.OP[spec.mnemonic.upper()] == spec.opcode
    assert [f.name for f in isa.BY_MNEMONIC["req"].fields if f.signed] == ["zp"]


# ------------------------------------------------------------------ file header


def sections(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """``(tag, payload offset, payload)`` per section, walking the documented layout."""
    count = struct.unpack_from("<I", data, 12)[0]
    out, pos = [], 16
    for _ in range(count):
        tag, reserved, length = struct.unpack_from("<4sIQ", data, pos)
        assert reserved == 0
        out.append((tag, pos + 16, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    assert pos == len(data) - 4
    return out


@pytest.mark.parametrize("key", sorted(PROGRAMS))
def test_header_layout(key):
    program = PROGRAMS[key]
    data = program.to_bytes()
    assert data[0:8] == b"CIMPROG\0" == program_module.MAGIC
    assert struct.unpack_from("<H", data, 8)[0] == 3 == program_module.FORMAT_VERSION
    assert struct.unpack_from("<H", data, 10)[0] == 0
    assert struct.unpack_from("<I", data, 12)[0] == 4
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])

    parts = sections(data)
    assert [tag for tag, _, _ in parts] == [b"META", b"IMGS", b"CNST", b"INST"]
    meta = json.loads(parts[0][2].decode("utf-8"))
    assert meta["name"] == program.name
    assert CimArch.from_dict(meta["arch"]) == program.arch
    assert meta["buffers"] == program.buffers
    assert meta["buffer_rows"] == program.buffer_rows
    assert meta["attrs"] == program.attrs
    assert [TensorDesc.from_dict(t) for t in meta["inputs"]] == program.inputs
    assert [TensorDesc.from_dict(t) for t in meta["outputs"]] == program.outputs

    imgs = parts[1][2]
    assert struct.unpack_from("<I", imgs, 0)[0] == len(program.images)
    pos = 4
    for img in program.images:
        rows, cols, flags = struct.unpack_from("<HHB", imgs, pos)
        assert (rows, cols, flags) == (img.physical_rows, img.cols, int(img.differential_rows))
        assert imgs[pos + 8 : pos + 8 + rows * cols] == img.cells.tobytes()
        pos += 8 + rows * cols
    assert pos == len(imgs)

    consts = parts[2][2]
    assert struct.unpack_from("<I", consts, 0)[0] == len(program.constants)
    pos = 4
    for c in program.constants:
        assert struct.unpack_from("<II", consts, pos) == c.shape
        n = 8 * c.size
        assert np.array_equal(np.frombuffer(consts[pos + 8 : pos + 8 + n], "<i8"), c.ravel())
        pos += 8 + n
    assert pos == len(consts)

    inst = parts[3][2]
    assert struct.unpack_from("<I", inst, 0)[0] == len(program.code)
    assert inst[4:] == isa.encode(program.code)


# ------------------------------------------------------------------ version 2 files

#: Buffer and crossbar fields were 8 bits wide in format version 2 (its documented layout).
VERSION_2_BITS = {"buffer": 8, "crossbar": 8}


def version_2_word(spec: isa.InstrSpec, values: list[int]) -> int:
    word, offset = spec.opcode, isa.OPCODE_BITS
    for f, v in zip(spec.fields, values):
        bits = VERSION_2_BITS.get(f.kind, f.bits)
        word |= (v & ((1 << bits) - 1)) << offset
        offset += bits
    return word


def as_version_2(program: Program, extra_bit: int | None = None) -> bytes:
    """``program``'s file as format version 2 wrote it (``extra_bit``: set that bit of the
    first word, past its version-2 fields)."""
    words = [
        version_2_word(isa.BY_OPCODE[int(row[0])], [int(v) for v in row[1:]])
        for row in program.code
    ]
    if extra_bit is not None:
        words[0] |= 1 << extra_bit
    inst = struct.pack("<I", len(words)) + b"".join(w.to_bytes(16, "little") for w in words)
    data = program.to_bytes()
    parts = sections(data)
    body = bytearray(data[:16])
    body[8:10] = struct.pack("<H", 2)
    for tag, _, payload in parts:
        payload = inst if tag == b"INST" else payload
        body += struct.pack("<4sIQ", tag, 0, len(payload)) + payload
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.mark.parametrize("key", sorted(PROGRAMS))
def test_version_2_files_load(key):
    program = PROGRAMS[key]
    old = as_version_2(program)
    assert old != program.to_bytes()
    loaded = Program.from_bytes(old)
    assert_same_program(loaded, program)
    assert loaded.to_bytes() == program.to_bytes()  # written back as version 3


def test_version_2_words_keep_their_unused_bits_checked():
    program = PROGRAMS["hand"]
    spec = isa.BY_OPCODE[int(program.code[0, 0])]
    used = isa.OPCODE_BITS + sum(VERSION_2_BITS.get(f.kind, f.bits) for f in spec.fields)
    with pytest.raises(ProgramError, match="sets bits outside its fields"):
        Program.from_bytes(as_version_2(program, extra_bit=used))


def test_to_bytes_is_deterministic():
    a = example_programs()
    for key, program in PROGRAMS.items():
        assert a[key].to_bytes() == program.to_bytes()
