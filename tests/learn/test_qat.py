"""QAT: the fake quantization is the project's integer semantics, and exported models
compiled for cim compute what the PyTorch model computes."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from torch import nn  # noqa: E402

import tvm_cim.learn.qat as qat  # noqa: E402
from tvm_cim import CimError, compile_for_cim  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx, load_torch  # noqa: E402
from tvm_cim.core.quant import quantize, weight_qmax, weight_scales  # noqa: E402


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    )


def test_fake_quantize_is_the_project_quantizer():
    x = torch.randn(1000) * 3
    scale = torch.tensor(0.07)
    fq = qat.fake_quantize(x, scale, -8, 7).numpy()
    codes = quantize(x.numpy(), 0.07, 0, 4, True)
    np.testing.assert_array_equal(fq, (codes * np.float32(0.07)).astype(np.float32))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_fake_quantize_matches_weight_scales(bits):
    w = torch.randn(6, 3, 3, 3)
    wq, scale = qat.weight_fake_quantize(w, bits)
    ref_scale = weight_scales(w.numpy().reshape(6, -1).T, bits, axis=-1)
    np.testing.assert_array_equal(scale.numpy(), ref_scale)
    codes = torch.round(wq / scale.reshape(-1, 1, 1, 1))
    assert codes.abs().max() <= weight_qmax(bits)


def test_straight_through_gradient():
    x = torch.randn(10, requires_grad=True)
    qat.fake_quantize(x, torch.tensor(0.1), -128, 127).sum().backward()
    assert torch.all(x.grad == 1)


def test_prepare_keeps_module_paths_and_bits():
    model = qat.prepare(small_cnn(), {"default": {"w_bits": 4, "a_bits": 4}, "7": [8, 8]})
    assert qat.layer_names(model) == ["0", "2", "5", "7"]
    assert qat.precision_of(model)["0"] == {"w_bits": 4, "a_bits": 4}
    assert qat.precision_of(model)["7"] == {"w_bits": 8, "a_bits": 8}
    qat.set_precision(model, [[2, 3], [4, 4], [6, 6], [8, 8]])
    assert qat.precision_of(model)["0"] == {"w_bits": 2, "a_bits": 3}


def test_depthwise_convolutions_are_quantized_with_their_groups():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        float_out = model(x)
    qat.prepare(model, {"0": {"w_bits": 8, "a_bits": 8}, "1": {"w_bits": 8, "a_bits": 8}})
    assert isinstance(model[0], qat.QuantConv2d) and model[0].groups == 4
    assert isinstance(model[1], qat.QuantConv2d)
    qat.calibrate(model, [x])
    with torch.no_grad():
        quantized_out = model.eval()(x)
    assert torch.allclose(quantized_out, float_out, atol=0.05 * float_out.abs().max())


@pytest.mark.parametrize(
    "precision,message",
    [
        ({"nope": {"w_bits": 4, "a_bits": 4}}, "'nope' is not an offloaded operator"),
        ({"0": {"w_bits": 9, "a_bits": 4}}, "bits must be in 1..8"),
        ({"0": {"w_bits": 1, "a_bits": 4}}, "at least 2 bits"),
        ([[8, 8]], "1 entries for 4"),
    ],
)
def test_bad_precision(precision, message):
    with pytest.raises(CimError, match=message):
        qat.prepare(small_cnn(), precision)


def _train_briefly(model, x, y, steps=30):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "precision",
    [
        {"default": {"w_bits": 8, "a_bits": 8}},
        {"0": [8, 8], "2": [2, 3], "5": [4, 2], "7": [3, 4]},
    ],
    ids=["W8A8", "mixed-2to4"],
)
@pytest.mark.parametrize("frontend", ["onnx", "torch.export"])
def test_exported_model_on_simulator_matches_pytorch(tmp_path, precision, frontend):
    torch.manual_seed(1)
    x = torch.rand(256, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) * 10).long().clamp(0, 4)
    model = qat.prepare(small_cnn(), precision)
    qat.calibrate(model, [x[:64]])
    _train_briefly(model, x, y)
    model.eval()
    if frontend == "onnx":
        mod, names = load_onnx(qat.export_onnx(model, tmp_path / "model.onnx", x[:1]))
    else:
        mod, names = load_torch(model, x[:1])
    ex, report = compile_for_cim(mod, names=names)
    assert [op.name for op in report.operators] == ["0", "2", "5", "7"]
    bits = {op.name: {"w_bits": op.w_bits, "a_bits": op.a_bits} for op in report.operators}
    assert bits == qat.precision_of(model)  # the widths travel in the graph

    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    test = torch.rand(200, 1, 8, 8)
    outputs = [vm["main"](tvm.runtime.tensor(t[None].numpy())) for t in test]
    if frontend != "onnx":  # torch.export programs return a tuple
        outputs = [out[0] for out in outputs]
    got = np.concatenate([out.numpy() for out in outputs])
    with torch.no_grad():
        ref = model(test).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_export_refuses_an_uncalibrated_model(tmp_path):
    model = qat.prepare(small_cnn())
    with pytest.raises(CimError, match="0: no activation scale yet"):
        qat.export_onnx(model, tmp_path / "model.onnx", torch.rand(1, 1, 8, 8))
    with pytest.raises(CimError, match="call tvm_cim.learn.qat.prepare"):
        qat.export_program(small_cnn(), torch.rand(1, 1, 8, 8))


class _TorchFakeQuantNet(nn.Module):
    """Fake quantization written with PyTorch's own operators, as other QAT tools emit it:
    4-bit unsigned activations (codes 0..15) and 3-bit weights (codes -3..3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc = nn.Linear(12, 6)
        self.register_buffer("w_scale", self.fc.weight.detach().abs().amax(1) / 3)
        self.register_buffer("w_zero", torch.zeros(6, dtype=torch.int32))

    def forward(self, x):
        x = torch.fake_quantize_per_tensor_affine(x, 0.1, 0, 0, 15)
        w = torch.fake_quantize_per_channel_affine(
            self.fc.weight, self.w_scale, self.w_zero, 0, -3, 3
        )
        return nn.functional.linear(x, w, self.fc.bias)


def test_torch_fake_quantize_operators_import_with_their_widths():
    net = _TorchFakeQuantNet().eval()
    x = torch.rand(1, 12) * 2
    mod, names = load_torch(net, x)
    assert names is None  # the linear is called in the root module: no path to name it by
    calibration = [np.random.default_rng(0).random((1, 12), dtype=np.float32)]
    ex, report = compile_for_cim(mod, names=names, calibration=calibration)
    assert [(op.name, op.w_bits, op.a_bits) for op in report.operators] == [("dense_0", 3, 4)]


def test_torch_fake_quantize_wider_than_8_bits_is_refused():
    class Wide(nn.Module):
        def forward(self, x):
            return torch.fake_quantize_per_tensor_affine(x, 0.1, 0, 0, 1023)

    with pytest.raises(CimError, match="0..1023 does not fit 8 bits"):
        load_torch(Wide(), torch.rand(1, 4))
