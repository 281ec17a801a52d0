"""The one ONNX export path: float graphs from the zoo and QDQ graphs from QAT both name
layer nodes by module path, restore training modes and run as the PyTorch model does."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx.reference import ReferenceEvaluator  # noqa: E402
from onnx.version_converter import convert_version  # noqa: E402
from torch import nn  # noqa: E402

from tvm_cim.learn import qat, zoo  # noqa: E402
from tvm_cim.learn.onnx_export import write_onnx  # noqa: E402


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise: quantized like the others
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def _layer_nodes(proto) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


def test_write_onnx_names_the_chosen_layers_and_restores_modes(tmp_path):
    model = _net().train()
    model[0].eval()
    x = torch.randn(1, 2, 6, 6)
    path = write_onnx(model, x, tmp_path / "a" / "b.onnx", fold_constants=True, layers={"5"})
    assert path.is_file()  # parents created
    assert model.training and not model[0].training and model[5].training
    names = _layer_nodes(onnx.load(str(path)))
    assert names[2] == "5" and names[0] != "0" and names[1] != "2"
    path = write_onnx(model, x, tmp_path / "all.onnx", fold_constants=True)
    assert _layer_nodes(onnx.load(str(path))) == ["0", "2", "5"]
    assert _layer_nodes(onnx.load(str(path))) == zoo.quantizable_layers(model)


def test_qdq_export_runs_as_the_fake_quantized_model(tmp_path):
    model = qat.prepare(_net(), {"default": {"w_bits": 4, "a_bits": 5}})
    x = torch.randn(16, 2, 6, 6)
    qat.calibrate(model, [x])
    model.eval()
    proto = onnx.load(str(qat.export_onnx(model, tmp_path / "qdq.onnx", x[:1])))
    onnx.checker.check_model(proto)
    names = _layer_nodes(proto)
    assert names == ["0", "2", "5"]  # quantized layers by path, the depthwise one too
    ops = {n.op_type for n in proto.graph.node}
    assert {"Clip", "QuantizeLinear", "DequantizeLinear", "Relu", "Flatten"} <= ops
    codes = {t.name: t.data_type for t in proto.graph.initializer}
    assert codes["0.weight_codes"] == codes["2.weight_codes"] == codes["5.weight_codes"]
    assert codes["0.weight_codes"] == onnx.TensorProto.INT8
    # onnx's reference runtime implements DequantizeLinear from opset 19 on
    evaluator = ReferenceEvaluator(convert_version(proto, 19))
    with torch.no_grad():
        for sample in x[:4]:
            expected = model(sample[None]).numpy()
            (got,) = evaluator.run(None, {"x": sample[None].numpy()})
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
