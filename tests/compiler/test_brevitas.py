"""Models quantized by Brevitas, exported as QCDQ (QuantizeLinear -> Clip -> DequantizeLinear)
and as QONNX (``Quant`` nodes with a bit-width input).

Brevitas writes a width below 8 bits as an integer ``Clip`` of the 8-bit codes: weights
narrow-range signed (``[-7, 7]`` for 4 bits), activations full-range (``[0, 7]`` for an
unsigned 3-bit ReLU). Every convolution and the linear layer must reach the crossbars
with exactly the widths the model sets, compute what TVM's llvm build of the same file
computes, and agree with onnxruntime as well as that build does.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("brevitas")
pytest.importorskip("onnxoptimizer")  # export_onnx_qcdq needs it
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

from brevitas.export import export_onnx_qcdq, export_qonnx  # noqa: E402
from brevitas.graph.calibrate import calibration_mode  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import tvm_cim  # noqa: E402
from tests.compiler.conftest import build_llvm, run_vm  # noqa: E402
from tests.conformance import suite  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx  # noqa: E402
from tvm_cim.core.errors import CimError  # noqa: E402

SHAPE = (1, 3, 8, 8)

WIDTHS = suite.BREVITAS_WIDTHS


#: ONNX node names of the layers, per export.
NAMES = {
    "qcdq": ["/c1/Conv", "/c2/Conv", "/c3/Conv", "/c4/Conv", "/fc/Gemm"],
    "qonnx": None,  # the exporter's own names; checked by count
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both exports of one calibrated model: ``{"qcdq": path, "qonnx": path}``."""
    torch.manual_seed(0)
    model = suite.brevitas_mixed_cnn(in_channels=SHAPE[1], size=SHAPE[2])
    model.eval()
    with torch.no_grad(), calibration_mode(model):  # activation scales from statistics
        for _ in range(8):
            model(torch.randn(16, *SHAPE[1:]))
    folder = tmp_path_factory.mktemp("brevitas")
    x = torch.randn(SHAPE)
    paths = {"qcdq": folder / "qcdq.onnx", "qonnx": folder / "qonnx.onnx"}
    export_onnx_qcdq(model, x, export_path=str(paths["qcdq"]), dynamo=False)
    export_qonnx(model, x, export_path=str(paths["qonnx"]))
    return paths


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


@pytest.mark.parametrize("export", ["qcdq", "qonnx"])
def test_brevitas_mixed_precision_cnn(exported, export):
    if export == "qonnx":
        pytest.importorskip("qonnx")
    mod, names = load_onnx(exported[export])
    plan = tvm_cim.plan_for_cim(mod, names=names)
    assert plan.cpu == []
    report = plan.report(plan.programs({}))
    if NAMES[export] is not None:
        assert [op.name for op in report.operators] == NAMES[export]
    assert [op.kind for op in report.operators] == ["conv2d"] * 4 + ["dense"]
    assert [(op.w_bits, op.a_bits) for op in report.operators] == [(w, a) for w, a, _ in WIDTHS]
    assert [op.input.signed for op in plan.operators] == [s for _, _, s in WIDTHS]

    ex, _ = tvm_cim.compile_for_cim(mod, names=names)
    llvm = build_llvm(mod)
    session = ort.InferenceSession(str(exported["qcdq"]))
    feed = session.get_inputs()[0].name
    xs = np.random.default_rng(1).standard_normal((48, *SHAPE)).astype(np.float32)
    cim = np.concatenate([np.asarray(run_vm(ex, x)).reshape(1, -1) for x in xs])
    ref = np.concatenate([np.asarray(run_vm(llvm, x)).reshape(1, -1) for x in xs])
    onnx_rt = np.concatenate([session.run(None, {feed: x})[0] for x in xs])
    np.testing.assert_allclose(cim, ref, rtol=1e-5, atol=1e-5)
    agreement, error = _argmax_agreement(cim, onnx_rt), _relative_error(cim, onnx_rt)
    print(
        f"{export}: argmax agreement with onnxruntime {agreement:.3f}, relative error {error:.2e}"
    )
    assert agreement >= _argmax_agreement(ref, onnx_rt)
    assert agreement >= 0.9 and error < 0.05


# ------------------------------------------------- small graphs, one idiom each


