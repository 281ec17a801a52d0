"""Numbers are range-checked where they enter: one line on stderr, exit status 2, no
traceback, whatever the number (NaN, negative, 400 digits) or the file that holds it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tvm_cim.cli.main import main as tvm_cim_main
from tvm_cim.cli.sim import main as cim_sim_main

BIG = "1" + "0" * 400


def _files(tmp_path):
    (tmp_path / "slow.json").write_text(json.dumps({"write_latency_us": 1e307}))
    (tmp_path / "huge.json").write_text('{"rows": ' + "9" * 5000 + "}")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    return tmp_path


def _status(program, args) -> int:
    """The exit status, whether ``program`` returns it or argparse exits with it."""
    try:
        return program(args)
    except SystemExit as exc:
        return exc.code


TRAIN = ["train", "--model", "digits-cnn", "--dataset", "digits", "--out", "OUT"]
CASES = [
    (tvm_cim_main, [*TRAIN, "--lr", "nan"], "--lr: must be a finite number above 0"),
    (tvm_cim_main, [*TRAIN, "--lr", "-1"], "--lr: must be a finite number above 0"),
    (tvm_cim_main, [*TRAIN, "--lr", "inf"], "--lr: must be a finite number above 0"),
    (tvm_cim_main, [*TRAIN, "--seed", str(2**70)], "--seed: must be in 0..4294967295"),
    (tvm_cim_main, [*TRAIN, "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (tvm_cim_main, ["report", "--model", "resnet20", "--arch", "DIR/slow.json"], "<= 1e+15"),
    (tvm_cim_main, ["report", "--model", "resnet20", "--arch", "DIR/huge.json"], "invalid JSON"),
    (tvm_cim_main, ["report", "--model", "resnet20", "--arch", "DIR/deep.json"], "invalid JSON"),
    (cim_sim_main, ["stats", "p.cimprog", "--batch", BIG], "--batch: must be in 1.."),
    (cim_sim_main, ["run", "p.cimprog", "--timing-only", "--batch", BIG], "(401 digits)"),
]


@pytest.mark.parametrize(("program", "args", "message"), CASES, ids=lambda v: None)
def test_bad_numbers_are_one_line_with_status_2(tmp_path, capsys, program, args, message):
    folder = _files(tmp_path)
    args = [a.replace("DIR", str(folder)).replace("OUT", str(folder / "out")) for a in args]
    assert _status(program, args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert len(err) < 300
    assert not (folder / "out").exists()  # nothing started, nothing left


def test_the_simulator_memory_bound_speaks_integers_for_any_batch():
    from tvm_cim.codegen import lower_matmul
    from tvm_cim.core.arch import CimArch
    from tvm_cim.core.errors import InputError
    from tvm_cim.sim import Simulator

    weight = np.ones((4, 3), dtype=np.int64)
    program = lower_matmul(weight, w_bits=4, a_bits=4, arch=CimArch())
    prepared = Simulator(CimArch()).prepare(program)
    with pytest.raises(InputError, match="over 10[*][*]12 needs more than a million GiB"):
        prepared._check_memory(10**400)
