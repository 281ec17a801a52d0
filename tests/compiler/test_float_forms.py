"""Float layers as other exporters write them reach the crossbars: Gemm's ``transB``,
``alpha`` and ``beta``, MatMul with a constant matrix, Conv without a bias, Conv followed
by BatchNormalization, Flatten/Reshape before a Gemm, and weights computed from constants.

Each model is compiled for ``cim`` and compared against TVM's llvm build of the same file
and against onnxruntime; quantized weights keep their integer codes through the folding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

from tests.compiler.conftest import build_llvm, run_vm  # noqa: E402
from tvm_cim.compiler.flow import compile_for_cim  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx  # noqa: E402
from tvm_cim.compiler.plan import plan_for_cim  # noqa: E402
from tvm_cim.relay_passes.fold import fold_constants  # noqa: E402
from tvm_cim.relay_passes.partition import name_operators, operator_name  # noqa: E402

node = helper.make_node


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _weights(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _save(path: Path, nodes, x_shape, y_shape, inits, opset=13) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _compile_and_compare(path: Path, x_shape, offloaded: list[str]):
    """Compile ``path`` for cim (calibrated), check the offloaded operators, and compare
    with TVM's llvm build and onnxruntime; returns the plan's module."""
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal(x_shape).astype(np.float32) for _ in range(8)]
    mod, names = load_onnx(path)
    ex, report = compile_for_cim(mod, names=names, calibration=samples)
    assert [op.name for op in report.operators] == offloaded
    assert report.cpu == []
    session = ort.InferenceSession(str(path))
    llvm = build_llvm(mod)
    for x in samples[:3]:
        expected = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(run_vm(llvm, x), expected, rtol=1e-4, atol=1e-5)
        got = run_vm(ex, x)
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= 0.05 * np.max(np.abs(expected)) + 1e-3
    return mod


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, 2.0)])
def test_gemm_trans_b_alpha_beta(tmp_path, trans_b, alpha, beta):
    rng = np.random.default_rng(0)
    w = _weights(rng, 16, 8)
    gemm = node("Gemm", ["x", "w", "b"], ["y"], name="fc", alpha=alpha, beta=beta, transB=trans_b)
    inits = [_init("w", w.T.copy() if trans_b else w), _init("b", _weights(rng, 8))]
    path = _save(tmp_path / "gemm.onnx", [gemm], [4, 16], [4, 8], inits)
    mod = _compile_and_compare(path, (4, 16), ["fc"])
    # alpha went into the weight and beta into the bias: nothing is left on the CPU
    assert _ops(plan_for_cim(mod).module["main"]) == []


def test_matmul_with_a_constant_matrix_and_rank3_input(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [
        node("MatMul", ["x", "w1"], ["h"], name="proj"),
        node("Relu", ["h"], ["r"]),
        node("MatMul", ["r", "w2"], ["y"], name="out"),
    ]
    inits = [_init("w1", _weights(rng, 12, 10)), _init("w2", _weights(rng, 10, 6))]
    path = _save(tmp_path / "matmul.onnx", nodes, [2, 5, 12], [2, 5, 6], inits)
    _compile_and_compare(path, (2, 5, 12), ["proj", "out"])


def _conv_bn(tmp_path, rng, conv_bias: bool, flatten: str) -> Path:
    """Conv [+ bias] -> BatchNormalization -> Relu -> Flatten or Reshape -> Gemm."""
    conv_inputs = ["x", "wc", "bc"] if conv_bias else ["x", "wc"]
    nodes = [
        node("Conv", conv_inputs, ["c"], name="conv", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"], epsilon=1e-3),
        node("Relu", ["n"], ["r"]),
    ]
    if flatten == "Flatten":
        nodes.append(node("Flatten", ["r"], ["f"]))
    else:
        nodes.append(node("Reshape", ["r", "shape"], ["f"]))
    nodes.append(node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1))
    inits = [
        _init("wc", _weights(rng, 4, 3, 3, 3)),
        _init("g", (1 + _weights(rng, 4)).astype(np.float32)),
        _init("beta", _weights(rng, 4)),
        _init("mean", _weights(rng, 4)),
        _init("var", (0.5 + rng.random(4)).astype(np.float32)),
        _init("wf", _weights(rng, 5, 4 * 6 * 6, scale=0.05)),
        _init("bf", _weights(rng, 5)),
        _init("shape", np.array([2, -1], dtype=np.int64)),
    ]
    if conv_bias:
        inits.append(_init("bc", _weights(rng, 4)))
    return _save(tmp_path / "conv_bn.onnx", nodes, [2, 3, 6, 6], [2, 5], inits)


@pytest.mark.parametrize("conv_bias", [False, True])
@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_conv_batchnorm_flatten_gemm(tmp_path, conv_bias, flatten):
    path = _conv_bn(tmp_path, np.random.default_rng(0), conv_bias, flatten)
    _compile_and_compare(path, (2, 3, 6, 6), ["conv", "fc"])
    plan = plan_for_cim(load_onnx(path)[0])
    assert "batch_norm" not in plan.module["main"].script()


def test_batchnorm_not_after_a_convolution_stays_on_the_cpu(tmp_path):
    """The BatchNormalization before the Conv is computed on the CPU; the Conv offloads."""
    rng = np.random.default_rng(0)
    nodes = [
        node("BatchNormalization", ["x", "g", "beta", "mean", "var"], ["n"]),
        node("Conv", ["n", "wc"], ["y"], name="conv"),
    ]
    inits = [
        _init("g", (1 + _weights(rng, 3)).astype(np.float32)),
        _init("beta", _weights(rng, 3)),
        _init("mean", _weights(rng, 3)),
        _init("var", (0.5 + rng.random(3)).astype(np.float32)),
        _init("wc", _weights(rng, 4, 3, 3, 3)),
    ]
    path = _save(tmp_path / "bn_conv.onnx", nodes, [1, 3, 6, 6], [1, 4, 4, 4], inits)
    mod = _compile_and_compare(path, (1, 3, 6, 6), ["conv"])
    assert "batch_norm" in plan_for_cim(mod).module["main"].script()


def test_training_mode_batchnorm_is_not_folded():
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 6, 6), "float32"))
    stats = [relax.const(_weights(rng, 4)) for _ in range(4)]
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(_weights(rng, 4, 3, 3, 3))))
            n = bb.emit(relax.op.nn.batch_norm(c, *stats, axis=1, training=True))
            out = bb.emit_output(relax.TupleGetItem(n, 0))
        bb.emit_func_output(out)
    folded = fold_constants(bb.get())
    assert "batch_norm" in folded["main"].script()


def test_weights_computed_from_constants_are_folded(tmp_path):
    """A Conv weight from ConstantOfShape/Expand times an initializer, and a Gemm weight
    transposed by a Transpose node, reach the crossbars; names survive the folding."""
    rng = np.random.default_rng(0)
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [0.5])
    nodes = [
        node("ConstantOfShape", ["wshape"], ["ones"], value=fill),
        node("Mul", ["ones", "wraw"], ["wc"]),
        node("Conv", ["x", "wc"], ["c"], name="conv"),
        node("Flatten", ["c"], ["f"]),
        node("Transpose", ["wt"], ["wf"], perm=[1, 0]),
        node("Gemm", ["f", "wf"], ["y"], name="fc"),
    ]
    inits = [
        _init("wshape", np.array([4, 3, 3, 3], dtype=np.int64)),
        _init("wraw", _weights(rng, 4, 3, 3, 3)),
        _init("wt", _weights(rng, 5, 4 * 4 * 4, scale=0.05)),
    ]
    path = _save(tmp_path / "computed.onnx", nodes, [1, 3, 6, 6], [1, 5], inits)
    mod = _compile_and_compare(path, (1, 3, 6, 6), ["conv", "fc"])
    named = fold_constants(name_operators(mod, ["conv", "fc"]))
    anchors = [
        b.value
        for block in named["main"].body.blocks
        for b in block.bindings
        if getattr(b.value, "op", None) is not None
        and getattr(b.value.op, "name", "") in ("relax.nn.conv2d", "relax.matmul")
    ]
    assert [operator_name(a) for a in anchors] == ["conv", "fc"]
    assert all(isinstance(a.args[1], tvm.ir.Constant) for a in anchors)


# ------------------------------------------------------- quantized weights are kept


def _ops(fn: relax.Function) -> list[str]:
    return [
        str(b.value.op.name)
        for block in fn.body.blocks
        for b in block.bindings
        if isinstance(getattr(b.value, "op", None), tvm.ir.Op)
    ]


def _qdq_weight_module(source: str):
    """``matmul(x, dequantize(<codes>))``: codes given as int8 (``codes``), a clip of them
    (``clip``) or the quantize of a float weight (``quantize``)."""
    rng = np.random.default_rng(0)
    w = _weights(rng, 8, 4)
    scale, zero = relax.const(np.float32(0.02)), relax.const(np.int8(0))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if source == "quantize":
                codes = bb.emit(relax.op.quantize(relax.const(w), scale, zero, out_dtype="int8"))
            else:
                codes = relax.const(np.clip(np.round(w / 0.02), -127, 127).astype(np.int8))
                if source == "clip":
                    codes = bb.emit(relax.op.clip(codes, -7, 7))
            wq = bb.emit(relax.op.dequantize(codes, scale, zero, out_dtype="float32"))
            out = bb.emit_output(relax.op.matmul(x, wq))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(
    ("source", "kept"),
    [
        ("codes", ["relax.dequantize", "relax.matmul"]),
        ("clip", ["relax.clip", "relax.dequantize", "relax.matmul"]),
        ("quantize", ["relax.dequantize", "relax.matmul"]),
    ],
)
def test_quantized_weight_codes_are_kept(source, kept):
    mod = _qdq_weight_module(source)
    folded = fold_constants(mod)
    assert _ops(folded["main"]) == kept
    dequantize = next(
        b.value
        for block in folded["main"].body.blocks
        for b in block.bindings
        if getattr(getattr(b.value, "op", None), "name", None) == "relax.dequantize"
    )
    if source != "clip":
        assert isinstance(dequantize.args[0], tvm.ir.Constant)
        assert str(dequantize.args[0].ty.dtype) == "int8"
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_vm(build_llvm(folded), x), run_vm(build_llvm(mod), x))


def test_float_initializer_behind_quantize_linear_reaches_the_crossbars(tmp_path):
    """QuantizeLinear of a float weight initializer folds to codes: the QDQ form offloads
    and equals TVM's llvm build of the same file."""
    rng = np.random.default_rng(0)
    nodes = [
        node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        node("QuantizeLinear", ["w", "sw", "zw"], ["wq"]),
        node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"]),
        node("MatMul", ["xd", "wd"], ["y"], name="fc"),
    ]
    inits = [
        _init("w", _weights(rng, 16, 8)),
        _init("sw", np.float32(0.01)),
        _init("zw", np.int8(0)),
        _init("sx", np.float32(0.05)),
        _init("zx", np.uint8(128)),
    ]
    path = _save(tmp_path / "qdq.onnx", nodes, [4, 16], [4, 8], inits)
    mod, names = load_onnx(path)
    ex, report = compile_for_cim(mod, names=names)
    assert [op.name for op in report.operators] == ["fc"]
    assert report.operators[0].w_bits == 8
    x = rng.standard_normal((4, 16)).astype(np.float32)
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_vm(ex, x), run_vm(build_llvm(mod), x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_vm(ex, x), expected, rtol=1e-4, atol=1e-4)


