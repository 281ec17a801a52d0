"""Bad input through ``cim-sim``: exit status 2, one short line on stderr, no traceback,
no file left where outputs would go, for every case of the table."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from tvm_cim.cli.sim import main
from tvm_cim.core.arch import CimArch
from tvm_cim.sim import ProgramBuilder, TensorDesc

BIG = "1" + "0" * 400


def _program(name: str = "p") -> bytes:
    """``y = x`` through one buffer: two uint8 columns in, two int32 columns out."""
    b = ProgramBuilder(CimArch(rows=4, cols=4), name)
    b.input(TensorDesc("x", 2, "uint8", 4, False))
    b.output(TensorDesc("y", 2, "int32", 32, True))
    b.buffer(2)
    b.emit("load", dst=0, dst_col=0, tensor=0, src_col=0, ncols=2)
    b.emit("store", tensor=0, dst_col=0, src=0, src_col=0, ncols=2)
    b.emit("halt")
    return b.build().to_bytes()


def _with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def _huge_rows_program() -> bytes:
    """A valid file whose META claims a buffer of 2**40 rows (the verifier refuses it)."""
    data = _program()
    length = struct.unpack_from("<Q", data, 16 + 8)[0]
    meta = json.loads(data[32 : 32 + length])
    meta["buffer_rows"] = [2**40]
    text = json.dumps(meta).encode()
    body = data[:16] + struct.pack("<4sIQ", b"META", 0, len(text)) + text
    return _with_crc(body + data[32 + length : -4])


def _huge_section_program() -> bytes:
    """A section header claiming 2**63 bytes, the checksum recomputed."""
    data = bytearray(_program()[:-4])
    struct.pack_into("<Q", data, 16 + 8, 2**63)
    return _with_crc(bytes(data))


def _npy_claiming(shape: tuple, descr: str = "<i8") -> bytes:
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    text = repr(header).encode()
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def _files(tmp):
    """Every file the cases name, under ``tmp``."""
    (tmp / "p.cimprog").write_bytes(_program())
    (tmp / "spaced.cimprog").write_bytes(_program("has space"))
    good = _program()
    (tmp / "trunc1.cimprog").write_bytes(good[:10])
    (tmp / "trunc2.cimprog").write_bytes(good[: len(good) // 2])
    (tmp / "trunc3.cimprog").write_bytes(good[:-1])
    flipped = bytearray(good)
    flipped[40] ^= 0x10
    (tmp / "flip.cimprog").write_bytes(bytes(flipped))
    (tmp / "hugerows.cimprog").write_bytes(_huge_rows_program())
    (tmp / "hugesection.cimprog").write_bytes(_huge_section_program())
    (tmp / "folder").mkdir()
    (tmp / "afile").write_text("not a folder")
    np.save(tmp / "x.npy", np.ones((3, 2), np.uint8))
    (tmp / "huge.npy").write_bytes(_npy_claiming((2**40,)))
    np.save(tmp / "big_endian.npy", np.ones((3, 2), ">i4"))
    np.save(tmp / "complex.npy", np.ones((3, 2), complex))
    np.save(tmp / "string.npy", np.array([["a", "b"]]))
    np.save(tmp / "object.npy", np.array([[1, None]], object), allow_pickle=True)
    np.save(tmp / "nan.npy", np.full((3, 2), np.nan))
    np.save(tmp / "float.npy", np.ones((3, 2)))
    np.save(tmp / "range.npy", np.full((3, 2), 99, np.int64))
    np.save(tmp / "shape.npy", np.ones((3, 5), np.uint8))
    np.savez(tmp / "archive.npy.npz", x=np.ones((3, 2), np.uint8))
    (tmp / "archive.npz.npy").write_bytes((tmp / "archive.npy.npz").read_bytes())
    (tmp / "truncated.npy").write_bytes((tmp / "x.npy").read_bytes()[:-3])
    (tmp / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00\xff\xff{" + b"(" * 300)
    (tmp / "huge.json").write_text('{"rows": ' + "9" * 5000 + "}")
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "bigconst.s").write_text(
        ".arch rram-4b\n.const c0 rows=4294967296 cols=1\n.code\nhalt\n"
    )
    (tmp / "wideconst.s").write_text(
        ".arch rram-4b\n.const c0 rows=1 cols=4294967295\n1\n.code\nhalt\n"
    )
    (tmp / "hugeimage.s").write_text(".arch rram-4b\n.image img0 rows=70000 cols=1\n.code\nhalt\n")
    (tmp / "badname.s").write_text('.arch rram-4b\n.input "open width=2\n.code\nhalt\n')
    (tmp / "notutf8.s").write_bytes(b"\xff\xfe.arch")
    return tmp


RUN = ["run", "DIR/p.cimprog", "--output-dir", "DIR/out"]
X = ["--input", "x=DIR/x.npy"]
CASES = {
    "input claims 8 TiB": [*RUN, "--input", "x=DIR/huge.npy"],
    "big-endian input": [*RUN, "--input", "x=DIR/big_endian.npy"],
    "complex input": [*RUN, "--input", "x=DIR/complex.npy"],
    "string input": [*RUN, "--input", "x=DIR/string.npy"],
    "object (pickle) input": [*RUN, "--input", "x=DIR/object.npy"],
    "NaN input": [*RUN, "--input", "x=DIR/nan.npy"],
    "float input": [*RUN, "--input", "x=DIR/float.npy"],
    "input out of range": [*RUN, "--input", "x=DIR/range.npy"],
    "input of the wrong shape": [*RUN, "--input", "x=DIR/shape.npy"],
    "unknown input": [*RUN, *X, "--input", "z=DIR/x.npy"],
    "missing input": [*RUN],
    ".npz given as .npy": [*RUN, "--input", "x=DIR/archive.npz.npy"],
    "truncated .npy": [*RUN, "--input", "x=DIR/truncated.npy"],
    "garbage .npy header": [*RUN, "--input", "x=DIR/garbage.npy"],
    "input file missing": [*RUN, "--input", "x=DIR/nothing.npy"],
    "input is a directory": [*RUN, "--input", "x=DIR/folder"],
    "program missing": ["run", "DIR/nothing.cimprog", *X],
    "program is a directory": ["run", "DIR/folder", *X],
    "program truncated in the header": ["verify", "DIR/trunc1.cimprog"],
    "program truncated in half": ["run", "DIR/trunc2.cimprog", *X],
    "program without its checksum": ["stats", "DIR/trunc3.cimprog"],
    "program with a flipped bit": ["disasm", "DIR/flip.cimprog", "-o", "DIR/out/p.s"],
    "program claiming 2**40 rows": ["run", "DIR/hugerows.cimprog", *X],
    "program claiming a 2**63-byte section": ["run", "DIR/hugesection.cimprog", *X],
    "arch with a 5000-digit integer": ["run", "DIR/p.cimprog", *X, "--arch", "DIR/huge.json"],
    "arch nested 100000 deep": ["verify", "DIR/p.cimprog", "--arch", "DIR/deep.json"],
    "asm of a const with 2**32 rows": ["asm", "DIR/bigconst.s", "-o", "DIR/out/p.cimprog"],
    "asm of a const with 2**32-1 cols": ["asm", "DIR/wideconst.s", "-o", "DIR/out/p.cimprog"],
    "asm of a 70000-row image": ["asm", "DIR/hugeimage.s", "-o", "DIR/out/p.cimprog"],
    "asm of an unterminated quoted name": ["asm", "DIR/badname.s", "-o", "DIR/out/p.cimprog"],
    "asm of text that is not UTF-8": ["asm", "DIR/notutf8.s", "-o", "DIR/out/p.cimprog"],
    "asm to an unwritable -o": ["asm", "DIR/spaced.s", "-o", "DIR/afile/p.cimprog"],
    "disasm to an unwritable -o": ["disasm", "DIR/p.cimprog", "-o", "DIR/afile/p.s"],
    "stats with a 400-digit batch": [
        "stats",
        "DIR/p.cimprog",
        "--batch",
        BIG,
        "--json",
        "DIR/out/s",
    ],
    "timing-only run with a 400-digit batch": [
        "run",
        "DIR/p.cimprog",
        "--timing-only",
        "--batch",
        BIG,
    ],
    "timing-only run of 2**40 items": [
        "run",
        "DIR/p.cimprog",
        "--timing-only",
        "--batch",
        "1099511627776",
    ],
    "stats with batch 0": ["stats", "DIR/p.cimprog", "--batch", "0"],
    "run with an unwritable --stats": [*RUN, *X, "--stats", "DIR/afile/stats.json"],
    "run with an --output-dir under a file": [
        "run",
        "DIR/p.cimprog",
        *X,
        "--output-dir",
        "DIR/afile/o",
    ],
    "stats with an unwritable --json": ["stats", "DIR/p.cimprog", "--json", "DIR/afile/s.json"],
    "memory limit exceeded": [*RUN, *X, "--memory-limit", "64"],
    "work limit exceeded": [*RUN, *X, "--work-limit", "10"],
    "memory limit that is no size": [*RUN, *X, "--memory-limit", "lots"],
    "work limit that is no count": [*RUN, *X, "--work-limit", "1e999"],
    "--output-dir with --timing-only": [*RUN, *X, "--timing-only"],
    "unknown subcommand": ["frobnicate"],
}
#: Cases that set the environment: (variable, value).
ENVIRONMENT = {
    "memory limit from the environment exceeded": ("TVM_CIM_SIM_MEMORY_LIMIT", "100"),
    "work limit from the environment exceeded": ("TVM_CIM_SIM_WORK_LIMIT", "3"),
    "memory limit variable that is no size": ("TVM_CIM_SIM_MEMORY_LIMIT", "-4G"),
    "array limit from the environment exceeded": ("TVM_CIM_MAX_ARRAY_BYTES", "4"),
}


def _status(args) -> int:
    try:
        return main(args)
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code


def _leftovers(folder) -> list:
    """Files in the places outputs go: ``out/`` and the stats and program files."""
    out = folder / "out"
    left = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    return left + [p for p in (folder / "stats.json", folder / "afile" / "o") if p.exists()]


def _check(folder, capsys, args) -> None:
    args = [a.replace("DIR", str(folder)) for a in args]
    status = _status(args)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert len(err) <= 201, err  # the line and its newline
    assert err.startswith("cim-sim: error: ") and "Traceback" not in err
    assert not _leftovers(folder)


@pytest.mark.parametrize("args", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_one_line_with_status_2(tmp_path, capsys, args):
    folder = _files(tmp_path)
    (folder / "spaced.s").write_text("not assembly\n")
    _check(folder, capsys, args)


@pytest.mark.parametrize(("variable", "value"), list(ENVIRONMENT.values()), ids=list(ENVIRONMENT))
def test_bad_environment_is_one_line_with_status_2(tmp_path, capsys, monkeypatch, variable, value):
    folder = _files(tmp_path)
    monkeypatch.setenv(variable, value)
    _check(folder, capsys, [*RUN, *X])


def test_the_good_run_of_the_table_succeeds(tmp_path, capsys):
    """The table's files are bad only where a case says so."""
    folder = _files(tmp_path)
    args = [a.replace("DIR", str(folder)) for a in [*RUN, *X, "--stats", "DIR/stats.json"]]
    assert main(args) == 0
    assert np.array_equal(np.load(folder / "out" / "y.npy"), np.ones((3, 2), np.int32))
    assert json.loads((folder / "stats.json").read_text())["batch"] == 3


def test_names_with_spaces_survive_disasm_then_asm(tmp_path, capsys):
    folder = _files(tmp_path)
    s, again = folder / "spaced.s", folder / "again.cimprog"
    assert main(["disasm", str(folder / "spaced.cimprog"), "-o", str(s)]) == 0
    assert main(["asm", str(s), "-o", str(again)]) == 0
    assert again.read_bytes() == (folder / "spaced.cimprog").read_bytes()
