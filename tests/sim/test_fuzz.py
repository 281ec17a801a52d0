"""Mutated programs never crash the parser, the verifier or a simulator backend.

Two fuzzers, both deterministic:

* byte mutations of encoded programs, once with the stale checksum (the parser must
  stop at the CRC) and once with a recomputed one (so that the section parser, the
  verifier and the backends see the corrupted content);
* mutations of decoded programs (operands within their field widths, opcodes, row
  order, tables), which reach the verifier directly. The compiled core executes without
  bounds checks once a program is verified, so any gap in the verifier shows up here.

The only acceptable outcomes are a result or a ``CimError``. Successful runs on the
compiled core are compared with the numpy reference.
"""

from __future__ import annotations

import copy
import struct
import zlib

import numpy as np
import pytest

from tests.conftest import random_inputs, random_weights, ready_backends
from tvm_cim import CimArch, CimError
from tvm_cim.codegen import lower_matmul
from tvm_cim.core.quant import Requantize
from tvm_cim.sim import (
    CrossbarImage,
    Program,
    ProgramBuilder,
    Simulator,
    TensorDesc,
    im2col_params,
    isa,
    verify,
)

pytestmark = pytest.mark.slow

BYTE_MUTANTS = 10_000
CODE_MUTANTS = 5_000
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)


def hand_program() -> Program:
    """Every instruction kind, two crossbars, differential rows and a requant."""
    arch = CimArch(rows=6, cols=5, cell_bits=3, dac_bits=2, adc_bits=5, crossbars=2)
    b = ProgramBuilder(arch, "hand")
    b.input(TensorDesc("x", 4, "int8", 5, True))
    b.output(TensorDesc("y", 3, "int16", 10, True))
    for width in (4, 5, 3, 3):
        b.buffer(width)
    b.image(np.array([[1, 2, 3, 4, 5], [6, 7, 0, 1, 2]] * 3, dtype=np.uint8), True)
    b.constant(np.array([[1, -1, 0], [300, 200, 100], [4, 5, 6]]))
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=4)
    b.emit("prog", xb=1, image=0)
    b.emit("mvm", xb=1, src=0, src_col=1, bit=0)
    b.emit("adc", dst=1, dst_col=0, xb=1, col=0, ncols=5, shift=2, signed=1)
    b.emit("shadd", dst=2, dst_col=0, src=1, src_col=1, ncols=3, shift=1)
    b.emit("mvm", xb=1, src=0, src_col=0, bit=4, signed=1)
    b.emit("adc", dst=1, dst_col=0, xb=1, col=0, ncols=5, shift=2, signed=1)
    b.emit("shadd", dst=2, dst_col=0, src=1, src_col=4, ncols=3, shift=4, neg=1, bcast=1)
    b.emit("acc", dst=3, dst_col=0, src=2, src_col=0, ncols=3)
    b.emit("req", dst=2, dst_col=0, src=3, src_col=0, ncols=3, params=0, zp=-3, bits=10, signed=1)
    b.emit("store", tensor=0, dst_col=0, src=2, src_col=0, ncols=3)
    b.emit("halt")
    return b.build()


def conv_program() -> Program:
    """Several rows per item: im2col of a padded 3x4x2 image, then one crossbar tile."""
    arch = CimArch(rows=8, cols=5, cell_bits=2, dac_bits=1, adc_bits=4, crossbars=2)
    b = ProgramBuilder(arch, "conv")
    b.input(TensorDesc("x", 2, "uint8", 2, False, rows=12))
    b.output(TensorDesc("y", 5, "int16", 12, True, rows=4))
    for width, rows in ((2, 12), (8, 4), (5, 4), (5, 4)):
        b.buffer(width, rows=rows)
    b.image(np.arange(40, dtype=np.uint8).reshape(8, 5) % 4)
    b.constant(im2col_params(3, 4, 2, (2, 2), (2, 2), (1, 0, 0, 1), (1, 1)))
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=2)
    b.emit("im2col", dst=1, src=0, params=0, pad=-2)
    b.emit("prog", xb=0, image=0)
    for bit in (0, 1):
        b.emit("mvm", xb=0, src=1, src_col=0, bit=bit)
        b.emit("adc", dst=2, dst_col=0, xb=0, col=0, ncols=5, shift=1)
        b.emit("shadd", dst=3, dst_col=0, src=2, src_col=0, ncols=5, shift=bit)
    b.emit("store", tensor=0, dst_col=0, src=3, src_col=0, ncols=5)
    b.emit("halt")
    return b.build()


