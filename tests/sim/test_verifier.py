"""Every malformed program is rejected with a ``ProgramError``, bad inputs with ``InputError``.

The compiled simulator core indexes without bounds checks and relies on these checks,
so each one is exercised on its own: through the binary parser (``Program.from_bytes``),
through ``verify`` and through ``Simulator.run`` on every backend.
"""

from __future__ import annotations

import copy
import json
import struct
import zlib

import numpy as np
import pytest

from tvm_cim import CimArch, InputError, ProgramError
from tvm_cim.codegen import lower_matmul
from tvm_cim.sim import (
    CrossbarImage,
    Program,
    ProgramBuilder,
    Simulator,
    TensorDesc,
    estimate,
    im2col_params,
    isa,
    verify,
)

# ---------------------------------------------------------------- a tiny program


def tiny(adc_bits: int | None = None, crossbars: int = 2) -> Program:
    """One instruction of every kind; ``y = (x & 1) @ cells[:, :3]``."""
    arch = CimArch(rows=8, cols=6, cell_bits=2, adc_bits=adc_bits, crossbars=crossbars)
    b = ProgramBuilder(arch, "tiny")
    b.input(TensorDesc("x", 5, "uint8", 4, False))
    b.output(TensorDesc("y", 3, "int32", 32, True))
    for width in (5, 6, 3, 3, 3):
        b.buffer(width)
    b.image(np.arange(30, dtype=np.uint8).reshape(5, 6) % 4)
    b.constant(np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]]))
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=5)
    b.emit("prog", xb=0, image=0)
    b.emit("mvm", xb=0, src=0, src_col=0, bit=0)
    b.emit("adc", dst=1, dst_col=0, xb=0, col=0, ncols=6)
    b.emit("shadd", dst=2, dst_col=0, src=1, src_col=0, ncols=3)
    b.emit("acc", dst=3, dst_col=0, src=2, src_col=0, ncols=3)
    b.emit("req", dst=4, dst_col=0, src=3, src_col=0, ncols=3, params=0, bits=16, signed=1)
    b.emit("store", tensor=0, dst_col=0, src=4, src_col=0, ncols=3)
    b.emit("halt")
    return b.build()


TINY_X = np.array([[1, 3, 0, 15, 7], [0, 0, 0, 0, 0]], dtype=np.uint8)
AT = {m: i for i, m in enumerate(["load", "prog", "mvm", "adc", "shadd", "acc", "req", "store"])}


def edited(program: Program, mnemonic: str, **fields) -> Program:
    """A copy with operands of the first ``mnemonic`` instruction overwritten."""
    p = copy.deepcopy(program)
    spec = isa.BY_MNEMONIC[mnemonic]
    row = AT[mnemonic]
    assert p.code[row, 0] == spec.opcode
    for name, value in fields.items():
        p.code[row, spec.field_index(name)] = value
    return p


def with_code(program: Program, code: np.ndarray) -> Program:
    p = copy.deepcopy(program)
    p.code = np.asarray(code, dtype=np.int64).reshape(-1, 1 + isa.MAX_OPERANDS)
    return p


def rejects(program: Program, match: str, index: int | None = None, arch=None):
    with pytest.raises(ProgramError, match=match) as info:
        verify(program, arch)
    if index is not None:
        assert info.value.index == index
        assert str(info.value).startswith(f"instruction {index}: ")
    return info.value


def test_tiny_program_is_valid(backend):
    p = tiny()
    verify(p)
    y = Simulator(backend=backend).run(p, {"x": TINY_X}).outputs["y"]
    assert np.array_equal(y, (TINY_X.astype(np.int64) & 1) @ p.images[0].cells[:, :3])


# ------------------------------------------------------------- operand checks

