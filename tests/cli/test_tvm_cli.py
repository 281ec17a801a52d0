"""The ``tvm-cim`` command: compile, inspect and run ONNX models, and its error handling.

Two small ONNX models are built with ``onnx.helper``: a QDQ MLP (QuantizeLinear and
DequantizeLinear around a MatMul and a Gemm with per-channel int8 weights) and a float
CNN (Conv, a depthwise Conv, MaxPool, Flatten, Gemm) calibrated from
an ``.npz``. Most commands run in-process through ``main``; ``run`` and one error also
run as fresh processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402, F401  (registers the cim target)
from tvm_cim.cli.common import BUG_HINT  # noqa: E402
from tvm_cim.cli.compile import program_file_name  # noqa: E402
from tvm_cim.cli.main import main  # noqa: E402
from tvm_cim.compiler.flow import compile_for_cim  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx  # noqa: E402
from tvm_cim.sim.program import Program  # noqa: E402

QDQ_NAMES = ["fc1", "/fc2/Gemm"]
CONV_NAMES = ["conv1", "dwconv", "head"]
Y_SCALE = 0.05  # output quantization step of the QDQ model


# ------------------------------------------------------------------------- models


def _init(array: np.ndarray, name: str):
    return numpy_helper.from_array(np.asarray(array), name)


def qdq_mlp(path: Path, *, batch=2, k=16, hidden=32, n=10) -> Path:
    """x -> Q/DQ -> MatMul(fc1) + bias -> Relu -> Q/DQ -> Gemm(/fc2/Gemm) -> Q/DQ -> y."""
    rng = np.random.default_rng(0)
    w1 = rng.integers(-127, 128, (k, hidden)).astype(np.int8)
    w2 = rng.integers(-127, 128, (n, hidden)).astype(np.int8)  # Gemm with transB=1
    inits = [
        _init(w1, "w1_q"),
        _init((rng.random(hidden) * 0.01 + 0.005).astype(np.float32), "w1_s"),
        _init(np.zeros(hidden, np.int8), "w1_zp"),
        _init((rng.standard_normal(hidden) * 0.1).astype(np.float32), "b1"),
        _init(w2, "w2_q"),
        _init((rng.random(n) * 0.01 + 0.005).astype(np.float32), "w2_s"),
        _init(np.zeros(n, np.int8), "w2_zp"),
        _init((rng.standard_normal(n) * 0.1).astype(np.float32), "b2"),
        _init(np.array(0.02, np.float32), "x_s"),
        _init(np.array(0, np.int8), "x_zp"),
        _init(np.array(0.05, np.float32), "h_s"),
        _init(np.array(0, np.uint8), "h_zp"),
        _init(np.array(Y_SCALE, np.float32), "y_s"),
        _init(np.array(0, np.int8), "y_zp"),
    ]
    node = helper.make_node
    nodes = [
        node("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq"], name="quant_x"),
        node("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"], name="dequant_x"),
        node("DequantizeLinear", ["w1_q", "w1_s", "w1_zp"], ["w1"], name="dequant_w1", axis=1),
        node("MatMul", ["xd", "w1"], ["mm1"], name="fc1"),
        node("Add", ["mm1", "b1"], ["a1"], name="fc1_bias"),
        node("Relu", ["a1"], ["r1"], name="relu1"),
        node("QuantizeLinear", ["r1", "h_s", "h_zp"], ["hq"], name="quant_h"),
        node("DequantizeLinear", ["hq", "h_s", "h_zp"], ["hd"], name="dequant_h"),
        node("DequantizeLinear", ["w2_q", "w2_s", "w2_zp"], ["w2"], name="dequant_w2", axis=0),
        node("Gemm", ["hd", "w2", "b2"], ["g2"], name="/fc2/Gemm", transB=1),
        node("QuantizeLinear", ["g2", "y_s", "y_zp"], ["yq"], name="quant_y"),
        node("DequantizeLinear", ["yq", "y_s", "y_zp"], ["y"], name="dequant_y"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, n])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def float_cnn(path: Path) -> Path:
    """img -> Conv(conv1) -> Relu -> depthwise Conv(dwconv) -> MaxPool -> Flatten -> Gemm."""
    rng = np.random.default_rng(1)
    inits = [
        _init((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "cw"),
        _init((rng.standard_normal(4) * 0.1).astype(np.float32), "cb"),
        _init((rng.standard_normal((4, 1, 3, 3)) * 0.3).astype(np.float32), "dw"),
        _init((rng.standard_normal((4 * 6 * 6, 5)) * 0.1).astype(np.float32), "fw"),
        _init((rng.standard_normal(5) * 0.1).astype(np.float32), "fb"),
    ]
    node = helper.make_node
    nodes = [
        node("Conv", ["img", "cw", "cb"], ["c"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        node("Relu", ["c"], ["r"], name="relu"),
        node("Conv", ["r", "dw"], ["d"], name="dwconv", kernel_shape=[3, 3], pads=[1] * 4, group=4),
        node("MaxPool", ["d"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Flatten", ["p"], ["f"], name="flatten"),
        node("Gemm", ["f", "fw", "fb"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "float_cnn",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvm_cim.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def _vm_run(executable, *arrays) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


# ------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    rng = np.random.default_rng(7)
    out = {
        "qdq": qdq_mlp(d / "qdq.onnx"),
        "qdq_dynamic": qdq_mlp(d / "qdq_dynamic.onnx", batch="N"),
        "cnn": float_cnn(d / "cnn.onnx"),
        "x": d / "x.npy",
        "img": d / "img.npy",
        "calibration": d / "calibration.npz",
        "truncated": d / "truncated.onnx",
    }
    np.save(out["x"], rng.standard_normal((2, 16)).astype(np.float32))
    np.save(out["img"], rng.standard_normal((1, 3, 12, 12)).astype(np.float32))
    np.savez(out["calibration"], img=rng.standard_normal((4, 1, 3, 12, 12)).astype(np.float32))
    data = out["qdq"].read_bytes()
    out["truncated"].write_bytes(data[: len(data) // 2])
    return out


class _Captured:
    def __init__(self, status: int, out: str, err: str):
        self.status, self.out, self.err = status, out, err


def _main(capsys, *args) -> _Captured:
    capsys.readouterr()
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return _Captured(status, out, err)


@pytest.fixture(scope="module")
def qdq_build(files, tmp_path_factory):
    """``tvm-cim compile`` of the QDQ model, with report and programs."""
    d = tmp_path_factory.mktemp("qdq_build")
    paths = {"so": d / "qdq.so", "report": d / "report.json", "programs": d / "programs"}
    status = main(
        [
            "compile",
            str(files["qdq"]),
            "-o",
            str(paths["so"]),
            "--report",
            str(paths["report"]),
            "--dump-programs",
            str(paths["programs"]),
        ]
    )
    assert status == 0
    return paths


# ------------------------------------------------------------------------- inspect


def test_inspect_lists_onnx_node_names(files, capsys):
    result = _main(capsys, "inspect", files["qdq"])
    assert result.status == 0, result.err
    lines = result.out.splitlines()
    rows = [line.split() for line in lines if line.startswith("  ") and line.split()[0].isdigit()]
    assert [r[1] for r in rows] == QDQ_NAMES
    assert [r[2] for r in rows] == ["dense", "dense"]
    assert [r[3] for r in rows] == ["qdq", "qdq"]
    assert "on the CPU (0):" in result.out


def test_inspect_lists_a_float_model_depthwise_included(files, capsys):
    result = _main(capsys, "inspect", files["cnn"])
    assert result.status == 0, result.err
    rows = [line.split() for line in result.out.splitlines() if line[:3].strip().isdigit()]
    assert [r[1] for r in rows] == CONV_NAMES
    assert [r[2] for r in rows] == ["conv2d", "conv2d", "dense"]
    assert [r[3] for r in rows] == ["float", "float", "float"]
    assert "on the CPU (0):" in result.out


def test_inspect_dynamic_input_with_shape(files, capsys):
    result = _main(capsys, "inspect", files["qdq_dynamic"], "--input-shape", "x:4,16")
    assert result.status == 0, result.err
    assert "input x: [4, 16] float32" in result.out
    assert "[4, 16] -> [4, 32]" in result.out


def test_inspect_lists_operators_the_compiler_failed_on(files, capsys, monkeypatch):
    import tvm_cim.compiler.plan as plan_module

    def broken(name, fn):
        raise KeyError("surprise")

    monkeypatch.setattr(plan_module, "read_region", broken)
    result = _main(capsys, "inspect", files["qdq"])
    assert result.status == 0, result.err
    assert "offloaded operators (0, in offload order):" in result.out
    for name in QDQ_NAMES:
        assert f"{name} (dense): internal compiler error while reading" in result.out


def test_compile_exits_3_naming_the_nodes_for_a_compiler_bug(files, capsys, monkeypatch, tmp_path):
    import tvm_cim.compiler.plan as plan_module

    def broken(region, arch, copies=None):
        raise IndexError("list index out of range")

    monkeypatch.setattr(plan_module, "lower_region", broken)
    result = _main(capsys, "compile", files["qdq"], "-o", tmp_path / "m.so")
    assert result.status == 3
    assert result.err == (
        "tvm-cim: error: internal compiler error while lowering fc1, /fc2/Gemm: "
        f"IndexError: list index out of range{BUG_HINT}\n"
    )


# ------------------------------------------------------------------------- compile


def test_compile_writes_library_report_and_programs(files, qdq_build):
    assert qdq_build["so"].stat().st_size > 0
    report = json.loads(qdq_build["report"].read_text())
    assert report["total_latency_us"] > 0
    assert [layer["name"] for layer in report["layers"]] == QDQ_NAMES
    for layer in report["layers"]:
        for key in (
            "kind",
            "in_shape",
            "out_shape",
            "w_bits",
            "a_bits",
            "crossbar_rows",
            "crossbar_cols",
            "tiles",
            "writes",
            "mvm_executions",
            "latency_us",
            "share",
        ):
            assert key in layer
        assert layer["latency_us"] > 0
    assert report["cpu_operators"] == []
    assert report["inputs"] == [{"name": "x", "shape": [2, 16], "dtype": "float32"}]
    regions = {layer["region"] for layer in report["layers"]}
    dumped = sorted(p.name for p in qdq_build["programs"].iterdir())
    assert dumped == sorted(program_file_name(r) for r in regions)


def test_compile_prints_report_table(files, capsys, tmp_path):
    result = _main(capsys, "compile", files["qdq"], "-o", tmp_path / "m.so")
    assert result.status == 0, result.err
    assert "fc1" in result.out and "/fc2/Gemm" in result.out
    assert "total latency" in result.out
    assert f"wrote {tmp_path / 'm.so'}" in result.out


def test_dumped_programs_run_under_cim_sim(qdq_build, tmp_path):
    programs = sorted(qdq_build["programs"].glob("*.cimprog"))
    assert programs
    rng = np.random.default_rng(3)
    for path in programs:
        program = Program.load(path)
        args = []
        for t in program.inputs:
            lo = -(1 << (t.bits - 1)) if t.signed else 0
            hi = (1 << (t.bits - 1)) - 1 if t.signed else (1 << t.bits) - 1
            rows = (t.batch or 2) * t.rows
            file = tmp_path / f"{t.name}.npy"
            np.save(file, rng.integers(lo, hi + 1, (rows, t.width)).astype(t.dtype))
            args += ["--input", f"{t.name}={file}"]
        done = subprocess.run(
            [sys.executable, "-m", "tvm_cim.cli.sim", "run", str(path), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "latency:" in done.stdout


def test_compile_float_model_with_calibration(files, capsys, tmp_path):
    so, report_path = tmp_path / "cnn.so", tmp_path / "cnn.json"
    result = _main(
        capsys,
        "compile",
        files["cnn"],
        "-o",
        so,
        "--calibration",
        files["calibration"],
        "--report",
        report_path,
    )
    assert result.status == 0, result.err
    report = json.loads(report_path.read_text())
    assert [layer["name"] for layer in report["layers"]] == CONV_NAMES
    assert report["cpu_operators"] == []

    out_dir = tmp_path / "out"
    result = _main(capsys, "run", so, "--input", f"img={files['img']}", "--output-dir", out_dir)
    assert result.status == 0, result.err
    y = np.load(out_dir / "output_0.npy")
    mod, _ = load_onnx(files["cnn"])
    reference = _vm_run(tvm.compile(mod, target="llvm"), np.load(files["img"]))
    assert y.shape == reference.shape == (1, 5)
    # W8A8 with calibrated scales: a few percent of the output range
    assert np.max(np.abs(y - reference)) <= 0.05 * np.max(np.abs(reference)) + 1e-3


def test_float_model_without_calibration_is_refused(files, capsys, tmp_path):
    result = _main(capsys, "compile", files["cnn"], "-o", tmp_path / "cnn.so")
    assert result.status == 2
    assert result.err.startswith("tvm-cim: error: ")
    assert "calibration" in result.err and "conv1" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "cnn.so").exists()


# ------------------------------------------------------------------------- run


@pytest.fixture(scope="module")
def qdq_in_process(files):
    """The QDQ model compiled in this process, its llvm reference and the input."""
    mod, names = load_onnx(files["qdq"])
    assert names == QDQ_NAMES
    executable, report = compile_for_cim(mod, names=names)
    reference = tvm.compile(mod, target="llvm")
    return executable, reference, np.load(files["x"])


def test_run_in_fresh_process_matches_in_process(files, qdq_build, qdq_in_process, tmp_path):
    executable, _, x = qdq_in_process
    stats = tmp_path / "stats.json"
    done = _run_cli(
        "run",
        str(qdq_build["so"]),
        "--input",
        f"x={files['x']}",
        "--output-dir",
        str(tmp_path),
        "--stats",
        str(stats),
    )
    assert done.returncode == 0, done.stderr
    assert "output_0: [2, 10] float32" in done.stdout
    assert "simulated latency:" in done.stdout
    y = np.load(tmp_path / "output_0.npy")
    np.testing.assert_array_equal(y, _vm_run(executable, x))
    data = json.loads(stats.read_text())
    assert data["total_latency_us"] > 0
    assert len(data["regions"]) == 1


def test_qdq_output_within_one_step_of_llvm(qdq_in_process):
    executable, reference, x = qdq_in_process
    rng = np.random.default_rng(11)
    for sample in (x, rng.standard_normal(x.shape).astype(np.float32) * 2):
        y = _vm_run(executable, sample)
        expected = _vm_run(reference, sample)
        assert np.max(np.abs(y - expected)) <= Y_SCALE * (1 + 1e-5)


def test_run_in_process_reports_latency(files, qdq_build, capsys):
    result = _main(capsys, "run", qdq_build["so"], "--input", f"x={files['x']}")
    assert result.status == 0, result.err
    latency = float(result.out.split("simulated latency:")[1].split()[0])
    assert latency > 0


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda: np.ones((2, 16)), "input 'x' (bad.npy): dtype float64, the model takes float32"),
        (
            lambda: np.ones((3, 16), np.float32),
            "input 'x' (bad.npy): shape [3, 16], the model takes [2, 16]",
        ),
    ],
    ids=["float64", "wrong-shape"],
)
def test_run_rejects_mismatched_inputs(qdq_build, capsys, tmp_path, make_input, message):
    np.save(tmp_path / "bad.npy", make_input())
    result = _main(capsys, "run", qdq_build["so"], "--input", f"x={tmp_path / 'bad.npy'}")
    assert result.status == 2
    assert message in result.err


def test_run_input_name_errors(files, qdq_build, capsys):
    result = _main(capsys, "run", qdq_build["so"], "--input", f"image={files['x']}")
    assert result.status == 2
    assert "'image' is not an input of the model; inputs: x" in result.err
    result = _main(capsys, "run", qdq_build["so"])
    assert result.status == 2
    assert "missing input 'x'" in result.err


# ------------------------------------------------------------------------- errors


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "precision.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "truncated",
        "dynamic",
        "unknown-operator",
        "bits-9",
        "missing-model",
        "missing-precision",
        "missing-library",
        "not-a-library",
        "bad-arch",
    ],
)
def test_errors_exit_2_with_one_line(case, files, capsys, tmp_path):
    out = tmp_path / "m.so"
    if case == "truncated":
        args, message = ["compile", files["truncated"], "-o", out], "truncated or corrupt"
    elif case == "dynamic":
        args = ["compile", files["qdq_dynamic"], "-o", out]
        message = "input 'x' has a dynamic shape [N, 16]"
    elif case == "unknown-operator":
        precision = _yaml(tmp_path, "fc9:\n  w_bits: 4\n  a_bits: 4\n")
        args = ["compile", files["qdq"], "-o", out, "--precision", precision]
        message = "operator 'fc9' is not an offloaded operator; known: fc1, /fc2/Gemm"
    elif case == "bits-9":
        precision = _yaml(tmp_path, "fc1:\n  w_bits: 9\n  a_bits: 8\n")
        args = ["compile", files["qdq"], "-o", out, "--precision", precision]
        message = "bits must be in 1..8, got 9"
    elif case == "missing-model":
        args, message = ["compile", tmp_path / "nope.onnx", "-o", out], "does not exist"
    elif case == "missing-precision":
        args = ["inspect", files["qdq"], "--precision", tmp_path / "nope.yaml"]
        message = "precision file"
    elif case == "missing-library":
        args, message = ["run", tmp_path / "nope.so", "--input", "x=x.npy"], "does not exist"
    elif case == "not-a-library":
        args = ["run", files["qdq"], "--no-digest", "--input", f"x={files['x']}"]
        message = "is not a shared library (no ELF header)"
    else:
        args, message = ["inspect", files["qdq"], "--arch", "no-such-arch"], "no-such-arch"
    result = _main(capsys, *args)
    assert result.status == 2, result.err
    assert result.err.startswith("tvm-cim: error: ")
    assert message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not out.exists()


def test_usage_errors_exit_2(files, capsys):
    for args in (
        ["inspect", str(files["qdq"]), "--input-shape", "x=2,16"],
        ["frobnicate"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("tvm-cim: error: ")
        assert len(err.strip().splitlines()) == 1


def test_error_from_a_fresh_process(files, tmp_path):
    done = _run_cli("compile", str(files["truncated"]), "-o", str(tmp_path / "m.so"))
    assert done.returncode == 2
    assert done.stderr.startswith("tvm-cim: error: ")
    assert str(files["truncated"]) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_unexpected_errors_exit_3(files, capsys, monkeypatch):
    import tvm_cim.compiler.frontend

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(tvm_cim.compiler.frontend, "load_onnx", broken)
    result = _main(capsys, "inspect", files["qdq"])
    assert result.status == 3
    assert result.err.strip() == f"tvm-cim: error: unexpected RuntimeError: boom{BUG_HINT}"


def test_help_and_version(capsys):
    for args in (["--help"], ["compile", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--dump-programs" in out and "tvm-cim 0.1.0" in out


def test_cost_only_report_equals_full_compile(files, capsys, tmp_path, qdq_build):
    cost_json = tmp_path / "cost.json"
    result = _main(capsys, "compile", files["qdq"], "--cost-only", "--report", cost_json)
    assert result.status == 0, result.err
    cost = json.loads(cost_json.read_text())
    full = json.loads(qdq_build["report"].read_text())
    assert cost["cost_only"] is True
    assert cost["total_latency_us"] == full["total_latency_us"]
    assert [(x["name"], x["latency_us"]) for x in cost["layers"]] == [
        (x["name"], x["latency_us"]) for x in full["layers"]
    ]


def test_cost_only_refuses_dump_programs(files, capsys, tmp_path):
    result = _main(
        capsys, "compile", files["qdq"], "--cost-only", "--dump-programs", tmp_path / "p"
    )
    assert result.status == 2
    assert "--dump-programs needs weight images" in result.err


def test_output_required_without_cost_only(files, capsys):
    result = _main(capsys, "compile", files["qdq"])
    assert result.status == 2
    assert "-o/--output is required" in result.err


def test_unwritable_report_exits_2(files, capsys, tmp_path):
    result = _main(capsys, "compile", files["qdq"], "--cost-only", "--report", tmp_path)
    assert result.status == 2
    assert result.err.startswith(f"tvm-cim: error: cannot write report {tmp_path}: ")
    assert len(result.err.strip().splitlines()) == 1


@pytest.mark.parametrize("failing", ["--report", "--dump-programs"])
def test_a_failed_compile_leaves_no_file_behind(files, capsys, tmp_path, failing):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    so, report = tmp_path / "m.so", tmp_path / "r.json"
    args = ["compile", files["qdq"], "-o", so, "--report", report]
    if failing == "--report":
        args[-1] = blocker / "r.json"
    else:
        args += ["--dump-programs", blocker / "programs"]
    result = _main(capsys, *args)
    assert result.status == 2
    assert result.err.startswith("tvm-cim: error: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