def seed_programs() -> list[tuple[Program, dict]]:
    """Small valid programs and valid inputs for them."""
    rng = np.random.default_rng(1234)
    w = random_weights(rng, 7, 3, 4)
    arch = CimArch(rows=4, cols=6, cell_bits=2, dac_bits=2, adc_bits=4, crossbars=2)
    programs = [
        lower_matmul(w, w_bits=4, a_bits=3, arch=arch),
        lower_matmul(
            w,
            w_bits=4,
            a_bits=4,
            arch=arch.replace(mapping="of", adc_bits=None, crossbars=1),
            signed_input=True,
            requant=Requantize(multiplier=[5, 6, 7], shift=3, zero_point=1, signed=True),
        ),
        lower_matmul(w[:5, :2], w_bits=4, a_bits=2, arch=arch.replace(mapping="dr", dac_bits=1)),
        hand_program(),
        conv_program(),
    ]
    out = []
    for p in programs:
        verify(p)
        t = p.inputs[0]
        x = random_inputs(rng, 2 * t.rows, t.width, t.bits, t.signed)
        out.append((p, {"x": x}))
    return out


SEEDS = seed_programs()


class Outcomes:
    """Tallies what the mutants did and remembers unexpected exceptions."""

    def __init__(self):
        self.ok = 0
        self.rejected = 0
        self.crashes: list[str] = []

    def run(self, what: str, make_program, inputs: dict, backend: str) -> None:
        try:
            program = make_program()
            result = Simulator(backend=backend).run(program, inputs)
        except CimError:
            self.rejected += 1
            return
        except Exception as exc:  # anything else is a bug
            self.crashes.append(f"{what}: {type(exc).__name__}: {exc}")
            return
        self.ok += 1
        if backend != "numpy":
            try:
                ref = Simulator(backend="numpy").run(program, inputs)
            except Exception as exc:
                self.crashes.append(f"{what}: numpy fails where {backend} ran: {exc!r}")
                return
            if ref.stats.counts() != result.stats.counts() or any(
                not np.array_equal(ref.outputs[k], result.outputs[k]) for k in ref.outputs
            ):
                self.crashes.append(f"{what}: {backend} and numpy disagree")

    def check(self, total: int) -> None:
        assert not self.crashes, f"{len(self.crashes)} crashes, e.g.\n" + "\n".join(
            self.crashes[:10]
        )
        assert self.ok + self.rejected == total


# ----------------------------------------------------------------- bytes


def mutate_bytes(rng: np.random.Generator, body: bytes) -> bytes:
    data = bytearray(body)
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(7))
        n = len(data)
        if n == 0:
            break
        at = int(rng.integers(n))
        if kind == 0:  # flip one bit
            data[at] ^= 1 << int(rng.integers(8))
        elif kind == 1:  # overwrite bytes with random values
            span = int(rng.integers(1, 5))
            data[at : at + span] = rng.integers(0, 256, size=len(data[at : at + span])).tobytes()
        elif kind == 2:  # an interesting byte
            data[at] = INTERESTING[int(rng.integers(len(INTERESTING)))]
        elif kind == 3:  # truncate
            del data[at:]
        elif kind == 4:  # duplicate a chunk somewhere
            chunk = data[at : at + int(rng.integers(1, 33))]
            dst = int(rng.integers(n + 1))
            data[dst:dst] = chunk
        elif kind == 5:  # delete a chunk
            del data[at : at + int(rng.integers(1, 17))]
        else:  # small add to a little-endian integer (lengths, counts, operands)
            width = int(rng.choice([1, 2, 4, 8]))
            if at + width <= n:
                value = int.from_bytes(data[at : at + width], "little")
                value = (value + int(rng.integers(-3, 4))) % (1 << (8 * width))
                data[at : at + width] = value.to_bytes(width, "little")
    return bytes(data)