BAD_OPERANDS = [
    # (mnemonic, fields, message)
    ("load", {"dst": 5}, r"buffer b5 out of range \(have 5\)"),
    ("mvm", {"src": 255}, r"buffer b255 out of range"),
    ("shadd", {"src": 7}, r"buffer b7 out of range"),
    ("acc", {"dst": 5}, r"buffer b5 out of range"),
    ("req", {"src": 9}, r"buffer b9 out of range"),
    ("store", {"src": 5}, r"buffer b5 out of range"),
    ("adc", {"dst": 5}, r"buffer b5 out of range"),
    ("prog", {"xb": 2}, r"crossbar x2 out of range \(have 2\)"),
    ("mvm", {"xb": 255}, r"crossbar x255 out of range"),
    ("adc", {"xb": 2}, r"crossbar x2 out of range"),
    ("prog", {"image": 1}, r"image img1 out of range \(have 1\)"),
    ("prog", {"image": 65535}, r"image img65535 out of range"),
    ("req", {"params": 1}, r"const c1 out of range \(have 1\)"),
    ("load", {"tensor": 1}, r"tensor t1 out of range \(have 1\)"),
    ("store", {"tensor": 3}, r"tensor t3 out of range \(have 1\)"),
    # fields that do not fit their width
    ("load", {"dst": -1}, r"load: dst=-1 overflows its field"),
    ("load", {"ncols": 1 << 16}, r"ncols=65536 overflows"),
    ("mvm", {"signed": 2}, r"mvm: signed=2 overflows"),
    ("mvm", {"bit": 64}, r"bit=64 overflows"),
    ("shadd", {"shift": 64}, r"shift=64 overflows"),
    ("req", {"zp": 32768}, r"zp=32768 overflows"),
    ("req", {"zp": -32769}, r"zp=-32769 overflows"),
    ("req", {"bits": 32}, r"bits=32 overflows"),
    # unprogrammed crossbars and missing column sums
    ("mvm", {"xb": 1}, r"mvm drives crossbar x1 before it was programmed"),
    ("adc", {"xb": 1}, r"adc reads crossbar x1, which was never programmed"),
    # column spans past a buffer, tensor or image
    ("load", {"ncols": 6}, r"load source columns 0\.\.5 outside width 5"),
    ("load", {"src_col": 1}, r"load source columns 1\.\.5 outside width 5"),
    ("load", {"dst_col": 1}, r"load destination columns 1\.\.5 outside width 5"),
    ("load", {"ncols": 0}, r"load source columns"),
    ("mvm", {"src_col": 1}, r"mvm input columns 1\.\.5 outside width 5"),
    ("mvm", {"src": 2}, r"mvm input columns 0\.\.4 outside width 3"),
    ("adc", {"ncols": 7}, r"adc crossbar columns 0\.\.6 outside width 6"),
    ("adc", {"col": 1}, r"adc crossbar columns 1\.\.6 outside width 6"),
    ("adc", {"dst": 2, "ncols": 4}, r"adc destination columns 0\.\.3 outside width 3"),
    ("adc", {"dst_col": 1}, r"adc destination columns 1\.\.6 outside width 6"),
    ("adc", {"ncols": 0}, r"adc crossbar columns"),
    ("shadd", {"src_col": 4}, r"shadd source columns 4\.\.6 outside width 6"),
    ("shadd", {"src_col": 6, "bcast": 1}, r"shadd source columns 6\.\.6 outside width 6"),
    ("shadd", {"dst_col": 1}, r"shadd destination columns 1\.\.3 outside width 3"),
    ("shadd", {"ncols": 4, "bcast": 1}, r"shadd destination columns 0\.\.3 outside width 3"),
    ("acc", {"src_col": 1}, r"acc source columns 1\.\.3 outside width 3"),
    ("acc", {"dst_col": 2}, r"acc destination columns 2\.\.4 outside width 3"),
    ("req", {"src_col": 1}, r"req source columns 1\.\.3 outside width 3"),
    ("req", {"dst_col": 1}, r"req destination columns 1\.\.3 outside width 3"),
    ("store", {"src_col": 1}, r"store source columns 1\.\.3 outside width 3"),
    ("store", {"dst_col": 1}, r"store destination columns 1\.\.3 outside width 3"),
    ("store", {"ncols": 65535}, r"store destination columns 0\.\.65534 outside width 3"),
    # shifts and widths
    ("adc", {"shift": 1}, r"adc shift must be 0 with a lossless ADC"),
    ("shadd", {"shift": 63}, r"shadd shift 63 exceeds 62"),
    ("req", {"bits": 0}, r"req output bits 0 outside 1\.\.31"),
    ("req", {"ncols": 4, "src": 1, "dst": 1}, r"req params c0 must be \[3, >=4\]"),
]
BAD_OPERANDS = [case for case in BAD_OPERANDS if case is not None]


@pytest.mark.parametrize(
    ("mnemonic", "fields", "match"),
    BAD_OPERANDS,
    ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in f.items())}" for m, f, _ in BAD_OPERANDS],
)
def test_bad_operand(mnemonic, fields, match):
    rejects(edited(tiny(), mnemonic, **fields), match, index=AT[mnemonic])


@pytest.mark.parametrize(("mnemonic", "fields", "match"), BAD_OPERANDS[::5])
def test_simulator_runs_the_verifier(mnemonic, fields, match, backend):
    program = edited(tiny(), mnemonic, **fields)
    with pytest.raises(ProgramError, match=match) as info:
        Simulator(backend=backend).run(program, {"x": TINY_X})
    assert info.value.index == AT[mnemonic]
    with pytest.raises(ProgramError, match=match):
        estimate(program, 1)


def test_finite_adc_shift_limit():
    p = tiny(adc_bits=8)
    verify(edited(p, "adc", shift=62))
    rejects(edited(p, "adc", shift=63), r"adc shift 63 exceeds 62", index=AT["adc"])
    verify(edited(p, "shadd", shift=62))


def test_adc_needs_an_mvm_since_the_last_write():
    p = tiny()
    code = p.code
    order = [0, 1, 3, 2, 4, 5, 6, 7, 8]  # adc before mvm
    rejects(with_code(p, code[order]), r"adc reads crossbar x0 before any mvm", index=2)
    reprogram = np.insert(code, 3, code[1], axis=0)  # prog again between mvm and adc
    rejects(with_code(p, reprogram), r"before any mvm since it was programmed", index=4)
    other = code.copy()
    other[1, 1] = 1  # program x1, drive x0
    rejects(with_code(p, other), r"mvm drives crossbar x0 before it was programmed", index=2)


def test_second_image_changes_the_row_count():
    """After reprogramming with a taller image, the mvm span follows the new image."""
    p = tiny()
    p.images.append(CrossbarImage(np.ones((6, 6), dtype=np.uint8)))
    code = np.insert(p.code, 4, [p.code[1], p.code[2]], axis=0)
    code[4, 2] = 1  # prog xb=0 image=1
    code[5, 2] = 1  # mvm src=b1 (width 6): fits
    verify(with_code(p, code))
    code[5, 2] = 0  # mvm src=b0 (width 5): 6 rows do not fit
    rejects(with_code(p, code), r"mvm input columns 0\.\.5 outside width 5", index=5)


# --------------------------------------------------------- program structure


def test_missing_halt():
    p = tiny()
    rejects(with_code(p, p.code[:-1]), r"program must end with halt", index=len(p.code) - 2)
    rejects(with_code(p, p.code[:0]), r"program must end with halt", index=0)


def test_halt_not_last():
    p = tiny()
    code = np.insert(p.code, 3, 0, axis=0)
    rejects(with_code(p, code), r"halt before the end", index=3)
    rejects(with_code(p, np.vstack([p.code, p.code[-1:]])), r"halt before the end", index=8)


