"""Attention's activation-activation matmuls on the crossbars: partitioned from torch and
ONNX, run against onnxruntime and PyTorch, costed as they are simulated."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from tests.compiler.conftest import run_vm  # noqa: E402
from tvm_cim import compile_for_cim  # noqa: E402
from tvm_cim.compiler import runtime  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx, load_torch  # noqa: E402
from tvm_cim.compiler.plan import plan_for_cim  # noqa: E402
from tvm_cim.sim.timing import estimate  # noqa: E402


class ExplicitAttention(nn.Module):
    """Self-attention written out: ``softmax(q @ kᵀ / sqrt(d)) @ v``."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, length, dim = x.shape
        q, k, v = (
            t.reshape(b, length, self.heads, -1).permute(0, 2, 1, 3)
            for t in self.qkv(x).chunk(3, dim=-1)
        )
        scores = torch.matmul(q, k.transpose(-2, -1)) / (dim // self.heads) ** 0.5
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.out(y.permute(0, 2, 1, 3).reshape(b, length, dim))


class TorchMHA(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


class SDPA(nn.Module):
    def forward(self, x):
        q = x.reshape(x.shape[0], x.shape[1], 2, -1).permute(0, 2, 1, 3)
        return F.scaled_dot_product_attention(q, q, q)


def _kinds(plan) -> list[str]:
    return [op.kind for op in plan.operators]


@pytest.mark.parametrize(
    "module, dense",
    [(ExplicitAttention, 2), (TorchMHA, 2), (SDPA, 0)],
    ids=["explicit", "mha", "sdpa"],
)
def test_attention_matmuls_are_partitioned_from_torch(module, dense):
    torch.manual_seed(0)
    model = module().eval()
    mod, names = load_torch(model, torch.randn(1, 5, 16))
    plan = plan_for_cim(mod, names=names)
    assert sorted(_kinds(plan)) == sorted(["dense"] * dense + ["matmul"] * 2)
    matmuls = [op for op in plan.operators if op.kind == "matmul"]
    assert [op.heads for op in matmuls] == [2, 2]
    # q @ kᵀ: 8 inputs per head, 5 outputs; a @ v: 5 inputs, 8 outputs; 5 rows each
    assert [op.stored.shape[-2:] for op in matmuls] == [(8, 5), (5, 8)]
    assert [op.vectors_per_item for op in matmuls] == [5, 5]
    assert plan.cpu == []


@pytest.mark.parametrize("module", [ExplicitAttention, TorchMHA], ids=["explicit", "mha"])
def test_attention_on_the_crossbars_computes_what_torch_does(module):
    torch.manual_seed(1)
    model = module().eval()
    x = torch.randn(1, 5, 16)
    mod, names = load_torch(model, x)
    calibration = [torch.randn(1, 5, 16).numpy() for _ in range(8)] + [x.numpy()]
    ex, report = compile_for_cim(
        mod, names=names, calibration=calibration, precision={"default": [8, 8]}
    )
    got = run_vm(ex, x.numpy())
    want = model(x).detach().numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    assert sum(op.kind == "matmul" for op in report.operators) == 2


def _qdq_matmul_model(path, lead=(2,), length=5, k=8, n=6, scales=(0.05, 0.02)):
    """``DequantizeLinear(x) @ DequantizeLinear(s)`` on two int8 inputs (zero point 0), as a
    QDQ exporter writes an attention matmul."""
    x = helper.make_tensor_value_info("x", TensorProto.INT8, [*lead, length, k])
    s = helper.make_tensor_value_info("s", TensorProto.INT8, [*lead, k, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, length, n])
    inits = [
        helper.make_tensor("sx", TensorProto.FLOAT, [], [scales[0]]),
        helper.make_tensor("ss", TensorProto.FLOAT, [], [scales[1]]),
        helper.make_tensor("zp", TensorProto.INT8, [], [0]),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zp"], ["xr"]),
        helper.make_node("DequantizeLinear", ["s", "ss", "zp"], ["sr"]),
        helper.make_node("MatMul", ["xr", "sr"], ["y"], name="scores"),
    ]
    graph = helper.make_graph(nodes, "qdq_matmul", [x, s], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _int_matmul_model(path, lead=(3,), length=4, k=7, n=9):
    """``MatMulInteger`` of two int8 inputs: the integer form."""
    x = helper.make_tensor_value_info("x", TensorProto.INT8, [*lead, length, k])
    s = helper.make_tensor_value_info("s", TensorProto.INT8, [*lead, k, n])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [*lead, length, n])
    nodes = [helper.make_node("MatMulInteger", ["x", "s"], ["y"], name="scores")]
    graph = helper.make_graph(nodes, "int_matmul", [x, s], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _ort(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("bits", [[8, 8], [4, 6]])
def test_qdq_onnx_matmul_of_two_activations_matches_onnxruntime(tmp_path, bits):
    rng = np.random.default_rng(2)
    path = _qdq_matmul_model(tmp_path / "qdq.onnx")
    w_bits, a_bits = bits
    x = rng.integers(-(2 ** (a_bits - 1)), 2 ** (a_bits - 1), (2, 5, 8)).astype(np.int8)
    s = rng.integers(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (2, 8, 6)).astype(np.int8)
    mod, names = load_onnx(path)
    ex, report = compile_for_cim(mod, names=names, precision={"default": bits})
    assert [op.name for op in report.operators] == ["scores"]
    got = run_vm(ex, x, s)
    # exact: the integer products at the two scales (onnxruntime sums in float32)
    step = np.float64(np.float32(0.05)) * np.float64(np.float32(0.02))  # the file's float32
    exact = (x.astype(np.int64) @ s.astype(np.int64)) * step
    np.testing.assert_array_equal(got, exact.astype(np.float32))
    np.testing.assert_allclose(got, _ort(path, {"x": x, "s": s}), rtol=1e-5, atol=1e-5)


def test_integer_onnx_matmul_of_two_activations_is_exact(tmp_path):
    rng = np.random.default_rng(3)
    path = _int_matmul_model(tmp_path / "int.onnx")
    x = rng.integers(-128, 128, (3, 4, 7)).astype(np.int8)
    s = rng.integers(-128, 128, (3, 7, 9)).astype(np.int8)
    mod, names = load_onnx(path)
    ex, report = compile_for_cim(mod, names=names)
    (op,) = report.operators
    assert (op.kind, op.w_bits, op.a_bits) == ("matmul", 8, 8)
    np.testing.assert_array_equal(run_vm(ex, x, s), _ort(path, {"x": x, "s": s}))


def test_matmul_estimate_equals_the_simulation(tmp_path):
    rng = np.random.default_rng(4)
    path = _int_matmul_model(tmp_path / "int.onnx")
    mod, names = load_onnx(path)
    ex, report = compile_for_cim(mod, names=names, arch="rram-4b")
    run_vm(ex, *(rng.integers(-128, 128, sh).astype(np.int8) for sh in [(3, 4, 7), (3, 7, 9)]))
    (program,) = report.programs
    simulated = runtime.last_stats()[program.name]
    # the leading dimension is the graph's batch: three items of one head each
    assert report.operators[0].heads == 1
    static = estimate(program, batch=3)
    assert (static.latency_ps, static.crossbar_writes, static.mvm_executions) == (
        simulated.latency_ps,
        simulated.crossbar_writes,
        simulated.mvm_executions,
    )
    # each item's operand written once (one 256x256 crossbar holds its 7x(9*2*2) cells)
    assert simulated.crossbar_writes == 3


def test_a_nonzero_zero_point_keeps_the_matmul_on_the_cpu_with_its_reason(tmp_path):
    path = _qdq_matmul_model(tmp_path / "qdq.onnx")
    model = onnx.load(path)
    model.graph.initializer[2].CopyFrom(helper.make_tensor("zp", TensorProto.INT8, [], [3]))
    onnx.save(model, path)
    mod, names = load_onnx(path)
    plan = plan_for_cim(mod, names=names)
    assert plan.operators == []
    (cpu,) = plan.cpu
    assert (cpu["name"], cpu["kind"]) == ("scores", "matmul") and "zero point 0" in cpu["reason"]


def test_a_stream_of_attention_rewrites_its_crossbars_for_every_image():
    from tvm_cim.compiler.stream import stream_figures
    from tvm_cim.workflows.study import study_arch

    torch.manual_seed(0)
    mod, names = load_torch(ExplicitAttention().eval(), torch.randn(1, 5, 16))
    plan = plan_for_cim(mod, names=names, arch=study_arch("rram-4b", 64))
    figures = stream_figures(plan)
    report = plan.cost_report()
    assert not figures["stationary"] and figures["load_writes"] == 0
    # two projections, and one write per head of each attention matmul
    assert figures["writes_per_image"] == sum(op.writes for op in report.operators)
    assert sum(op.writes for op in report.operators if op.kind == "matmul") == 4