def split_sections(data: bytes) -> list[tuple[bytes, bytes]]:
    """``(tag, payload)`` of each section of a well-formed file."""
    out, pos = [], 16
    for _ in range(struct.unpack_from("<I", data, 12)[0]):
        tag, _, length = struct.unpack_from("<4sIQ", data, pos)
        out.append((tag, data[pos + 16 : pos + 16 + length]))
        pos += 16 + length
    return out


def mutate_section(rng: np.random.Generator, data: bytes) -> bytes:
    """Mutate one section's payload and rebuild the lengths: reaches the section parsers.

    META keeps its JSON syntax (one digit or a ``true``/``false`` swapped) so that the
    mutant gets past ``json.loads``; binary sections get any byte mutation.
    """
    parts = split_sections(data)
    i = int(rng.choice(len(parts), p=[0.2, 0.25, 0.15, 0.4]))
    tag, payload = parts[i]
    if tag == b"META":
        text = bytearray(payload)
        digits = [j for j, c in enumerate(text) if chr(c).isdigit()]
        for _ in range(int(rng.integers(1, 3))):
            if rng.integers(4) == 0:
                text = text.replace(b"false", b"true ", 1) if rng.integers(2) else text
                text = text.replace(b"true", b"false", 1) if rng.integers(2) else text
            elif digits:
                text[digits[int(rng.integers(len(digits)))]] = ord("0") + int(rng.integers(10))
        payload = bytes(text)
    else:
        payload = mutate_bytes(rng, payload)
    body = bytearray(data[:16])
    for j, (t, p) in enumerate(parts):
        p = payload if j == i else p
        body += struct.pack("<4sIQ", t, 0, len(p)) + p
    return bytes(body)


def test_byte_mutations(backend):
    rng = np.random.default_rng(20240601)
    outcomes = Outcomes()
    encoded = [(p.to_bytes(), inputs) for p, inputs in SEEDS]
    for i in range(BYTE_MUTANTS):
        data, inputs = encoded[i % len(encoded)]
        mode = i % 3
        if mode == 2:  # one section's payload, lengths and checksum kept consistent
            body = mutate_section(rng, data)
        else:
            body = mutate_bytes(rng, data[:-4])
        if mode == 0:  # stale checksum: the parser must stop at the CRC (or before)
            mutant = body + data[-4:]
        else:
            mutant = body + struct.pack("<I", zlib.crc32(body))
        outcomes.run(f"byte mutant {i}", lambda m=mutant: Program.from_bytes(m), inputs, backend)
    outcomes.check(BYTE_MUTANTS)
    assert outcomes.ok > 100  # some mutants stay valid and really run
    assert outcomes.rejected > BYTE_MUTANTS // 2


def test_stale_checksum_always_rejected():
    """Any change to the body without a new CRC is caught before anything is parsed."""
    rng = np.random.default_rng(7)
    for p, _ in SEEDS:
        data = p.to_bytes()
        for _ in range(200):
            body = mutate_bytes(rng, data[:-4])
            if body == data[:-4]:
                continue
            with pytest.raises(CimError, match="checksum|too short|magic|version"):
                Program.from_bytes(body + data[-4:])


# ------------------------------------------------------------- decoded code


def field_value(rng: np.random.Generator, f: isa.Field) -> int:
    """An operand value within the field's width, biased towards edges and small values."""
    pick = int(rng.integers(6))
    if pick == 0:
        return f.min_value
    if pick == 1:
        return f.max_value
    if pick <= 3:
        return int(np.clip(rng.integers(-1, 9), f.min_value, f.max_value))
    return int(rng.integers(f.min_value, f.max_value + 1))