@pytest.mark.parametrize("opcode", [len(isa.INSTRUCTIONS), 31, 63, -1, 1 << 40])
def test_unknown_opcode(opcode):
    p = tiny()
    p.code[4, 0] = opcode
    rejects(p, rf"unknown opcode {opcode}", index=4)


# ------------------------------------------------------------- tables


def test_cell_above_cell_bits():
    p = tiny()
    p.images[0].cells = p.images[0].cells.copy()  # built cells are read-only
    p.images[0].cells[2, 3] = 4
    rejects(p, r"image img0: cell value 4 exceeds 2-bit cells")
    p.images[0].cells[2, 3] = 255
    rejects(p, r"cell value 255 exceeds")


@pytest.mark.parametrize(
    ("shape", "diff", "match"),
    [
        ((9, 6), False, r"image img0: 9x6 cells exceed the 8x6 crossbar"),
        ((5, 7), False, r"image img0: 5x7 cells exceed the 8x6 crossbar"),
        ((10, 6), True, r"10x6 cells exceed the 8x6 crossbar"),
        ((5, 6), True, r"differential rows need an even row count"),
        ((0, 6), False, r"non-empty 2-D uint8"),
        ((5, 0), False, r"non-empty 2-D uint8"),
    ],
)
def test_bad_image(shape, diff, match):
    p = tiny()
    p.images[0] = CrossbarImage(np.zeros(shape, dtype=np.uint8), differential_rows=diff)
    rejects(p, match)


def test_image_wrong_dtype():
    p = tiny()
    p.images[0] = CrossbarImage(np.zeros((5, 6), dtype=np.int16))
    rejects(p, r"non-empty 2-D uint8")


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (np.zeros((2, 3)), r"req params c0 must be \[3, >=3\]"),
        (np.zeros((4, 3)), r"req params c0 must be \[3, >=3\]"),
        (np.zeros((3, 2)), r"req params c0 must be \[3, >=3\]"),
        (np.array([[0, 0, 0], [1, 1, 1], [0, 63, 0]]), r"shifts must lie in 0\.\.62"),
        (np.array([[0, 0, 0], [1, 1, 1], [0, 0, -1]]), r"shifts must lie in 0\.\.62"),
    ],
)
def test_bad_req_params(params, match):
    p = tiny()
    p.constants[0] = np.asarray(params, dtype=np.int64)
    rejects(p, match, index=AT["req"])


def test_req_params_extra_columns_are_ignored():
    p = tiny()
    p.constants[0] = np.array([[0, 0, 0, 9], [1, 1, 1, 9], [0, 0, 0, 99]])
    verify(p)  # only the first ncols columns are read


def test_bad_constant_shape():
    p = tiny()
    p.constants[0] = np.zeros((3, 3, 1), dtype=np.int64)
    rejects(p, r"constant c0: must be a 2-D int64 array")


@pytest.mark.parametrize(
    ("buffers", "match"),
    [
        ([5, 6, 0, 3, 3], r"buffer b2: width 0 outside 1\.\.65535"),
        ([5, 6, 3, 3, 65536], r"buffer b4: width 65536 outside"),
        ([5, 6, 3, 3, -1], r"buffer b4: width -1 outside"),
        ([5, 6, 3, 3, 3] + [1] * 65532, r"65537 buffers exceed the limit of 65536"),
    ],
)
def test_bad_buffers(buffers, match):
    p = tiny()
    p.buffers = buffers
    rejects(p, match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": "y"}, r"names must be unique"),
        ({"name": ""}, r"names must be unique and non-empty"),
        ({"dtype": "float32"}, r"dtype 'float32' not in"),
        ({"dtype": "uint32"}, r"dtype 'uint32' not in"),
        ({"bits": 9}, r"9 bits do not fit uint8"),
        ({"bits": 0}, r"0 bits do not fit"),
        ({"signed": True}, r"signed values in unsigned dtype uint8"),
        ({"width": 0}, r"width 0 outside 1\.\.65535"),
        ({"width": 65536}, r"width 65536 outside"),
        ({"batch": 0}, r"batch 0 must be positive"),
    ],
)
def test_bad_tensor(change, match):
    p = tiny()
    p.inputs[0] = TensorDesc(**{**p.inputs[0].to_dict(), **change})
    rejects(p, rf"(input|output) tensor .*{match}")


def test_tensors_disagree_on_batch():
    p = tiny()
    p.inputs[0] = TensorDesc("x", 5, "uint8", 4, False, batch=2)
    p.outputs[0] = TensorDesc("y", 3, "int32", 32, True, batch=3)
    rejects(p, r"tensors disagree on the batch size: \[2, 3\]")


def test_too_many_tensors():
    p = tiny()
    p.outputs += [TensorDesc(f"o{i}", 1) for i in range(256)]
    rejects(p, r"too many output tensors \(257 > 256\)")


# --------------------------------------------------------------- arch checks


def test_arch_mismatch(backend):
    p = tiny()
    for change, field in [
        ({"cell_bits": 4}, "cell_bits=4 (program: 2)"),
        ({"rows": 16}, "rows=16 (program: 8)"),
        ({"cols": 12}, "cols=12 (program: 6)"),
        ({"dac_bits": 2}, "dac_bits=2"),
        ({"adc_bits": 8}, "adc_bits=8 (program: None)"),
        ({"mapping": "of"}, "mapping='offset' (program: 'differential-column')"),
    ]:
        other = p.arch.replace(**change)
        with pytest.raises(ProgramError, match="compiled for another arch") as info:
            Simulator(other, backend=backend).run(p, {"x": TINY_X})
        assert field in str(info.value)
        with pytest.raises(ProgramError, match="compiled for another arch"):
            verify(p, other)
        with pytest.raises(ProgramError, match="compiled for another arch"):
            estimate(p, 1, arch=other)