def _init(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _qcdq_dense(
    weight_clip=(-7, 7), act_clip=(0, 15), act_dtype=np.uint8, flatten=True, shared=False
):
    """x -> QuantizeLinear -> Clip -> DequantizeLinear [-> Flatten] -> Gemm, the weight
    int8 codes -> Clip -> DequantizeLinear, as Brevitas's QCDQ export writes them;
    ``shared``: a Relu reads the dequantized input as well (a second output)."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(5, 18)).astype(np.int8)
    inits = [
        _init("s", np.float32(0.05)),
        _init("z", act_dtype(0)),
        _init("alo", act_dtype(act_clip[0])),
        _init("ahi", act_dtype(act_clip[1])),
        _init("w", codes),
        _init("ws", np.float32(0.02)),
        _init("wz", np.int8(0)),
        _init("wlo", np.int8(weight_clip[0])),
        _init("whi", np.int8(weight_clip[1])),
        _init("b", rng.standard_normal(5).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
        helper.make_node("Clip", ["q", "alo", "ahi"], ["qc"], name="act_clip"),
        helper.make_node("DequantizeLinear", ["qc", "s", "z"], ["xd"], name="dq"),
        helper.make_node("Clip", ["w", "wlo", "whi"], ["wc"], name="weight_clip"),
        helper.make_node("DequantizeLinear", ["wc", "ws", "wz"], ["wd"], name="wdq"),
    ]
    if flatten:
        nodes.append(helper.make_node("Flatten", ["xd"], ["xf"], name="flatten", axis=1))
    nodes.append(
        helper.make_node("Gemm", ["xf" if flatten else "xd", "wd", "b"], ["y"], name="fc", transB=1)
    )
    shape = [1, 2, 3, 3] if flatten else [1, 18]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])]
    if shared:
        nodes.append(helper.make_node("Relu", ["xd"], ["r"], name="relu"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, shape))
    graph = helper.make_graph(
        nodes,
        "qcdq_dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), shape


def _load(model, tmp_path, name="model.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return load_onnx(path)


def _calls(mod, op: str) -> list:
    return [
        b.value
        for block in mod["main"].body.blocks
        for b in block.bindings
        if getattr(getattr(b.value, "op", None), "name", None) == op
    ]


def _same_outputs(a, b, shape, count=8):
    ex_a, ex_b = build_llvm(a), build_llvm(b)
    for x in np.random.default_rng(2).standard_normal((count, *shape)).astype(np.float32):
        np.testing.assert_array_equal(run_vm(ex_a, x), run_vm(ex_b, x))


def test_integer_clips_become_clip_calls(tmp_path):
    from tvm_cim.relay_passes.canonicalize import clip_bounds, clips_from_min_max

    mod, _ = _load(_qcdq_dense()[0], tmp_path)
    assert len(_calls(mod, "relax.call_tir")) >= 4  # min/max pairs as imported
    canonical = clips_from_min_max(mod)
    clips = _calls(canonical, "relax.clip")
    assert sorted(clip_bounds(c) for c in clips) == [(-7.0, 7.0), (0.0, 15.0)]
    assert all(str(c.args[0].ty.dtype) in ("int8", "uint8") for c in clips)
    assert _calls(canonical, "relax.call_tir") == []
    _same_outputs(mod, canonical, [1, 2, 3, 3])


def test_reshape_moves_above_per_tensor_dequantize(tmp_path):
    from tvm_cim.relay_passes.canonicalize import clips_from_min_max, reshapes_before_dequantize

    mod, names = _load(_qcdq_dense()[0], tmp_path)
    moved = reshapes_before_dequantize(clips_from_min_max(mod))
    bindings = {b.var: b.value for block in moved["main"].body.blocks for b in block.bindings}
    (matmul,) = _calls(moved, "relax.matmul")
    chain = [bindings[matmul.args[0]]]
    while chain[-1].op.name != "relax.reshape":
        chain.append(bindings[chain[-1].args[0]])
    ops = [c.op.name for c in chain]
    assert ops == ["relax.dequantize", "relax.clip", "relax.quantize", "relax.reshape"]
    _same_outputs(mod, moved, [1, 2, 3, 3])

    plan = tvm_cim.plan_for_cim(mod, names=names)
    assert plan.cpu == []
    (op,) = plan.operators
    assert (op.name, op.w_bits, op.input.bits, op.input.signed) == ("fc", 4, 4, False)
    ex, _ = tvm_cim.compile_for_cim(mod, names=names)
    llvm = build_llvm(mod)
    for x in np.random.default_rng(3).standard_normal((8, 1, 2, 3, 3)).astype(np.float32):
        np.testing.assert_allclose(run_vm(ex, x), run_vm(llvm, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("weight_clip", "w_bits"), [((-7, 7), 4), ((-8, 7), 4), ((-1, 1), 2), ((-127, 127), 8)]
)
def test_weight_clip_states_the_width(tmp_path, weight_clip, w_bits):
    mod, names = _load(_qcdq_dense(weight_clip=weight_clip, flatten=False)[0], tmp_path)
    (op,) = tvm_cim.plan_for_cim(mod, names=names).operators
    assert op.w_bits == w_bits


def test_weight_clip_that_is_no_code_range_stays_on_cpu(tmp_path):
    mod, names = _load(_qcdq_dense(weight_clip=(-5, 6), flatten=False)[0], tmp_path)
    ex, report = tvm_cim.compile_for_cim(mod, names=names)
    assert report.operators == []
    ((cpu),) = report.cpu
    assert cpu["name"] == "fc"
    assert "integer clip [-5, 6]" in cpu["reason"] and "not a signed code range" in cpu["reason"]
    llvm = build_llvm(mod)
    x = np.random.default_rng(4).standard_normal((1, 18)).astype(np.float32)
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(llvm, x))


@pytest.mark.parametrize(
    ("act_clip", "dtype", "a_bits", "signed"),
    [((0, 7), np.uint8, 3, False), ((-16, 15), np.int8, 5, True), ((0, 1), np.uint8, 1, False)],
)
def test_activation_clip_states_the_width(tmp_path, act_clip, dtype, a_bits, signed):
    model, shape = _qcdq_dense(act_clip=act_clip, act_dtype=dtype, flatten=False)
    mod, names = _load(model, tmp_path)
    (op,) = tvm_cim.plan_for_cim(mod, names=names).operators
    assert (op.input.bits, op.input.signed) == (a_bits, signed)


def test_shared_qcdq_activation_gets_its_own_copy(tmp_path):
    """A Q -> Clip -> DQ chain another operator also reads is copied whole for the Gemm."""
    model, shape = _qcdq_dense(act_clip=(0, 7), flatten=False, shared=True)
    mod, names = _load(model, tmp_path)
    ex, report = tvm_cim.compile_for_cim(mod, names=names)
    assert report.cpu == []
    assert [(op.w_bits, op.a_bits) for op in report.operators] == [(4, 3)]
    llvm = build_llvm(mod)
    for x in np.random.default_rng(6).standard_normal((4, *shape)).astype(np.float32):
        for got, want in zip(run_vm(ex, x), run_vm(llvm, x), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_narrow_activation_codes_stay_on_cpu(tmp_path):
    """Crossbar inputs clamp to full code ranges; codes clipped to [-7, 7] would differ."""
    model, shape = _qcdq_dense(act_clip=(-7, 7), act_dtype=np.int8, flatten=False)
    mod, names = _load(model, tmp_path)
    ex, report = tvm_cim.compile_for_cim(mod, names=names)
    ((cpu),) = report.cpu
    assert "activation codes are clipped to [-7, 7]" in cpu["reason"]
    llvm = build_llvm(mod)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(llvm, x))


# ----------------------------------------------------------- QONNX refusals


def _qonnx_dense(op_type: str, bits: float = 4.0):
    """x -> 8-bit Quant -> MatMul, its weight through ``op_type`` (``Quant`` of ``bits``)."""
    domain = "qonnx.custom_op.general"
    rng = np.random.default_rng(0)
    inits = [
        _init("w", rng.standard_normal((6, 3)).astype(np.float32)),
        _init("s", np.float32(0.1)),
        _init("z", np.float32(0)),
        _init("bits", np.float32(bits)),
        _init("xbits", np.float32(8)),
    ]
    nodes = [helper.make_node("Quant", ["x", "s", "z", "xbits"], ["xq"], name="xq", domain=domain)]
    if op_type == "Quant":
        node = helper.make_node(
            "Quant", ["w", "s", "z", "bits"], ["wq"], name="wquant", domain=domain
        )
    else:
        node = helper.make_node("BipolarQuant", ["w", "s"], ["wq"], name="wquant", domain=domain)
    graph = helper.make_graph(
        [*nodes, node, helper.make_node("MatMul", ["xq", "wq"], ["y"], name="mm")],
        "qonnx_dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_qonnx_quant_of_a_weight_is_converted(tmp_path):
    pytest.importorskip("qonnx")
    path = tmp_path / "qonnx.onnx"
    onnx.save(_qonnx_dense("Quant", 4.0), str(path))
    mod, names = load_onnx(path)
    plan = tvm_cim.plan_for_cim(mod, names=names)
    (op,) = plan.operators
    assert (op.name, op.w_bits, plan.cpu) == ("mm", 4, [])


@pytest.mark.parametrize(
    ("op_type", "bits", "why"),
    [("BipolarQuant", 1.0, "BipolarQuant"), ("Quant", 16.0, "Quant of 16 bits")],
)
def test_qonnx_nodes_without_a_qcdq_form_are_refused_by_name(tmp_path, op_type, bits, why):
    pytest.importorskip("qonnx")
    path = tmp_path / "qonnx.onnx"
    onnx.save(_qonnx_dense(op_type, bits), str(path))
    with pytest.raises(CimError, match=f"'wquant' .*{why}"):
        load_onnx(path)


def _trunc_model(version: int, rounding: str, signed: int, out_bits: float):
    """x -> 8-bit Quant -> Trunc -> y, at QONNX opset ``version`` (1: five inputs, no
    clamp; 2: six inputs with the output scale, clamped to the output width)."""
    domain = "qonnx.custom_op.general"
    inits = [
        _init("s", np.float32(0.05)),
        _init("z", np.float32(0)),
        _init("bits", np.float32(8)),
        _init("out_s", np.float32(0.2)),
        _init("out_bits", np.float32(out_bits)),
    ]
    trunc_inputs = ["xq", "s", "z", "bits", "out_s", "out_bits"]
    if version == 1:
        trunc_inputs = ["xq", "s", "z", "bits", "out_bits"]
    nodes = [
        helper.make_node(
            "Quant",
            ["x", "s", "z", "bits"],
            ["xq"],
            name="xq",
            domain=domain,
            signed=1,
            narrow=0,
            rounding_mode="ROUND",
        ),
        helper.make_node(
            "Trunc",
            trunc_inputs,
            ["y"],
            name="trunc",
            domain=domain,
            rounding_mode=rounding,
            **({"signed": signed} if version == 2 else {}),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "trunc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        inits,
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid(domain, version)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("rounding", ["FLOOR", "ROUND", "CEIL"])
@pytest.mark.parametrize(("signed", "out_bits"), [(1, 4.0), (0, 3.0)])
def test_qonnx_trunc_computes_what_qonnx_computes(tmp_path, version, rounding, signed, out_bits):
    pytest.importorskip("qonnx")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    path = tmp_path / "trunc.onnx"
    onnx.save(_trunc_model(version, rounding, signed, out_bits), str(path))
    x = (np.random.default_rng(version).standard_normal((2, 64)) * 4).astype(np.float32)
    wrapper = ModelWrapper(str(path)).transform(InferShapes())
    expected = execute_onnx(wrapper, {"x": x})["y"]
    mod, _ = load_onnx(path)
    got = run_vm(build_llvm(mod), x)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_brevitas_trunc_avg_pool_feeds_its_width_to_the_next_layer(tmp_path):
    """``TruncAvgPool2d`` exports a Trunc; the convolution after it takes the Trunc's
    output width as its input width, and the whole model computes what qonnx's own
    executor and Brevitas compute."""
    pytest.importorskip("qonnx")
    import brevitas.nn as qnn
    from brevitas.quant import Int32Bias
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q0 = qnn.QuantIdentity(bit_width=8, return_quant_tensor=True)
            self.c1 = qnn.QuantConv2d(1, 8, 3, padding=1, weight_bit_width=4, bias_quant=Int32Bias)
            self.r1 = qnn.QuantReLU(bit_width=4, return_quant_tensor=True)
            self.pool = qnn.TruncAvgPool2d(2, stride=2, bit_width=4, return_quant_tensor=True)
            self.c2 = qnn.QuantConv2d(8, 8, 3, padding=1, weight_bit_width=3, bias_quant=Int32Bias)

        def forward(self, x):
            return self.c2(self.pool(self.r1(self.c1(self.q0(x)))))

    torch.manual_seed(0)
    model = Pooled().eval()
    with torch.no_grad(), calibration_mode(model):
        for _ in range(4):
            model(torch.randn(8, 1, 8, 8))
    path = tmp_path / "pooled.onnx"
    export_qonnx(model, torch.randn(1, 1, 8, 8), export_path=str(path))
    assert any(n.op_type == "Trunc" for n in onnx.load(str(path)).graph.node)

    mod, names = load_onnx(path)
    plan = tvm_cim.plan_for_cim(mod, names=names)
    assert plan.cpu == []
    assert [(op.w_bits, op.a_bits) for op in plan.cost_report().operators] == [(4, 8), (3, 4)]
    ex, _ = tvm_cim.compile_for_cim(mod, names=names)
    wrapper = cleanup_model(ModelWrapper(str(path)))
    feed, out = wrapper.graph.input[0].name, wrapper.graph.output[0].name
    for x in np.random.default_rng(0).standard_normal((8, 1, 1, 8, 8)).astype(np.float32):
        expected = execute_onnx(wrapper, {feed: x})[out]
        with torch.no_grad():
            brevitas_out = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(expected, brevitas_out, atol=1e-6)
        np.testing.assert_allclose(run_vm(ex, x), expected, rtol=1e-5, atol=1e-6)


def test_qonnx_model_without_qonnx_installed(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "qonnx.onnx"
    onnx.save(_qonnx_dense("Quant"), str(path))
    for name in [m for m in sys.modules if m == "qonnx" or m.startswith("qonnx.")] + ["qonnx"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(CimError, match="needs the qonnx package"):
        load_onnx(path)
