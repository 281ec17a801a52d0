"""Bad input through ``tvm-cim``: one line on stderr, exit status 2, nothing left behind.

Each case of the table gives ``tvm-cim`` something a careless or hostile user might: a
``.npy`` header claiming terabytes, big-endian, complex, string and NaN inputs, numbers
out of range, arch files with huge integers or deep nesting, outputs that cannot be
written, truncated and swapped libraries, files that are not models. Every case must end
with status 2, exactly one line on stderr of at most 200 characters naming what is wrong,
no traceback, and no file or folder left in the case's folder. Library cases run as fresh
processes, since loading a bad library is where a signal could occur; the rest run in
this process, with stderr captured at the file-descriptor level so that warnings printed
by TVM's C++ side count as well.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tests.cli.test_tvm_cli import qdq_mlp  # noqa: E402
from tvm_cim.cli.main import main  # noqa: E402
from tvm_cim.compiler.library import digest_path  # noqa: E402

MAX_LINE = 200
TRAIN = ["train", "--model", "digits-mlp", "--dataset", "digits", "--epochs", "1", "--no-progress"]


# ------------------------------------------------------------------------- shared files


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """A QDQ model, its input, its library (with digest) and a second, different library."""
    d = tmp_path_factory.mktemp("shared")
    files = {"qdq": qdq_mlp(d / "qdq.onnx"), "qdq4": qdq_mlp(d / "qdq4.onnx", batch=4)}
    files["x"] = d / "x.npy"
    np.save(files["x"], np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32))
    for key, model in (("lib", "qdq"), ("lib4", "qdq4")):
        files[key] = d / f"{key}.so"
        assert main(["compile", str(files[model]), "-o", str(files[key])]) == 0
    return files


def _huge_npy(path: Path) -> Path:
    """A 128-byte ``.npy`` whose header claims 8 TiB of float32."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1099511627776), }"
    header = header.ljust(128 - 10 - 1) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    return path


def _one_node_model(path: Path, node, initializers=()) -> Path:
    """An ONNX model ``x [2, 16] -> node -> y`` (shapes not checked)."""
    graph = helper.make_graph(
        [node],
        "one_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.write_bytes(model.SerializeToString())
    return path


def _relu_model(path: Path) -> Path:
    """An ONNX model with no operator the crossbars could run."""
    return _one_node_model(path, helper.make_node("Relu", ["x"], ["y"], name="relu"))


def _mismatched_matmul(path: Path) -> Path:
    """A MatMul of a [2, 16] input by an [8, 4] weight: TVM's frontend refuses it (and
    its C++ side prints a warning as the half-built module is freed)."""
    weight = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    return _one_node_model(path, helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), [weight])


@dataclass
class Case:
    """One bad input: the arguments (made from the shared files and the case's folder), a
    fragment the error line must contain, and whether it runs as a fresh process."""

    make: Callable[[dict, Path], list]
    fragment: str
    subprocess: bool = False


def _blocker(d: Path) -> Path:
    """A regular file where a folder is expected."""
    path = d / "blocker"
    path.write_text("a file, not a folder\n")
    return path


def _save(d: Path, name: str, array: np.ndarray) -> Path:
    path = d / name
    np.save(path, array, allow_pickle=array.dtype == object)
    return path


def _write(d: Path, name: str, text: str) -> Path:
    path = d / name
    path.write_text(text)
    return path


def _run(s: dict, *extra) -> list:
    return ["run", s["lib"], *extra]


def _x(path: Path) -> list:
    return ["--input", f"x={path}"]


def _compile(s: dict, d: Path, *extra) -> list:
    return ["compile", s["qdq"], "-o", d / "out" / "m.so", *extra]


def _library_copy(s: dict, d: Path, data: bytes, sidecar: bool = True) -> Path:
    """``d/m.so`` holding ``data``, with the shared library's digest beside it."""
    path = d / "m.so"
    path.write_bytes(data)
    if sidecar and digest_path(s["lib"]).exists():
        digest_path(path).write_bytes(digest_path(s["lib"]).read_bytes())
    return path


