"""The ``cim-sim`` command line, run as a separate process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_cim.codegen.matmul import lower_matmul
from tvm_cim.core.arch import CimArch
from tvm_cim.sim import Simulator
from tvm_cim.sim.asm import disassemble
from tvm_cim.sim.timing import estimate

ENV = {**os.environ, "TVM_CIM_PURE_PYTHON": "1"}
BATCH = 3


def cim_sim(*args, cwd=None, exe=None) -> subprocess.CompletedProcess:
    cmd = [exe] if exe else [sys.executable, "-m", "tvm_cim.cli.sim"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=120
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return proc.stdout


def summary(stdout: str) -> dict[str, str]:
    """The ``key: value`` lines of a printed summary."""
    out = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            out[key] = value.strip()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small matmul program, its weight and a batch of inputs, saved to disk."""
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(7)
    weight = rng.integers(-8, 8, size=(20, 6))
    program = lower_matmul(weight, w_bits=4, a_bits=4, arch=CimArch.preset("rram-4b"))
    program.save(d / "p.bin")
    x = rng.integers(0, 16, size=(BATCH, 20)).astype(np.uint8)
    np.save(d / "x.npy", x)
    return {"dir": d, "program": program, "weight": weight, "x": x}


@pytest.fixture(scope="module")
def functional_run(files):
    d = files["dir"]
    proc = cim_sim(
        "run",
        d / "p.bin",
        "--input",
        f"x={d / 'x.npy'}",
        "--output-dir",
        d / "out",
        "--stats",
        d / "run.json",
    )
    return ok(proc), json.loads((d / "run.json").read_text())


def test_run_matches_matmul(files, functional_run):
    stdout, stats = functional_run
    y = np.load(files["dir"] / "out" / "y.npy")
    np.testing.assert_array_equal(y, files["x"].astype(np.int64) @ files["weight"])
    expected = estimate(files["program"], BATCH)
    assert stats == json.loads(json.dumps(expected.to_dict()))
    assert stats["latency_us"] == expected.latency_us
    assert f"y  [{BATCH}, 6] int32 -> " in stdout
    report = summary(stdout)
    assert report["latency"] == f"{expected.latency_us:.3f} us"
    assert report["cycles"] == str(expected.cycles)
    assert report["crossbar writes"] == str(expected.crossbar_writes)
    assert report["MVM executions"] == str(expected.mvm_executions)
    assert report["instructions"].startswith(f"{len(files['program'])} (")


def test_timing_only_gives_the_same_stats(files, functional_run):
    d = files["dir"]
    ok(cim_sim("run", d / "p.bin", "--timing-only", "--batch", BATCH, "--stats", d / "t.json"))
    assert json.loads((d / "t.json").read_text()) == functional_run[1]


def test_asm_disasm_round_trip(files):
    d = files["dir"]
    ok(cim_sim("disasm", d / "p.bin", "-o", d / "p.s"))
    text = (d / "p.s").read_text()
    assert text == disassemble(files["program"])
    ok(cim_sim("asm", d / "p.s", "-o", d / "p2.bin"))
    assert ok(cim_sim("disasm", d / "p2.bin")) == text
    assert (d / "p2.bin").read_bytes() == (d / "p.bin").read_bytes()


def test_verify(files):
    out = ok(cim_sim("verify", files["dir"] / "p.bin", "--arch", "rram-4b"))
    assert out.startswith(f"ok: {len(files['program'])} instructions")


def test_stats_prints_the_estimate(files):
    d = files["dir"]
    out = ok(cim_sim("stats", d / "p.bin", "--batch", 5, "--json", d / "s.json"))
    expected = estimate(files["program"], 5)
    assert json.loads((d / "s.json").read_text()) == json.loads(json.dumps(expected.to_dict()))
    report = summary(out)
    assert report["batch"] == "5"
    assert report["latency"] == f"{expected.latency_us:.3f} us"
    assert report["sequential latency"] == f"{expected.sequential_latency_us:.3f} us"
    assert report["cycles"] == str(expected.cycles)
    assert report["MVM executions"] == str(expected.mvm_executions)
    counts = " ".join(f"{m}={n}" for m, n in sorted(expected.instructions.items()))
    assert report["instructions"] == f"{sum(expected.instructions.values())} ({counts})"


