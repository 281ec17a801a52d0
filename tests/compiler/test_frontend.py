"""``tvm_cim.compiler.frontend``: ONNX import with operator names, PyTorch import, calibration files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402, F401  (registers the cim target)
from tvm_cim.compiler.flow import compile_for_cim  # noqa: E402
from tvm_cim.compiler.frontend import (  # noqa: E402
    calibration_from_npz,
    count_anchors,
    load_onnx,
    load_torch,
    main_inputs,
    onnx_operator_names,
)
from tvm_cim.core.errors import CimError  # noqa: E402
from tvm_cim.relay_passes.extract import read_region  # noqa: E402
from tvm_cim.relay_passes.partition import offloaded_functions  # noqa: E402


def _const(name: str, shape, rng, dtype=np.float32):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(dtype), name)


def _save(path: Path, nodes, inputs, outputs, inits=(), check=True) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _tensor(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture
def mlp(tmp_path) -> Path:
    """MatMul(fc1) -> Relu -> Gemm(unnamed) -> MatMul(fc1, a repeated name)."""
    rng = np.random.default_rng(0)
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        node("Relu", ["h"], ["r"], name="relu"),
        node("Gemm", ["r", "w2", "b2"], ["g"]),
        node("MatMul", ["g", "w3"], ["y"], name="fc1"),
    ]
    inits = [
        _const("w1", (8, 16), rng),
        _const("w2", (16, 6), rng),
        _const("b2", (6,), rng),
        _const("w3", (6, 4), rng),
    ]
    return _save(
        tmp_path / "mlp.onnx", nodes, [_tensor("x", [3, 8])], [_tensor("y", [3, 4])], inits
    )


def test_names_follow_onnx_nodes(mlp):
    mod, names = load_onnx(mlp)
    assert names == ["fc1", "Gemm_2", "fc1_1"]
    assert count_anchors(mod) == 3
    calibration = [
        np.random.default_rng(i).standard_normal((3, 8)).astype("float32") for i in range(3)
    ]
    _, report = compile_for_cim(mod, names=names, calibration=calibration)
    assert [op.name for op in report.operators] == names


def test_conv_models_name_only_2d_convolutions(tmp_path):
    rng = np.random.default_rng(1)
    node = helper.make_node
    nodes = [
        node("Conv", ["x", "k1"], ["c1"], name="conv1d", kernel_shape=[3], pads=[1, 1]),
        node("Reshape", ["c1", "shape"], ["r"], name="to_2d"),
        node("Conv", ["r", "k2"], ["c2"], name="conv2d", pads=[1, 1, 1, 1]),
        node("Flatten", ["c2"], ["f"], name="flatten"),
        node("MatMul", ["f", "w"], ["y"], name="head"),
    ]
    inits = [
        _const("k1", (4, 2, 3), rng),
        numpy_helper.from_array(np.array([1, 4, 4, 4], np.int64), "shape"),
        _const("k2", (2, 4, 3, 3), rng),
        _const("w", (32, 3), rng),
    ]
    path = _save(
        tmp_path / "convs.onnx", nodes, [_tensor("x", [1, 2, 16])], [_tensor("y", [1, 3])], inits
    )
    mod, names = load_onnx(path)
    assert names == ["conv2d", "head"]
    assert count_anchors(mod) == 2
    model = onnx.load(str(path))
    assert onnx_operator_names(model) == ["conv2d", "head"]


def test_names_are_none_when_nodes_and_calls_differ(tmp_path):
    """A MatMul inside an If branch imports as a call the top-level node list lacks."""
    rng = np.random.default_rng(2)
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")],
        "then",
        [],
        [_tensor("t", [2, 3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Relu", ["xs"], ["e"], name="inner_relu")],
        "else",
        [],
        [_tensor("e", [2, 3])],
    )
    nodes = [
        helper.make_node("Slice", ["x", "start", "end", "axes"], ["xs"], name="slice"),
        helper.make_node(
            "If", ["c"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph
        ),
    ]
    inits = [
        _const("w", (4, 3), rng),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([3], np.int64), "end"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    path = _save(
        tmp_path / "if.onnx",
        nodes,
        [_tensor("x", [2, 4]), _tensor("c", [], TensorProto.BOOL)],
        [_tensor("y", [2, 3])],
        inits,
    )
    mod, names = load_onnx(path)
    assert count_anchors(mod) == 1
    assert names is None


def test_input_names_are_kept_and_shapes_given(tmp_path):
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("MatMul", ["input.1", "w"], ["y"], name="mm")]
    path = _save(
        tmp_path / "dyn.onnx",
        nodes,
        [_tensor("input.1", ["batch", 8])],
        [_tensor("y", ["batch", 2])],
        [_const("w", (8, 2), rng)],
    )
    with pytest.raises(CimError, match=r"input 'input.1' has a dynamic shape \[batch, 8\]"):
        load_onnx(path)
    mod, names = load_onnx(path, {"input.1": (5, 8)})
    assert names == ["mm"]
    assert main_inputs(mod) == [("input.1", (5, 8), "float32")]
    with pytest.raises(CimError, match="'x', which is not a model input; inputs: input.1"):
        load_onnx(path, {"x": (5, 8)})
    with pytest.raises(CimError, match="gives 2 dimensions"):
        load_onnx(path, {"input.1": (5, 8, 1)})
    with pytest.raises(CimError, match="positive integers"):
        load_onnx(path, {"input.1": (0, 8)})


def test_qoperator_models_are_refused_with_the_node_and_the_qdq_hint(tmp_path):
    """onnxruntime's QOperator format (QLinearConv) cannot be imported: say which node and
    how to export instead, before TVM fails on it."""
    scalar = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.1, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
        numpy_helper.from_array(np.ones((2, 1, 3, 3), np.int8), "w"),
    ]
    inputs = ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"]
    node = helper.make_node("QLinearConv", inputs, ["y"], name="conv_q", pads=[1, 1, 1, 1])
    path = _save(
        tmp_path / "qop.onnx",
        [node],
        [_tensor("x", [1, 1, 4, 4], TensorProto.UINT8)],
        [_tensor("y", [1, 2, 4, 4], TensorProto.UINT8)],
        scalar,
    )
    with pytest.raises(CimError, match=r"node 'conv_q' is a QLinearConv.*QuantFormat\.QDQ"):
        load_onnx(path)


@pytest.mark.parametrize("kind", ["missing", "truncated", "empty", "directory"])
def test_unreadable_files(tmp_path, mlp, kind):
    path = tmp_path / "model.onnx"
    if kind == "truncated":
        data = mlp.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        message = "truncated or corrupt"
    elif kind == "empty":
        path.write_bytes(b"")
        message = "not a usable ONNX model"
    elif kind == "directory":
        path.mkdir()
        message = "is not a file"
    else:
        message = "does not exist"
    with pytest.raises(CimError, match=message) as exc:
        load_onnx(path)
    assert str(path) in str(exc.value)


def test_unsupported_operator_is_a_cim_error(tmp_path):
    nodes = [helper.make_node("NoSuchOp", ["x"], ["y"], name="odd")]
    path = _save(
        tmp_path / "odd.onnx", nodes, [_tensor("x", [2])], [_tensor("y", [2])], check=False
    )
    with pytest.warns(UserWarning), pytest.raises(CimError, match="NoSuchOp"):
        load_onnx(path)


# ------------------------------------------------------------------------- calibration


@pytest.fixture
def two_inputs(tmp_path):
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("MatMul", ["a", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b"], ["y"], name="add"),
    ]
    path = _save(
        tmp_path / "two.onnx",
        nodes,
        [_tensor("a", [2, 4]), _tensor("b", [2, 3])],
        [_tensor("y", [2, 3])],
        [_const("w", (4, 3), rng)],
    )
    return load_onnx(path)[0]


def test_calibration_npz_npy_and_directory(tmp_path, two_inputs, mlp):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 2, 3))
    np.savez(tmp_path / "cal.npz", a=a, b=b)
    samples = calibration_from_npz(tmp_path / "cal.npz", two_inputs)
    assert len(samples) == 3
    assert all(s[0].dtype == np.float32 and s[0].shape == (2, 4) for s in samples)
    np.testing.assert_allclose(samples[1][1], b[1].astype(np.float32))

    directory = tmp_path / "dir"
    directory.mkdir()
    np.savez(directory / "0.npz", a=a, b=b)
    np.savez(directory / "1.npz", a=a[0], b=b[0])  # one sample without the sample axis
    assert len(calibration_from_npz(directory, two_inputs)) == 4

    single, _ = load_onnx(mlp)
    np.save(tmp_path / "x.npy", rng.standard_normal((5, 3, 8)).astype(np.float32))
    assert len(calibration_from_npz(tmp_path / "x.npy", single)) == 5


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"a": np.zeros((3, 2, 4))}, "no calibration array for input 'b'"),
        ({"a": np.zeros((3, 2, 4)), "b": np.zeros((3, 2, 3)), "c": 0}, "'c' is not a model input"),
        ({"a": np.zeros((3, 2, 5)), "b": np.zeros((3, 2, 3))}, r"expected \[samples, 2, 4\]"),
        ({"a": np.zeros((3, 2, 4)), "b": np.zeros((2, 2, 3))}, "different numbers of samples"),
        ({"a": np.zeros((3, 2, 4), complex), "b": np.zeros((3, 2, 3))}, "is complex128"),
    ],
    ids=["missing", "extra", "shape", "counts", "dtype"],
)
def test_calibration_errors(tmp_path, two_inputs, arrays, message):
    np.savez(tmp_path / "cal.npz", **arrays)
    with pytest.raises(CimError, match=message):
        calibration_from_npz(tmp_path / "cal.npz", two_inputs)


def test_calibration_file_errors(tmp_path, two_inputs):
    np.save(tmp_path / "one.npy", np.zeros((1, 2, 4)))
    with pytest.raises(CimError, match="single-input model"):
        calibration_from_npz(tmp_path / "one.npy", two_inputs)
    with pytest.raises(CimError, match="does not exist"):
        calibration_from_npz(tmp_path / "nope.npz", two_inputs)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(CimError, match="not a readable"):
        calibration_from_npz(tmp_path / "bad.npz", two_inputs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CimError, match="no .npz or .npy files"):
        calibration_from_npz(tmp_path / "empty", two_inputs)


# ------------------------------------------------------------------------- PyTorch


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_torch_compiles_and_matches_torch():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, 6, 6)
    mod, names = load_torch(net, x)
    assert count_anchors(mod) == 2
    assert names == ["conv", "fc"]
    rng = np.random.default_rng(6)
    calibration = [rng.standard_normal((1, 3, 6, 6)).astype(np.float32) for _ in range(8)]
    executable, report = compile_for_cim(mod, calibration=calibration, names=names)
    assert [(op.name, op.kind) for op in report.operators] == [("conv", "conv2d"), ("fc", "dense")]
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    y = out[0].numpy()
    with torch.no_grad():
        expected = net(x).numpy()
    assert np.max(np.abs(y - expected)) <= 0.05 * np.max(np.abs(expected)) + 1e-3


def test_partitioned_regions_carry_onnx_names(mlp):
    mod, names = load_onnx(mlp)
    partitioned = tvm_cim.partition_for_cim(mod, names=names)
    found = [
        op.name
        for gv, fn in offloaded_functions(partitioned)
        for op in read_region(gv.name_hint, fn).ops
    ]
    assert found == names