def _truncated(fraction: float | int):
    def make(s: dict, d: Path) -> list:
        data = s["lib"].read_bytes()
        size = fraction if isinstance(fraction, int) else int(len(data) * fraction)
        return _run({"lib": _library_copy(s, d, data[:size])}, *_x(s["x"]))

    return make


def _truncated_unchecked(s: dict, d: Path) -> list:
    data = s["lib"].read_bytes()
    path = _library_copy(s, d, data[: len(data) // 2], sidecar=False)
    return ["run", path, "--no-digest", *_x(s["x"])]


def _swapped(s: dict, d: Path) -> list:
    return _run({"lib": _library_copy(s, d, s["lib4"].read_bytes())}, *_x(s["x"]))


def _bad_digest_file(s: dict, d: Path) -> list:
    path = _library_copy(s, d, s["lib"].read_bytes(), sidecar=False)
    digest_path(path).write_text("[" * 100_000)
    return _run({"lib": path}, *_x(s["x"]))


def _arch(d: Path, text: str) -> Path:
    return _write(d, "arch.json", text)


CASES: dict[str, Case] = {
    # ---- run: inputs
    "run-input-8tib-npy": Case(lambda s, d: _run(s, *_x(_huge_npy(d / "huge.npy"))), "huge.npy"),
    "run-input-big-endian": Case(
        lambda s, d: _run(s, *_x(_save(d, "be.npy", np.ones((2, 16), ">f4")))), "'x'"
    ),
    "run-input-complex": Case(
        lambda s, d: _run(s, *_x(_save(d, "c.npy", np.ones((2, 16), np.complex64)))), "'x'"
    ),
    "run-input-string": Case(
        lambda s, d: _run(s, *_x(_save(d, "s.npy", np.full((2, 16), "ab")))), "'x'"
    ),
    "run-input-object": Case(
        lambda s, d: _run(s, *_x(_save(d, "o.npy", np.array([{}], dtype=object)))), "'x'"
    ),
    "run-input-nan": Case(
        lambda s, d: _run(s, *_x(_save(d, "n.npy", np.full((2, 16), np.nan, np.float32)))),
        "NaN",
    ),
    "run-input-inf": Case(
        lambda s, d: _run(s, *_x(_save(d, "i.npy", np.full((2, 16), np.inf, np.float32)))),
        "infinite",
    ),
    "run-input-wrong-shape": Case(
        lambda s, d: _run(s, *_x(_save(d, "w.npy", np.ones((3, 16), np.float32)))), "x"
    ),
    "run-input-npz": Case(
        lambda s, d: _run(s, "--input", f"x={_npz(d)}"), "x.npz"
    ),
    "run-input-missing": Case(lambda s, d: _run(s, *_x(d / "nope.npy")), "nope.npy"),
    "run-input-truncated-data": Case(
        lambda s, d: _run(s, *_x(_truncate(_save(d, "t.npy", np.ones((2, 16), np.float32))))),
        "t.npy",
    ),
    "run-input-unknown-name": Case(lambda s, d: _run(s, "--input", f"y={s['x']}"), "'y'"),
    # ---- run: outputs
    "run-stats-under-file": Case(
        lambda s, d: _run(s, *_x(s["x"]), "--output-dir", d / "out", "--stats", _blocker(d) / "s.json"),
        "blocker",
    ),
    "run-stats-is-dir": Case(
        lambda s, d: _run(s, *_x(s["x"]), "--output-dir", d / "out", "--stats", d), "statistics"
    ),
    "run-output-dir-is-file": Case(
        lambda s, d: _run(s, *_x(s["x"]), "--output-dir", _blocker(d)), "blocker"
    ),
    # ---- run: libraries (fresh processes)
    "lib-missing": Case(lambda s, d: _run({"lib": d / "nope.so"}, *_x(s["x"])), "nope.so", True),
    "lib-directory": Case(lambda s, d: _run({"lib": d}, *_x(s["x"])), "not a file", True),
    "lib-empty": Case(_truncated(0), "m.so", True),
    "lib-truncated-16": Case(_truncated(16), "m.so", True),
    "lib-truncated-64": Case(_truncated(64), "m.so", True),
    "lib-truncated-4096": Case(_truncated(4096), "m.so", True),
    "lib-truncated-half": Case(_truncated(0.5), "m.so", True),
    "lib-truncated-last-byte": Case(_truncated(0.99999), "m.so", True),
    "lib-truncated-no-digest": Case(_truncated_unchecked, "m.so", True),
    "lib-swapped": Case(_swapped, "m.so", True),
    "lib-text": Case(
        lambda s, d: _run({"lib": _write(d, "m.so", "not a library\n")}, *_x(s["x"]), "--no-digest"),
        "m.so",
        True,
    ),
    "lib-without-digest": Case(
        lambda s, d: _run({"lib": _library_copy(s, d, s["lib"].read_bytes(), False)}, *_x(s["x"])),
        "--no-digest",
        True,
    ),
    "lib-bad-digest-file": Case(_bad_digest_file, "m.so.json", True),
    "lib-onnx-as-library": Case(lambda s, d: ["run", s["qdq"], *_x(s["x"])], "qdq.onnx", True),
    # ---- compile: output locations, checked before the work
    "compile-output-is-dir": Case(lambda s, d: ["compile", s["qdq"], "-o", d], "folder"),
    "compile-output-under-file": Case(
        lambda s, d: ["compile", s["qdq"], "-o", _blocker(d) / "m.so"], "blocker"
    ),
    "compile-report-under-file": Case(
        lambda s, d: _compile(s, d, "--report", _blocker(d) / "r.json"), "blocker"
    ),
    "compile-report-is-dir": Case(lambda s, d: _compile(s, d, "--report", d), "folder"),
    "compile-dump-under-file": Case(
        lambda s, d: _compile(s, d, "--report", d / "out" / "r.json", "--dump-programs", _blocker(d) / "p"),
        "blocker",
    ),
    "compile-cost-only-report-under-file": Case(
        lambda s, d: ["compile", s["qdq"], "--cost-only", "--report", _blocker(d) / "r.json"],
        "blocker",
    ),
    # ---- compile: precision, arch and model files
    "compile-precision-8tib-npy": Case(
        lambda s, d: _compile(s, d, "--precision", _huge_npy(d / "p.npy")), "p.npy"
    ),
    "compile-precision-npz": Case(
        lambda s, d: _compile(s, d, "--precision", _npz(d)), "x.npz"
    ),
    "compile-precision-missing": Case(
        lambda s, d: _compile(s, d, "--precision", d / "nope.yaml"), "nope.yaml"
    ),
    "compile-precision-binary": Case(
        lambda s, d: _compile(s, d, "--precision", _bytes(d, "p.yaml")), "p.yaml"
    ),
    "compile-arch-huge-int": Case(
        lambda s, d: _compile(s, d, "--arch", _arch(d, '{"rows": ' + "9" * 5000 + "}")), "arch.json"
    ),
    "compile-arch-deep": Case(
        lambda s, d: _compile(s, d, "--arch", _arch(d, "[" * 100_000 + "]" * 100_000)), "arch.json"
    ),
    "compile-arch-latency-1e307": Case(
        lambda s, d: _compile(s, d, "--arch", _arch(d, '{"write_latency_us": 1e307}')), "1e+15"
    ),
    "compile-cost-only-arch-latency-1e307": Case(
        lambda s, d: ["compile", s["qdq"], "--cost-only", "--arch", _arch(d, '{"write_latency_us": 1e307}')],
        "1e+15",
    ),
    "compile-arch-missing": Case(lambda s, d: _compile(s, d, "--arch", d / "a.json"), "a.json"),
    "compile-model-missing": Case(
        lambda s, d: ["compile", d / "nope.onnx", "-o", d / "out" / "m.so"], "nope.onnx"
    ),
    "compile-model-text": Case(
        lambda s, d: ["compile", _write(d, "m.onnx", "hello\n"), "-o", d / "out" / "m.so"], "m.onnx"
    ),
    "compile-model-random-bytes": Case(
        lambda s, d: ["compile", _bytes(d, "m.onnx"), "-o", d / "out" / "m.so"], "m.onnx"
    ),
    "compile-model-directory": Case(lambda s, d: ["compile", d, "-o", d / "out" / "m.so"], "not a file"),
    "compile-model-frontend-refuses-node": Case(
        lambda s, d: ["compile", _mismatched_matmul(d / "mm.onnx"), "-o", d / "out" / "m.so"],
        "node 'mm' (MatMul)",
        True,
    ),
    "compile-calibration-missing": Case(
        lambda s, d: _compile(s, d, "--calibration", d / "c.npz"), "c.npz"
    ),
    "compile-input-shape-unknown": Case(
        lambda s, d: _compile(s, d, "--input-shape", "z:2,16"), "'z'"
    ),
    # ---- train
    "train-lr-nan": Case(lambda s, d: [*TRAIN, "--out", d / "out", "--lr", "nan"], "--lr"),
    "train-lr-negative": Case(lambda s, d: [*TRAIN, "--out", d / "out", "--lr", "-1"], "--lr"),
    "train-seed-2**70": Case(lambda s, d: [*TRAIN, "--out", d / "out", "--seed", str(2**70)], "--seed"),
    "train-epochs-negative": Case(lambda s, d: [*TRAIN, "--out", d / "out", "--epochs", "-1"], "--epochs"),
    "train-out-is-file": Case(lambda s, d: [*TRAIN, "--out", _blocker(d)], "blocker"),
    "train-out-under-file": Case(lambda s, d: [*TRAIN, "--out", _blocker(d) / "o"], "blocker"),
    "train-precision-8tib-npy": Case(
        lambda s, d: [*TRAIN, "--out", d / "out", "--precision", _huge_npy(d / "p.npy")], "p.npy"
    ),
    "train-precision-missing": Case(
        lambda s, d: [*TRAIN, "--out", d / "out", "--precision", d / "p.yaml"], "p.yaml"
    ),
    "train-from-missing": Case(lambda s, d: [*TRAIN, "--out", d / "out", "--from", d / "c.pt"], "c.pt"),
    "train-from-not-a-checkpoint": Case(
        lambda s, d: [*TRAIN, "--out", d / "out", "--from", _bytes(d, "c.pt")], "c.pt"
    ),
    "train-unknown-model": Case(
        lambda s, d: ["train", "--model", "nope", "--dataset", "digits", "--out", d / "out"], "nope"
    ),
    "train-unknown-dataset": Case(
        lambda s, d: ["train", "--model", "digits-mlp", "--dataset", "nope", "--out", d / "out"], "nope"
    ),
    # ---- report
    "report-json-under-file": Case(
        lambda s, d: ["report", "--model", "digits-mlp", "--json", _blocker(d) / "r.json"], "blocker"
    ),
    "report-unknown-model": Case(lambda s, d: ["report", "--model", "nope"], "nope"),
    "report-precision-npz": Case(
        lambda s, d: ["report", "--model", "digits-mlp", "--precision", _npz(d)], "x.npz"
    ),
    "report-precision-8tib-npy": Case(
        lambda s, d: ["report", "--model", "digits-mlp", "--precision", _huge_npy(d / "p.npy")], "p.npy"
    ),
    # ---- search: settings checked before the base model is trained
    "search-storage-foo": Case(
        lambda s, d: [
            "search", "--model", "digits-mlp", "--dataset", "digits", "--strategy", "tpe",
            "--storage", "foo://bar", "--out", d / "out", "--episodes", "1",
            "--finetune-steps", "1", "--final-epochs", "0", "--no-verify", "--no-progress",
        ],
        "foo://bar",
    ),
}  # fmt: skip


def _npz(d: Path) -> Path:
    path = d / "x.npz"
    np.savez(path, x=np.ones((2, 16), np.float32))
    return path


def _bytes(d: Path, name: str) -> Path:
    path = d / name
    path.write_bytes(np.random.default_rng(5).bytes(4096))
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    return path


def _tree(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_with_status_2(name, shared, tmp_path, capfd):
    case = CASES[name]
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    argv = [str(a) for a in case.make(shared, case_dir)]
    before, shared_before = _tree(case_dir), _tree(shared["lib"].parent)
    if case.subprocess:
        done = subprocess.run(
            [sys.executable, "-m", "tvm_cim.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        status, err = done.returncode, done.stderr
    else:
        capfd.readouterr()
        status = _status(argv)
        err = capfd.readouterr().err
    lines = err.splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("tvm-cim: error: "), err
    assert len(lines[0]) <= MAX_LINE, err
    assert "Traceback" not in err
    assert case.fragment in lines[0], err
    assert _tree(case_dir) == before, "files left behind"
    assert _tree(shared["lib"].parent) == shared_before, "files left behind"


def test_the_digest_beside_a_library_describes_it(shared):
    record = json.loads(digest_path(shared["lib"]).read_text())
    data = shared["lib"].read_bytes()
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["inputs"] == [{"name": "x", "shape": [2, 16], "dtype": "float32"}]


def test_a_model_without_crossbar_operators_compiles_and_runs(shared, tmp_path, capsys):
    """Not an error: the library runs on the CPU only, and compile says so."""
    so = tmp_path / "relu.so"
    assert main(["compile", str(_relu_model(tmp_path / "relu.onnx")), "-o", str(so)]) == 0
    assert "no operator of the model runs on the crossbars" in capsys.readouterr().out
    out = tmp_path / "out"
    assert main(["run", str(so), "--input", f"x={shared['x']}", "--output-dir", str(out)]) == 0
    np.testing.assert_array_equal(
        np.load(out / "output_0.npy"), np.maximum(np.load(shared["x"]), 0)
    )


def test_a_library_copied_with_its_digest_runs(shared, tmp_path, capsys):
    """The digest file names no path: a library and its digest file copied elsewhere run."""
    lib = tmp_path / "elsewhere" / "model.so"
    lib.parent.mkdir()
    lib.write_bytes(shared["lib"].read_bytes())
    digest_path(lib).write_bytes(digest_path(shared["lib"]).read_bytes())
    assert main(["run", str(lib), "--input", f"x={shared['x']}"]) == 0
    assert "simulated latency:" in capsys.readouterr().out


def test_verbose_shows_what_the_quiet_error_hides(shared, tmp_path):
    """The C++ warning TVM prints while refusing a model, and the frontend's IR text,
    appear with --verbose only; the error line itself is there either way."""
    model = _mismatched_matmul(tmp_path / "mm.onnx")
    runs = {}
    for flag in ([], ["--verbose"]):
        argv = [*flag, "compile", str(model), "-o", str(tmp_path / "m.so")]
        runs[bool(flag)] = subprocess.run(
            [sys.executable, "-m", "tvm_cim.cli.main", *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
    quiet, verbose = runs[False], runs[True]
    assert quiet.returncode == verbose.returncode == 2
    assert len(quiet.stderr.splitlines()) == 1 and "Warning" not in quiet.stderr
    assert "Warning: BlockBuilder destroyed" in verbose.stderr
    assert "Error converting operator MatMul" in verbose.stdout
    assert "Error converting operator" not in quiet.stdout
