"""Models quantized by another producer: onnxruntime's ``quantize_static`` in QDQ format.

onnxruntime shares one QuantizeLinear/DequantizeLinear pair among all readers of a tensor
unless ``DedicatedQDQPair`` is set; on a residual network the pair feeding a convolution
also feeds the residual ``Add``. Both modes must compile; the crossbars must compute
exactly what TVM's own llvm build of the same file computes, and agree with onnxruntime as
well as that build does.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402
from tests.compiler.conftest import build_llvm, run_vm  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx  # noqa: E402

SHAPE = (1, 3, 8, 8)


class _Residual(torch.nn.Module):
    """conv -> relu -> (conv -> relu -> conv) + skip -> relu -> linear."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c3(torch.relu(self.c2(h))) + h)
        return self.fc(torch.flatten(h, 1))


class _Samples(quantization.CalibrationDataReader):
    def __init__(self, count: int, seed: int):
        rng = np.random.default_rng(seed)
        self.samples = iter(
            [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(count)]
        )

    def get_next(self):
        return next(self.samples, None)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ort") / "float.onnx"
    torch.onnx.export(
        _Residual().eval(),
        torch.randn(SHAPE),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
        opset_version=13,
    )
    return path


def _quantized(float_model, dedicated: bool):
    path = float_model.with_name(f"qdq-dedicated{int(dedicated)}.onnx")
    quantization.quantize_static(
        str(float_model),
        str(path),
        _Samples(16, seed=0),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        extra_options={"DedicatedQDQPair": dedicated},
    )
    return path


def _argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(axis=-1) == b.argmax(axis=-1)))


@pytest.mark.parametrize("dedicated", [False, True])
def test_onnxruntime_qdq_residual_network(float_model, dedicated):
    path = _quantized(float_model, dedicated)
    mod, names = load_onnx(path)
    ex, report = tvm_cim.compile_for_cim(mod, names=names)
    assert [op.name for op in report.operators] == ["/c1/Conv", "/c2/Conv", "/c3/Conv", "/fc/Gemm"]
    assert report.cpu == []

    llvm = build_llvm(mod)
    session = ort.InferenceSession(str(path))
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((32, *SHAPE)).astype(np.float32)
    cim = np.concatenate([np.asarray(run_vm(ex, x)).reshape(1, -1) for x in xs])
    ref = np.concatenate([np.asarray(run_vm(llvm, x)).reshape(1, -1) for x in xs])
    onnx_rt = np.concatenate([session.run(None, {"x": x})[0] for x in xs])
    np.testing.assert_allclose(cim, ref, rtol=1e-5, atol=1e-5)
    assert _argmax_agreement(cim, onnx_rt) >= _argmax_agreement(ref, onnx_rt)


def test_a_match_never_swallows_a_value_others_read(float_model):
    """Without dedicated pairs, the pattern that would take c2 together with the pair the
    residual add also reads is refused: the build stays whole and c2 stays on the CPU."""
    from tvm_cim.relay_passes.canonicalize import clips_from_min_max
    from tvm_cim.relay_passes.extract import read_region
    from tvm_cim.relay_passes.partition import name_operators, offloaded_functions
    from tvm_cim.relay_passes.patterns import cim_patterns

    mod, names = load_onnx(_quantized(float_model, dedicated=False))
    mod = clips_from_min_max(name_operators(mod, names))
    mod = relax.transform.FuseOpsByPattern(
        cim_patterns(), bind_constants=True, annotate_codegen=False
    )(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    ops = [op.name for gv, fn in offloaded_functions(mod) for op in read_region("r", fn).ops]
    assert ops == ["/c1/Conv", "/c3/Conv", "/fc/Gemm"]