def test_arch_with_fewer_crossbars(backend):
    p = edited(tiny(), "prog", xb=1)
    p.code[AT["mvm"], 1] = 1
    p.code[AT["adc"], 3] = 1
    verify(p)
    one = p.arch.replace(crossbars=1)
    with pytest.raises(ProgramError, match=r"crossbar x1 out of range \(have 1\)") as info:
        Simulator(one, backend=backend).run(p, {"x": TINY_X})
    assert info.value.index == AT["prog"]


def test_arch_with_other_latencies_runs(backend):
    p = tiny()
    slow = p.arch.replace(write_latency_us=1.0, crossbars=5, name="other")
    result = Simulator(slow, backend=backend).run(p, {"x": TINY_X})
    assert result.stats.arch == slow
    assert result.stats.latency_ps >= 1_000_000


# -------------------------------------------------------------- binary parser


def section_table(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 16
    for _ in range(4):
        tag, _, length = struct.unpack_from("<4sIQ", data, pos)
        out.append((tag, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return out


def rebuild(data: bytes, **payloads: bytes) -> bytes:
    """The file with some section payloads replaced and a fresh checksum."""
    parts = [data[:16]]
    for tag, payload in section_table(data):
        payload = payloads.get(tag.decode(), payload)
        parts.append(struct.pack("<4sIQ", tag, 0, len(payload)) + payload)
    return with_crc(b"".join(parts))


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def parse_error(data: bytes, match: str) -> ProgramError:
    with pytest.raises(ProgramError, match=match) as info:
        Program.from_bytes(data)
    return info.value


@pytest.fixture(scope="module")
def good() -> bytes:
    return tiny(adc_bits=6).to_bytes()


def test_good_bytes_parse(good):
    verify(Program.from_bytes(good))
    verify(Program.from_bytes(bytearray(good)))
    verify(Program.from_bytes(memoryview(good)))


@pytest.mark.parametrize("cut", [0, 1, 8, 19, 20, 40, 300, -17, -5, -4, -1])
def test_truncated(good, cut):
    data = good[:cut]
    err = parse_error(data, r"file too short|checksum mismatch")
    assert err.offset is not None


@pytest.mark.parametrize("cut", [17, 30, 100, 250, -40, -16, -1])
def test_truncated_with_valid_checksum(good, cut):
    """A cut body with a matching checksum fails on the first length that overruns."""
    body = good[:-4][:cut]
    err = parse_error(with_crc(body), r"truncated|expected section|file too short")
    assert err.offset is not None and 0 <= err.offset <= len(body)


def test_too_short(good):
    err = parse_error(good[:19], r"file too short \(19 bytes\)")
    assert err.offset == 0


def test_bad_magic(good):
    err = parse_error(b"CIMPROX\0" + good[8:], r"bad magic b'CIMPROX\\x00', not a tvm-cim program")
    assert err.offset == 0
    assert str(err).startswith("offset 0: ")
    parse_error(b"\0" * len(good), r"bad magic")


@pytest.mark.parametrize("version", [0, 1, 4, 65535])
def test_bad_version(good, version):
    data = good[:8] + struct.pack("<H", version) + good[10:]
    err = parse_error(data, rf"unsupported format version {version} \(this build reads 2, 3\)")
    assert err.offset == 8


@pytest.mark.parametrize("where", [10, 16, 50, 200, -30, -5])
def test_bad_checksum(good, where):
    data = bytearray(good)
    data[where] ^= 0x10
    err = parse_error(bytes(data), r"checksum mismatch")
    assert err.offset == len(good) - 4


def test_section_count(good):
    data = with_crc(good[:12] + struct.pack("<I", 5) + good[16:-4])
    assert parse_error(data, r"expected 4 sections, got 5").offset == 12


def test_section_order(good):
    data = with_crc(good[:16] + b"IMGS" + good[20:-4])
    err = parse_error(data, r"expected section b'META', found b'IMGS'")
    assert err.offset == 16


def test_section_length_overrun(good):
    data = with_crc(good[:24] + struct.pack("<Q", 1 << 40) + good[32:-4])
    err = parse_error(data, r"truncated section META")
    assert err.offset == 32


def test_trailing_bytes(good):
    err = parse_error(with_crc(good[:-4] + b"\0\0"), r"trailing bytes after the last section")
    assert err.offset == len(good) - 4


def test_image_flags(good):
    imgs = dict(section_table(good))[b"IMGS"]
    bad = imgs[:8] + b"\x02" + imgs[9:]
    parse_error(rebuild(good, IMGS=bad), r"image 0: unknown flags 2")


@pytest.mark.parametrize("tag", ["IMGS", "CNST", "INST"])
def test_trailing_bytes_in_section(good, tag):
    payload = dict(section_table(good))[tag.encode()]
    err = parse_error(rebuild(good, **{tag: payload + b"\0"}), rf"trailing bytes in {tag}")
    assert err.offset is not None


@pytest.mark.parametrize("tag", ["IMGS", "CNST", "INST"])
def test_count_overruns_section(good, tag):
    payload = dict(section_table(good))[tag.encode()]
    bad = struct.pack("<I", struct.unpack_from("<I", payload)[0] + 1) + payload[4:]
    parse_error(rebuild(good, **{tag: bad}), r"truncated")


def test_instruction_with_stray_bits(good):
    inst = dict(section_table(good))[b"INST"]
    i = 3  # adc: 77 bits used, bit 120 is outside its fields
    word = bytearray(inst[4 + 16 * i : 4 + 16 * (i + 1)])
    word[15] |= 0x01
    data = rebuild(good, INST=inst[: 4 + 16 * i] + bytes(word) + inst[4 + 16 * (i + 1) :])
    err = parse_error(data, r"instruction word sets bits outside its fields")
    assert err.index == i
    inst_start = data.index(b"INST") + 16 + 4
    assert err.offset == inst_start + 16 * i
    assert str(err).startswith(f"instruction {i}: offset {err.offset}: ")


def test_instruction_with_unknown_opcode_parses_then_fails_verification(good):
    inst = dict(section_table(good))[b"INST"]
    word = bytes([40]) + bytes(15)
    program = Program.from_bytes(rebuild(good, INST=inst[:4] + word + inst[20:]))
    rejects(program, r"unknown opcode 40", index=0)


def meta_of(data: bytes) -> dict:
    return json.loads(dict(section_table(data))[b"META"])


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["arch"].update(rows=0), r"invalid arch in META: CimArch\.rows"),
        (lambda m: m["arch"].update(bogus=1), r"invalid arch in META: unknown CimArch keys"),
        (lambda m: m["arch"].update(mapping=3), r"invalid arch in META: CimArch\.mapping"),
        (lambda m: m.pop("arch"), r"malformed META section"),
        (lambda m: m.pop("buffers"), r"malformed META section"),
        (lambda m: m.update(buffers=["a"]), r"malformed META section"),
        (lambda m: m.update(buffers=7), r"malformed META section"),
        (lambda m: m.update(inputs=[{"name": "x"}]), r"malformed tensor description"),
        (lambda m: m["inputs"][0].update(width="wide"), r"malformed tensor description"),
        (lambda m: m["outputs"][0].update(batch=[1]), r"malformed tensor description"),
        (lambda m: m.update(inputs=[3]), r"malformed"),
        (lambda m: m.update(arch=[]), r"invalid arch in META|malformed META"),
    ],
)
def test_bad_meta(good, edit, match):
    meta = meta_of(good)
    edit(meta)
    err = parse_error(rebuild(good, META=json.dumps(meta).encode()), match)
    assert err.offset == 32  # the META payload


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"a": 1}'])
def test_meta_not_json_object(good, payload):
    err = parse_error(rebuild(good, META=payload), r"META")
    assert err.offset == 32


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["inputs"][0].update(width=float("inf")),
        lambda m: m.update(buffers=[float("inf")] * 5),
        lambda m: m["arch"].update(write_latency_us=10**400),
    ],
    ids=["width-inf", "buffer-inf", "latency-huge-int"],
)
def test_meta_numbers_out_of_float_range(good, edit):
    """JSON allows Infinity and huge integers; they must give a ProgramError too."""
    meta = meta_of(good)
    edit(meta)
    parse_error(rebuild(good, META=json.dumps(meta).encode()), r"META|tensor")


