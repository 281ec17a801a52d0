"""The scaffolding shared by ``tvm-cim`` and ``cim-sim``: programs, exit statuses, argument
types and file access."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tvm_cim.cli import common
from tvm_cim.cli.common import (
    EXIT_BROKEN_PIPE,
    EXIT_OK,
    EXIT_USAGE,
    Cli,
    Command,
    FileError,
    UsageError,
)
from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError, ProgramError


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--flag", action="store_true")
    p.add_argument("--count", type=common.positive_int)


def _raising(exc: BaseException):
    def handler(args: argparse.Namespace) -> int:
        raise exc

    return handler


def _cli(handler) -> Cli:
    return Cli(
        prog="demo",
        description="a demo program",
        commands=(Command("go", "do it", _demo_arguments, handler),),
        version="demo 1.0",
    )


# ---------------------------------------------------------------------- exit statuses


def test_handler_status_is_returned(capsys):
    assert _cli(lambda args: EXIT_OK if args.flag else 7).main(["go", "--flag"]) == EXIT_OK
    assert _cli(lambda args: 7).main(["go"]) == 7
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (UsageError("input 'x' given twice"), 2, "demo: error: input 'x' given twice"),
        (CimError("bad\n  arch"), 2, "demo: error: bad arch"),
        (ProgramError("no", index=4), 2, "demo: error: instruction 4: no"),
        (FileError("cannot read"), 2, "demo: error: cannot read"),
        (CimError(), 2, "demo: error: CimError"),
        (RuntimeError("boom"), 3, "demo: error: unexpected RuntimeError: boom" + common.BUG_HINT),
    ],
    ids=["usage", "cim-error", "subclass", "file-error", "empty-message", "unexpected"],
)
def test_errors_map_to_the_shared_status(capsys, exc, status, line):
    cli = _cli(_raising(exc))
    assert cli.main(["go"]) == status
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == line + "\n"


def test_broken_pipe_stops_quietly(capsys, monkeypatch):
    duplicated = []
    monkeypatch.setattr(common.os, "open", lambda path, flags: 99)
    monkeypatch.setattr(common.os, "dup2", lambda fd, fd2: duplicated.append((fd, fd2)))
    monkeypatch.setattr(common.sys.stdout, "fileno", lambda: 1, raising=False)
    assert _cli(_raising(BrokenPipeError())).main(["go"]) == EXIT_BROKEN_PIPE
    assert (99, 1) in duplicated  # stdout pointed at /dev/null
    assert capsys.readouterr().err == ""


def test_usage_errors_are_one_line_naming_the_program(capsys):
    cli = _cli(lambda args: 0)
    for argv in (["go", "--nope"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == EXIT_USAGE
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("demo: error: ")
    with pytest.raises(SystemExit):
        cli.main(["go", "--count", "0"])
    assert capsys.readouterr().err == (
        "demo: error: argument --count: must be at least 1, got 0 (see 'demo go --help')\n"
    )


def test_version_and_help(capsys):
    for argv in (["--version"], ["--help"]):
        with pytest.raises(SystemExit) as exc:
            _cli(lambda args: 0).main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo 1.0" in out and "do it" in out


def test_a_subcommand_given_twice_is_refused():
    cmd = Command("go", "do it", _demo_arguments, lambda args: 0)
    with pytest.raises(ValueError, match="go"):
        Cli("demo", "a demo program", (cmd, cmd))


def test_both_programs_are_declared():
    from tvm_cim.cli.main import TVM_CIM
    from tvm_cim.cli.sim import CIM_SIM

    assert (TVM_CIM.prog, CIM_SIM.prog) == ("tvm-cim", "cim-sim")
    assert [c.name for c in TVM_CIM.commands] == [
        "compile",
        "inspect",
        "run",
        "train",
        "report",
        "search",
    ]
    assert [c.name for c in CIM_SIM.commands] == ["run", "asm", "disasm", "verify", "stats"]


_HEAVY = "[m for m in sys.modules if m.split('.')[0] in ('tvm', 'torch')]"


@pytest.mark.parametrize(
    "module, argv",
    [
        ("tvm_cim.cli.sim", None),
        ("tvm_cim.cli.common", None),
        ("tvm_cim.cli.sim", ["--help"]),  # parser built, every subcommand's options added
        ("tvm_cim.cli.main", ["--help"]),
    ],
    ids=["import-sim", "import-common", "cim-sim-help", "tvm-cim-help"],
)
def test_programs_start_without_tvm_or_torch(module, argv):
    """cim-sim needs numpy only; tvm-cim imports TVM in the subcommands that use it."""
    code = f"import sys, contextlib, io, {module} as m\n"
    if argv is not None:
        code += (
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            f"    m.main({argv!r})\n"
        )
    code += f"print({_HEAVY})"
    env = {**os.environ, "TVM_CIM_PURE_PYTHON": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ---------------------------------------------------------------------- argument types


def test_positive_int():
    assert common.positive_int("3") == 3
    for text, message in (("x", "'x' is not an integer"), ("0", "must be at least 1, got 0")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            common.positive_int(text)


def test_input_spec_and_paths():
    assert common.input_spec("x=a/b=c.npy") == ("x", "a/b=c.npy")
    for text in ("x", "=x.npy", "x="):
        with pytest.raises(argparse.ArgumentTypeError, match="expected NAME=FILE.npy"):
            common.input_spec(text)
    assert common.input_paths([("x", "a.npy"), ("y", "b.npy")]) == {"x": "a.npy", "y": "b.npy"}
    with pytest.raises(UsageError, match="input 'x' given twice"):
        common.input_paths([("x", "a.npy"), ("x", "b.npy")])


def test_inputs_argument_collects_every_input():
    p = argparse.ArgumentParser()
    common.add_inputs_argument(p, "an input")
    args = p.parse_args(["-i", "x=a.npy", "--input", "y=b.npy"])
    assert args.inputs == [("x", "a.npy"), ("y", "b.npy")]
    assert p.parse_args([]).inputs == []


@pytest.mark.parametrize(
    "role, default, words",
    [
        ("override", None, "instead of the program's own"),
        ("target", None, "default: the built-in default architecture"),
        ("study", "rram-4b", "default rram-4b"),
    ],
)
def test_arch_argument_roles(role, default, words):
    p = argparse.ArgumentParser()
    common.add_arch_argument(p, role)
    assert p.parse_args([]).arch == default
    assert p.parse_args(["--arch", "a.yaml"]).arch == "a.yaml"
    (action,) = [a for a in p._actions if a.dest == "arch"]
    assert words in action.help
    if role != "study":
        assert all(preset in action.help for preset in CimArch.presets())


# ---------------------------------------------------------------------- files


def test_write_json_and_npy_create_folders(tmp_path):
    common.write_json(tmp_path / "a" / "b.json", {"k": [1, 2]}, "report")
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == {"k": [1, 2]}
    common.write_npy(tmp_path / "c" / "y.npy", np.arange(3), "output")
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "y.npy"), np.arange(3))


def test_write_failure_names_what_and_where(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileError, match=r"^cannot write assembly .*dir: "):
        common.write_text(tmp_path / "dir", "text", "assembly")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FileError, match="cannot write statistics"):
        common.write_json(blocker / "s.json", {}, "statistics")


def test_load_npy(tmp_path):
    np.save(tmp_path / "x.npy", np.eye(2))
    np.testing.assert_array_equal(common.load_npy("x", str(tmp_path / "x.npy")), np.eye(2))
    np.savez(tmp_path / "x.npz", a=np.eye(2))
    (tmp_path / "junk.npy").write_bytes(b"not numpy\n")
    np.save(tmp_path / "obj.npy", np.array([{}], dtype=object), allow_pickle=True)
    cases = [
        ("x.npz", "input 'x': .*x.npz is an .npz archive, not an .npy file"),
        ("junk.npy", "input 'x'.*junk.npy"),
        ("obj.npy", "input 'x'.*obj.npy"),
        ("missing.npy", "cannot read input 'x' from .*missing.npy: "),
    ]
    for name, message in cases:
        with pytest.raises(CimError, match=message):
            common.load_npy("x", str(tmp_path / name))


def test_format_shape():
    assert common.format_shape((2, np.int64(3))) == "[2, 3]"
    assert common.format_shape(()) == "[]"


def test_package_runs_tvm_cim():
    from tvm_cim import __version__

    def run(*argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "tvm_cim.cli", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    done = run("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"tvm-cim {__version__}")
    done = run("frobnicate")
    assert done.returncode == EXIT_USAGE
    assert done.stderr.startswith("tvm-cim: error: ") and len(done.stderr.splitlines()) == 1


# ---------------------------------------------------------------------- quiet and short


def test_an_overlong_message_is_shortened_unless_verbose(capsys):
    message = "bad " + "x" * 1000
    assert _cli(_raising(CimError(message))).main(["go"]) == 2
    line = capsys.readouterr().err.rstrip("\n")
    assert len(line) == common.MAX_ERROR_LINE
    assert line.startswith("demo: error: bad xxx") and line.endswith(
        "(shortened; --verbose shows all)"
    )
    assert _cli(_raising(CimError(message))).main(["go", "--verbose"]) == 2
    assert capsys.readouterr().err == f"demo: error: {message}\n"


def test_an_unexpected_error_keeps_its_first_line_and_the_hint(capsys):
    exc = RuntimeError("what went wrong\n" + "IR text\n" * 500)
    assert _cli(_raising(exc)).main(["go"]) == 3
    err = capsys.readouterr().err
    assert err == f"demo: error: unexpected RuntimeError: what went wrong{common.BUG_HINT}\n"
    assert _cli(_raising(exc)).main(["--verbose", "go"]) == 3
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_third_party_warnings_are_silenced_unless_verbose(capsys):
    import warnings

    def warn(args):
        warnings.warn("numpy says something", RuntimeWarning, stacklevel=1)
        return EXIT_OK

    for argv, expected in ((["go"], []), (["go", "--verbose"], ["numpy says something"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _cli(warn).main(argv) == EXIT_OK
        assert [str(w.message) for w in caught] == expected
    assert capsys.readouterr().err == ""


def test_native_writes_to_stderr_are_silenced(capfd):
    def native(args):
        os.write(2, b"[12:00:00] src/relax/ir/block_builder.cc:67: Warning: ...\n")
        raise CimError("the error")

    assert _cli(native).main(["go"]) == 2
    assert capfd.readouterr().err == "demo: error: the error\n"
    assert _cli(native).main(["go", "--verbose"]) == 2
    assert "Warning" in capfd.readouterr().err


def test_a_failed_command_removes_the_folders_it_created(tmp_path):
    def write_then_fail(args):
        common.write_json(tmp_path / "a" / "b" / "c.json", {}, "report")
        common.write_json(tmp_path / "kept.json", {}, "report")
        raise CimError("later step failed")

    (tmp_path / "kept.json").write_text("{}")
    assert _cli(write_then_fail).main(["go"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_output_locations_are_checked_before_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    common.check_output_file(tmp_path / "new" / "deeper" / "r.json", "report")
    common.check_output_folder(tmp_path / "new", "programs")
    cases = [
        (lambda: common.check_output_file(tmp_path, "report"), "it is a folder"),
        (lambda: common.check_output_file(blocker / "r.json", "report"), "is not a folder"),
        (lambda: common.check_output_folder(blocker, "programs"), "it is a file"),
        (lambda: common.check_output_folder(blocker / "p", "programs"), "is not a folder"),
    ]
    for check, message in cases:
        with pytest.raises(FileError, match=message):
            check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