def mutate_program(rng: np.random.Generator, program: Program) -> Program:
    p = copy.deepcopy(program)
    code = p.code
    for _ in range(int(rng.integers(1, 4))):
        kind = int(rng.integers(12))
        n = len(code)
        row = int(rng.integers(n)) if n else 0
        if kind <= 3 and n:  # one operand
            spec = isa.BY_OPCODE.get(int(code[row, 0]))
            if spec is not None and spec.fields:
                col = int(rng.integers(len(spec.fields)))
                code[row, col + 1] = field_value(rng, spec.fields[col])
        elif kind == 4 and n:  # another opcode, fresh operands
            spec = isa.INSTRUCTIONS[int(rng.integers(len(isa.INSTRUCTIONS)))]
            code[row] = 0
            code[row, 0] = spec.opcode
            for col, f in enumerate(spec.fields, start=1):
                code[row, col] = field_value(rng, f)
        elif kind == 5 and n > 1:  # swap two rows
            other = int(rng.integers(n))
            code[[row, other]] = code[[other, row]]
        elif kind == 6 and n:  # duplicate or drop a row
            if rng.integers(2):
                code = np.insert(code, row, code[row], axis=0)
            else:
                code = np.delete(code, row, axis=0)
        elif kind == 7 and p.buffers:  # a buffer width
            p.buffers[int(rng.integers(len(p.buffers)))] = int(rng.integers(0, 10))
        elif kind == 8 and p.images:  # an image of another shape or with large cells
            i = int(rng.integers(len(p.images)))
            rows = int(rng.integers(0, p.arch.rows + 2))
            cols = int(rng.integers(0, p.arch.cols + 2))
            top = 1 << p.arch.cell_bits if rng.integers(4) else 256
            cells = rng.integers(0, top, size=(rows, cols)).astype(np.uint8)
            p.images[i] = CrossbarImage(cells, bool(rng.integers(2)))
        elif kind == 9:  # a constant of another shape or with other shifts
            shape = (int(rng.integers(0, 5)), int(rng.integers(0, 6)))
            const = rng.integers(-100, 100, size=shape)
            if shape[0] > 2:
                const[2] = rng.integers(-1, 64, size=shape[1])
            if p.constants:
                p.constants[int(rng.integers(len(p.constants)))] = const
            else:
                p.constants.append(const)
        elif kind == 10 and p.buffers:  # rows per item of a buffer or a tensor
            rows = int(rng.choice([0, 1, 2, 4, 12, 13]))
            if rng.integers(2):
                p.buffer_rows[int(rng.integers(len(p.buffer_rows)))] = rows
            else:
                role = p.inputs if rng.integers(2) else p.outputs
                if role:
                    role[0] = TensorDesc(**{**role[0].to_dict(), "rows": rows})
        elif kind == 11:  # one value of an im2col geometry, near the valid one
            shaped = [c for c in p.constants if c.shape == (1, len(isa.IM2COL_PARAMS))]
            if shaped:
                const = shaped[int(rng.integers(len(shaped)))]
                j = int(rng.integers(const.shape[1]))
                const[0, j] = max(-1, int(const[0, j]) + int(rng.integers(-2, 3)))
    p.code = np.ascontiguousarray(code, dtype=np.int64)
    return p


def test_code_mutations(backend):
    rng = np.random.default_rng(99)
    outcomes = Outcomes()
    for i in range(CODE_MUTANTS):
        program, inputs = SEEDS[i % len(SEEDS)]
        mutant = mutate_program(rng, program)
        outcomes.run(f"code mutant {i}", lambda m=mutant: m, inputs, backend)
    outcomes.check(CODE_MUTANTS)
    assert outcomes.ok > CODE_MUTANTS // 20
    assert outcomes.rejected > CODE_MUTANTS // 4


def test_code_mutations_survive_encoding(backend):
    """Operand mutants that still fit their fields round-trip through the file format."""
    rng = np.random.default_rng(5)
    outcomes = Outcomes()
    total = 0
    for i in range(300):
        program, inputs = SEEDS[i % len(SEEDS)]
        mutant = mutate_program(rng, program)
        try:
            data = mutant.to_bytes()
        except Exception:  # tables a file cannot hold (e.g. empty images) are not encoded
            continue
        total += 1
        outcomes.run(f"encoded mutant {i}", lambda d=data: Program.from_bytes(d), inputs, backend)
    outcomes.check(total)


def test_backends_available_for_fuzzing():
    assert "numpy" in ready_backends()