def test_load_missing_file(tmp_path):
    with pytest.raises(ProgramError, match="cannot read program"):
        Program.load(tmp_path / "nope.cimprog")
    with pytest.raises(ProgramError, match="cannot read program"):
        Program.load(tmp_path)


def test_parsed_but_invalid_program_fails_verification(good):
    meta = meta_of(good)
    meta["buffers"][0] = 4  # mvm reads 5 rows from b0
    program = Program.from_bytes(rebuild(good, META=json.dumps(meta).encode()))
    rejects(program, r"load destination columns 0\.\.4 outside width 4", index=0)


# ----------------------------------------------------------------- inputs


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({}, r"missing input\(s\) \['x'\]"),
        ({"x": TINY_X, "z": TINY_X}, r"unknown input\(s\) \['z'\]"),
        ({"X": TINY_X}, r"unknown input\(s\) \['X'\]"),
        ({"x": TINY_X[:, :4]}, r"input 'x': shape \(2, 4\), expected \[batch, 5\]"),
        ({"x": np.zeros((2, 6), dtype=np.uint8)}, r"shape \(2, 6\)"),
        ({"x": np.zeros((1, 2, 5), dtype=np.uint8)}, r"shape \(1, 2, 5\)"),
        ({"x": np.zeros(4, dtype=np.uint8)}, r"shape"),
        ({"x": np.zeros((), dtype=np.uint8)}, r"shape"),
        ({"x": TINY_X.astype(np.float64)}, r"dtype float64 is not an integer type"),
        ({"x": TINY_X.astype(np.float32)}, r"dtype float32"),
        ({"x": [[0.5] * 5]}, r"dtype float64"),
        ({"x": np.array([["1"] * 5])}, r"is not an integer type"),
        ({"x": TINY_X + 16}, r"outside unsigned 4-bit range 0\.\.15"),
        ({"x": TINY_X.astype(np.int64) - 1}, r"values span -1\.\.14, outside unsigned 4-bit"),
        ({"x": np.zeros((0, 5), dtype=np.uint8)}, r"at least one input vector"),
    ],
)
def test_bad_inputs(inputs, match, backend):
    with pytest.raises(InputError, match=match):
        Simulator(backend=backend).run(tiny(), inputs)


def test_accepted_inputs(backend):
    sim = Simulator(backend=backend)
    p = tiny()
    expected = sim.run(p, {"x": TINY_X}).outputs["y"]
    for x in (TINY_X.astype(np.int64), TINY_X.astype(np.int8), TINY_X.tolist()):
        assert np.array_equal(sim.run(p, {"x": x}).outputs["y"], expected)
    row = sim.run(p, {"x": TINY_X[0]}).outputs["y"]  # one vector without a batch axis
    assert np.array_equal(row, expected[:1])
    assert sim.run(p, {"x": TINY_X.astype(bool)}).outputs["y"].shape == (2, 3)


def signed_program(batch=None) -> Program:
    arch = CimArch(rows=16, cols=24)
    return lower_matmul(
        np.ones((4, 2), dtype=int), w_bits=2, a_bits=5, arch=arch, signed_input=True, batch=batch
    )


def test_signed_input_range(backend):
    sim = Simulator(backend=backend)
    p = signed_program()
    sim.run(p, {"x": np.array([[-16, 15, 0, -1]])})
    with pytest.raises(InputError, match=r"outside signed 5-bit range -16\.\.15"):
        sim.run(p, {"x": np.array([[-17, 0, 0, 0]])})
    with pytest.raises(InputError, match=r"outside signed 5-bit range"):
        sim.run(p, {"x": np.array([[16, 0, 0, 0]])})