def test_split_weights_reach_the_crossbars(tmp_path):
    """Two MatMul weights split from one initializer (a tuple, which FoldConstant keeps)."""
    rng = np.random.default_rng(0)
    nodes = [
        node("Split", ["w"], ["w1", "w2"], axis=1),
        node("MatMul", ["x", "w1"], ["a"], name="left"),
        node("MatMul", ["x", "w2"], ["b"], name="right"),
        node("Add", ["a", "b"], ["y"]),
    ]
    path = _save(tmp_path / "split.onnx", nodes, [2, 8], [2, 6], [_init("w", _weights(rng, 8, 12))])
    _compile_and_compare(path, (2, 8), ["left", "right"])


def test_float_weight_cast_from_int8_reaches_the_crossbars(tmp_path):
    """An int8 initializer Cast to float is a float weight (not codes to keep)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-5, 6, (8, 6)).astype(np.int8)
    nodes = [
        node("Cast", ["w8"], ["w"], to=TensorProto.FLOAT),
        node("MatMul", ["x", "w"], ["y"], name="fc"),
    ]
    path = _save(tmp_path / "cast.onnx", nodes, [2, 8], [2, 6], [_init("w8", codes)])
    _compile_and_compare(path, (2, 8), ["fc"])


# ------------------------------------------------------------------ CPU reasons


def test_cpu_reasons_for_weights_folding_cannot_make_constants():
    """A weight computed from constants by an operator FoldConstant does not evaluate
    (``cumsum``) stays on the CPU; one computed from an activation is a matmul of two
    activations, which the crossbars take."""
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(relax.op.cumsum(relax.const(_weights(rng, 8, 4)), axis=0))
            a = bb.emit(relax.op.matmul(x, w))
            g = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(x))))
            out = bb.emit_output(relax.op.add(a, relax.op.sum(g)))
        bb.emit_func_output(out)
    plan = plan_for_cim(bb.get())
    reasons = {entry["name"]: entry["reason"] for entry in plan.cpu}
    assert reasons == {
        "dense_0": "weights are computed from constants by relax.cumsum, "
        "which constant folding left",
    }
    assert [(op.name, op.kind) for op in plan.operators] == [("dense_1", "matmul")]