def test_installed_entry_point(files):
    exe = Path(sys.executable).with_name("cim-sim")
    if not exe.exists():
        exe = shutil.which("cim-sim")
        if exe is None:
            pytest.skip("cim-sim is not installed")
    out = ok(cim_sim("verify", files["dir"] / "p.bin", exe=str(exe)))
    assert out.startswith("ok: ")


def test_help_lists_every_subcommand():
    out = ok(cim_sim("--help"))
    for name in ("run", "asm", "disasm", "verify", "stats"):
        assert name in out
    assert "--backend" in ok(cim_sim("run", "--help"))


@pytest.fixture(scope="module")
def broken(files):
    """Broken programs and inputs for the error cases; returns the data folder."""
    d = files["dir"]
    raw = files["program"].to_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    (d / "truncated.bin").write_bytes(raw[: len(raw) // 2])
    (d / "corrupt.bin").write_bytes(bytes(flipped))
    (d / "magic.bin").write_bytes(b"NOTPROG\0" + raw[8:])
    (d / "notnpy.npy").write_bytes(b"this is not numpy data\n")
    np.save(d / "wide.npy", np.zeros((BATCH, 21), np.uint8))
    x = files["x"].astype(np.int32)
    x[0, 0] = 16  # inputs are unsigned 4-bit
    np.save(d / "big.npy", x)
    return d


ERRORS = [
    # (arguments with {d} for the data folder, exit status, text in the message)
    (["run", "{d}/missing.bin", "-i", "x={d}/x.npy"], 2, "cannot read program"),
    (["verify", "{d}/truncated.bin"], 2, "offset"),
    (["run", "{d}/corrupt.bin", "-i", "x={d}/x.npy"], 2, "checksum"),
    (["disasm", "{d}/magic.bin"], 2, "bad magic"),
    (["run", "{d}/p.bin", "-i", "x={d}/wide.npy"], 2, "shape"),
    (["run", "{d}/p.bin", "-i", "z={d}/x.npy"], 2, "unknown input"),
    (["run", "{d}/p.bin", "-i", "x={d}/big.npy"], 2, "range"),
    (["run", "{d}/p.bin", "-i", "x={d}/notnpy.npy"], 2, ".npy"),
    (["run", "{d}/p.bin", "-i", "x"], 2, "NAME=FILE.npy"),
    (["run", "{d}/p.bin", "-i", "x={d}/x.npy", "--backend", "fortran"], 2, "backend"),
    (["simulate", "{d}/p.bin"], 2, "invalid choice"),
    (["disasm", "{d}/p.bin", "-o", "{d}"], 2, "cannot write assembly"),
    (["stats", "{d}/p.bin", "--json", "{d}/x.npy/s.json"], 2, "cannot write statistics"),
]


@pytest.mark.parametrize("args, status, message", ERRORS, ids=[f"{a[0]}-{m}" for a, _, m in ERRORS])
def test_errors_are_one_line(broken, args, status, message):
    proc = cim_sim(*(a.format(d=broken) for a in args))
    assert proc.returncode == status, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cim-sim: error: ")
    assert message in lines[0]


def test_conv_program_with_rows(tmp_path):
    """A program with several rows per item: shapes in the summaries, [batch, rows, C] input."""
    from tests.sim.test_program_format import conv_built

    program = conv_built()
    program.save(tmp_path / "conv.bin")
    out = ok(cim_sim("verify", tmp_path / "conv.bin"))
    assert "inputs x[2, 20, 2] uint8; outputs y[2, 6, 8] int32" in out
    x = np.random.default_rng(0).integers(0, 16, (2, 20, 2)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    out = ok(
        cim_sim(
            "run", tmp_path / "conv.bin", "-i", f"x={tmp_path / 'x.npy'}", "--output-dir", tmp_path
        )
    )
    assert "y  [12, 8] int32 -> " in out
    expected = Simulator(backend="numpy").run(program, {"x": x}).outputs["y"]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    assert "y  [12, 8] int32" in ok(cim_sim("stats", tmp_path / "conv.bin"))
    ok(cim_sim("disasm", tmp_path / "conv.bin", "-o", tmp_path / "conv.s"))
    assert (tmp_path / "conv.s").read_text() == disassemble(program)
    ok(cim_sim("asm", tmp_path / "conv.s", "-o", tmp_path / "conv2.bin"))
    assert (tmp_path / "conv2.bin").read_bytes() == (tmp_path / "conv.bin").read_bytes()