def test_uint64_inputs_do_not_wrap(backend):
    x = np.array([[2**64 - 1, 0, 0, 0]], dtype=np.uint64)  # -1 after a cast to int64
    with pytest.raises(InputError, match="outside signed 5-bit range"):
        Simulator(backend=backend).run(signed_program(), {"x": x})


def test_inconsistent_batch(backend):
    sim = Simulator(backend=backend)
    with pytest.raises(InputError, match=r"disagree on the batch size: \[2, 3\]"):
        sim.run(tiny(), {"x": TINY_X}, batch=3)
    fixed = signed_program(batch=4)
    with pytest.raises(InputError, match=r"disagree on the batch size: \[2, 4\]"):
        sim.run(fixed, {"x": np.zeros((2, 4), dtype=np.int8)})
    sim.run(fixed, {"x": np.zeros((4, 4), dtype=np.int8)})

    b = ProgramBuilder(CimArch(rows=8, cols=6), "two inputs")
    b.input(TensorDesc("a", 2, "int8", 8, True))
    b.input(TensorDesc("b", 2, "int8", 8, True))
    b.output(TensorDesc("y", 2))
    b.buffer(2)
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=2)
    b.emit("load", dst=0, dst_col=0, tensor=1, src_col=0, ncols=2)
    b.emit("store", tensor=0, dst_col=0, src=0, src_col=0, ncols=2)
    b.emit("halt")
    two = b.build()
    a3, b2 = np.zeros((3, 2), dtype=np.int8), np.ones((2, 2), dtype=np.int8)
    with pytest.raises(InputError, match=r"inputs disagree on the batch size: \[2, 3\]"):
        sim.run(two, {"a": a3, "b": b2})
    assert np.array_equal(sim.run(two, {"a": b2 * 5, "b": b2}).outputs["y"], b2)


def wide_program() -> Program:
    """A program whose 65535-column buffer costs 512 KiB per input vector."""
    p = tiny()
    p.buffers[1] = 65535
    return p


def test_memory_limit(backend):
    """The numpy backend holds every buffer for the whole batch; the core one row tile."""
    sim = Simulator(backend=backend)
    x = np.zeros((5000, 5), dtype=np.uint8)
    if backend == "numpy":
        with pytest.raises(
            InputError, match=r"a batch of 5000 needs 2\.\d GiB of memory on the numpy backend"
        ):
            sim.run(wide_program(), {"x": x})
    else:
        sim.run(wide_program(), {"x": x})
    sim.run(wide_program(), {"x": x[:100]})
    # without values no buffer is allocated
    sim.run(wide_program(), functional=False, batch=5000)


def test_memory_limit_without_inputs(backend):
    with pytest.raises(InputError, match=r"TiB"):
        Simulator(backend=backend).run(tiny(), functional=False, batch=10**15)


def test_unknown_backend():
    with pytest.raises(ValueError, match="not available"):
        Simulator(backend="fortran")


# ------------------------------------------------------- rows per item and im2col


def conv_tiny() -> Program:
    """Every instruction on buffers of several rows per item: a 2x2 conv of a 3x4 image.

    ``y = im2col(x) @ cells[:, :3]`` for 1-bit inputs, OH*OW = 2*3 rows per item.
    """
    arch = CimArch(rows=8, cols=6, cell_bits=2, crossbars=2)
    b = ProgramBuilder(arch, "conv tiny")
    b.input(TensorDesc("x", 2, "uint8", 1, False, rows=12))
    b.output(TensorDesc("y", 3, "int32", 32, True, rows=6))
    for width, rows in ((2, 12), (8, 6), (6, 6), (3, 6), (3, 6), (3, 6)):
        b.buffer(width, rows=rows)
    b.image(np.arange(48, dtype=np.uint8).reshape(8, 6) % 4)
    b.constant(np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]]))
    b.constant(im2col_params(3, 4, 2, (2, 2)))
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=2)
    b.emit("im2col", dst=1, src=0, params=1, pad=0)
    b.emit("prog", xb=0, image=0)
    b.emit("mvm", xb=0, src=1, src_col=0, bit=0)
    b.emit("adc", dst=2, dst_col=0, xb=0, col=0, ncols=6)
    b.emit("shadd", dst=3, dst_col=0, src=2, src_col=0, ncols=3)
    b.emit("acc", dst=4, dst_col=0, src=3, src_col=0, ncols=3)
    b.emit("req", dst=5, dst_col=0, src=4, src_col=0, ncols=3, params=0, bits=16, signed=1)
    b.emit("store", tensor=0, dst_col=0, src=5, src_col=0, ncols=3)
    b.emit("halt")
    return b.build()


CONV_AT = {
    m: i
    for i, m in enumerate(
        ["load", "im2col", "prog", "mvm", "adc", "shadd", "acc", "req", "store", "halt"]
    )
}


def test_conv_tiny_is_valid(backend):
    p = conv_tiny()
    verify(p)
    x = np.random.default_rng(0).integers(0, 2, (2, 3, 4, 2))
    y = Simulator(backend=backend).run(p, {"x": x.reshape(2, 12, 2)}).outputs["y"]
    windows = np.stack(
        [x[:, i : i + 2, j : j + 2].reshape(2, 8) for i in range(2) for j in range(3)], axis=1
    )
    assert np.array_equal(y, (windows @ p.images[0].cells[:, :3]).reshape(12, 3))


def instruction(mnemonic: str, **operands) -> np.ndarray:
    spec = isa.BY_MNEMONIC[mnemonic]
    row = np.zeros(1 + isa.MAX_OPERANDS, dtype=np.int64)
    row[0] = spec.opcode
    for name, value in operands.items():
        row[spec.field_index(name)] = value
    return row


def with_rows(buffer: int, rows: int) -> Program:
    p = conv_tiny()
    p.buffer_rows[buffer] = rows
    return p


def with_tensor(role: str, **change) -> Program:
    p = conv_tiny()
    tensors = getattr(p, role)
    tensors[0] = TensorDesc(**{**tensors[0].to_dict(), **change})
    return p


def with_im2col(**params) -> Program:
    p = conv_tiny()
    for name, value in params.items():
        p.constants[1][0, isa.IM2COL_PARAMS.index(name)] = value
    return p


def with_operands(mnemonic: str, **fields) -> Program:
    p = conv_tiny()
    spec = isa.BY_MNEMONIC[mnemonic]
    for name, value in fields.items():
        p.code[CONV_AT[mnemonic], spec.field_index(name)] = value
    return p


ROW_MISMATCHES = [
    # (program, instruction, message)
    (
        lambda: with_tensor("inputs", rows=11),
        "load",
        r"load: rows per item differ: input tensor 'x' has 11, b0 has 12",
    ),
    (
        lambda: with_tensor("outputs", rows=5),
        "store",
        r"store: rows per item differ: output tensor 'y' has 5, b5 has 6",
    ),
    (
        lambda: with_rows(2, 3),
        "adc",
        r"adc: rows per item differ: crossbar x0 holds sums for 6, b2 has 3",
    ),
    (lambda: with_rows(3, 5), "shadd", r"shadd: rows per item differ: source b2 has 6, b3 has 5"),
    (lambda: with_rows(4, 5), "acc", r"acc: rows 0\.\.5 of each item outside b4's 5 rows"),
    (lambda: with_rows(5, 1), "req", r"req: rows per item differ: source b4 has 6, b5 has 1"),
    (
        lambda: _src_rows_13(),
        "im2col",
        r"im2col: rows per item differ: the H\*W source image needs 12, b0 has 13",
    ),
    (
        lambda: with_rows(1, 5),
        "im2col",
        r"im2col: b1's 5 rows are not whole output rows \(OW=3\) within rows 0\.\.1",
    ),
]


def _src_rows_13() -> Program:
    p = with_tensor("inputs", rows=13)
    p.buffer_rows[0] = 13
    return p


@pytest.mark.parametrize(
    ("make", "mnemonic", "match"),
    ROW_MISMATCHES,
    ids=[f"{m}-{i}" for i, (_, m, _) in enumerate(ROW_MISMATCHES)],
)
def test_rows_mismatch(make, mnemonic, match):
    rejects(make(), match, index=CONV_AT[mnemonic])


def test_adc_rows_follow_the_last_mvm():
    """The held sums have the rows of the latest mvm's source, whatever came before."""
    p = conv_tiny()
    p.buffers.append(8)  # b6: 8 columns, one row per item
    p.buffer_rows.append(1)
    code = np.insert(p.code, 4, instruction("mvm", xb=0, src=6), axis=0)
    rejects(with_code(p, code), r"adc: rows per item differ: crossbar x0 holds sums for 1", index=5)
    code = np.insert(code, 5, instruction("mvm", xb=0, src=1), axis=0)  # back to b1's 6 rows
    verify(with_code(p, code))


BAD_IM2COL = [
    # (program, message)
    (lambda: with_im2col(OH=3), r"im2col params c1: OH=3, the geometry gives 2"),
    (lambda: with_im2col(OW=2), r"im2col params c1: OW=2, the geometry gives 3"),
    (lambda: with_im2col(stride_h=0), r"im2col params c1: stride_h=0 outside 1\.\.16777216"),
    (lambda: with_im2col(stride_w=-2), r"stride_w=-2 outside 1\.\."),
    (lambda: with_im2col(dil_w=0), r"dil_w=0 outside 1\.\."),
    (lambda: with_im2col(pad_left=-1), r"pad_left=-1 outside 0\.\."),
    (lambda: with_im2col(KH=0), r"KH=0 outside 1\.\."),
    (lambda: with_im2col(C=0), r"C=0 outside 1\.\."),
    (lambda: with_im2col(H=2**40), r"H=1099511627776 outside 1\.\."),
    (lambda: with_im2col(KH=5), r"the kernel spans 5 > padded H=3"),
    (lambda: with_im2col(KW=3, dil_w=2), r"the kernel spans 5 > padded W=4"),
    (lambda: with_im2col(H=4, OH=3), r"the H\*W source image needs 16, b0 has 12"),
    (lambda: with_im2col(C=1), r"im2col: source b0 has width 2, not C=1"),
    (lambda: with_im2col(C=4), r"im2col: source b0 has width 2, not C=4"),
    (lambda: _dst_width(7), r"im2col: destination b1 has width 7, not KH\*KW\*C=8"),
    (lambda: with_operands("im2col", params=2), r"const c2 out of range \(have 2\)"),
    (lambda: with_operands("im2col", src=1), r"im2col writes its own source b1"),
    (lambda: with_operands("im2col", src=2), r"im2col reads b2 before any instruction wrote it"),
    (lambda: with_operands("im2col", params=0), r"im2col params c0 must be \[1, 15\]"),
    (lambda: _params_shape((15, 1)), r"im2col params c1 must be \[1, 15\]"),
    (lambda: _params_shape((1, 16)), r"im2col params c1 must be \[1, 15\]"),
    (lambda: with_operands("im2col", dst=9), r"buffer b9 out of range \(have 6\)"),
    (lambda: with_operands("im2col", pad=1 << 15), r"im2col: pad=32768 overflows its field"),
]


def _dst_width(width: int) -> Program:
    p = conv_tiny()
    p.buffers[1] = width
    return p


def _params_shape(shape) -> Program:
    p = conv_tiny()
    p.constants[1] = np.ones(shape, dtype=np.int64)
    return p


@pytest.mark.parametrize(("make", "match"), BAD_IM2COL, ids=[m for _, m in BAD_IM2COL])
def test_bad_im2col(make, match):
    rejects(make(), match, index=CONV_AT["im2col"])


def test_im2col_source_must_be_written():
    p = conv_tiny()
    rejects(with_code(p, p.code[1:]), r"im2col reads b0 before any instruction wrote it", index=0)
    # any instruction that writes the buffer counts, here a requantization in place
    p.constants.append(np.array([[0, 0], [1, 1], [0, 0]]))
    code = p.code.copy()
    code[0] = instruction("req", dst=0, src=0, ncols=2, params=2, bits=8)
    verify(with_code(p, code))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.buffer_rows.__setitem__(3, 0), r"buffer b3: rows 0 outside 1\.\.16777216"),
        (lambda p: p.buffer_rows.__setitem__(3, 1 << 24 + 1), r"buffer b3: rows \d+ outside"),
        (lambda p: p.buffer_rows.pop(), r"5 buffer_rows entries for 6 buffers"),
        (lambda p: p.buffer_rows.append(1), r"7 buffer_rows entries for 6 buffers"),
        (lambda p: setattr(p, "attrs", [1]), r"program attrs must be a dict, not list"),
    ],
)
def test_bad_row_tables(edit, match):
    p = conv_tiny()
    edit(p)
    rejects(p, match)


@pytest.mark.parametrize("rows", [0, -1, (1 << 24) + 1])
def test_bad_tensor_rows(rows):
    rejects(with_tensor("inputs", rows=rows), rf"input tensor 'x': rows {rows} outside 1\.\.")


def test_rows_default_to_one():
    p = tiny()
    assert p.buffer_rows == [1] * len(p.buffers)
    assert all(t.rows == 1 for t in p.inputs + p.outputs)
    assert Program(arch=p.arch, code=p.code, buffers=[3, 4]).buffer_rows == [1, 1]
    assert TensorDesc.from_dict({k: v for k, v in p.inputs[0].to_dict().items() if k != "rows"})
    assert TensorDesc("x", 3, batch=2, rows=5).shape == (10, 3)
    assert TensorDesc("x", 3, rows=5).shape == (None, 3)


def test_rows_in_meta_are_checked(good):
    meta = meta_of(good)
    meta["buffer_rows"] = [1, 2]
    parse_error(rebuild(good, META=json.dumps(meta).encode()), r"2 buffer_rows for 5 buffers")
    meta["buffer_rows"] = ["a"] * 5
    parse_error(rebuild(good, META=json.dumps(meta).encode()), r"malformed META")
    meta["buffer_rows"] = [1, 1, 1, 1, 0]
    program = Program.from_bytes(rebuild(good, META=json.dumps(meta).encode()))
    rejects(program, r"buffer b4: rows 0 outside")
    meta = meta_of(good)
    meta["attrs"] = [1]
    parse_error(rebuild(good, META=json.dumps(meta).encode()), r"META attrs must be a JSON object")
    meta = meta_of(good)
    del meta["buffer_rows"], meta["attrs"], meta["inputs"][0]["rows"]
    program = Program.from_bytes(rebuild(good, META=json.dumps(meta).encode()))
    assert program.buffer_rows == [1] * 5 and program.attrs == {} and program.inputs[0].rows == 1
    verify(program)


# ------------------------------------------------------- inputs with rows per item


def test_inputs_with_rows(backend):
    sim = Simulator(backend=backend)
    p = conv_tiny()
    x = np.random.default_rng(1).integers(0, 2, (3, 12, 2))
    expected = sim.run(p, {"x": x}).outputs["y"]
    assert expected.shape == (3 * 6, 3)
    assert np.array_equal(sim.run(p, {"x": x.reshape(36, 2)}).outputs["y"], expected)
    assert np.array_equal(sim.run(p, {"x": x[:1]}).outputs["y"], expected[:6])
    assert sim.run(p, {"x": x}, functional=False).stats.batch == 3
    assert sim.run(p, functional=False, batch=2).outputs["y"].shape == (12, 3)
    for bad, shape in [
        (x.reshape(36, 2)[:35], r"\(35, 2\)"),
        (x[:, :11], r"\(3, 11, 2\)"),
        (x[0, 0], r"\(2,\)"),
        (x.reshape(3, 12, 2, 1), r"\(3, 12, 2, 1\)"),
        (x.reshape(3, 24), r"\(3, 24\)"),
    ]:
        with pytest.raises(
            InputError, match=rf"input 'x': shape {shape}, expected \[batch\*12, 2\] or "
        ):
            sim.run(p, {"x": bad})
    with pytest.raises(InputError, match=r"disagree on the batch size: \[3, 4\]"):
        sim.run(p, {"x": x}, batch=4)
    with pytest.raises(InputError, match=r"at least one input vector"):
        sim.run(p, {"x": x[:0]})


def test_memory_limit_counts_rows(backend):
    sim = Simulator(backend=backend)
    p = conv_tiny()
    p.buffers[3] = p.buffers[4] = p.buffers[5] = 3
    p.buffers[2] = 6
    p.buffers.append(65535)  # 6 rows of 65535 values: 3 MiB per item
    p.buffer_rows.append(6)
    prepared = sim.prepare(p)
    if backend == "numpy":
        with pytest.raises(InputError, match=r"a batch of 700 needs 2\.\d GiB of memory"):
            prepared.check_cost(700, sim.limits, backend)
    else:  # one row tile of buffers
        assert prepared.memory_bytes(700, backend) < 2**26
    prepared.check_cost(600, sim.limits, backend)
    p.buffer_rows[-1] = 1
    sim.prepare(p).check_cost(3000, sim.limits, backend)
