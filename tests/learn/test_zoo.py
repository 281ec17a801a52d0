"""Model zoo: shapes, torchvision layer names, batch-norm folding, ONNX export names."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tvm_cim.core.errors import CimError  # noqa: E402
from tvm_cim.learn import zoo  # noqa: E402

RESNET18_LAYERS = [
    "conv1",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer1.1.conv1",
    "layer1.1.conv2",
    "layer2.0.conv1",
    "layer2.0.conv2",
    "layer2.0.downsample.0",
    "layer2.1.conv1",
    "layer2.1.conv2",
    "layer3.0.conv1",
    "layer3.0.conv2",
    "layer3.0.downsample.0",
    "layer3.1.conv1",
    "layer3.1.conv2",
    "layer4.0.conv1",
    "layer4.0.conv2",
    "layer4.0.downsample.0",
    "layer4.1.conv1",
    "layer4.1.conv2",
    "fc",
]

VGG16_LAYERS = [f"features.{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)] + [
    "classifier.0",
    "classifier.3",
    "classifier.6",
]

# Parameter counts of torchvision's resnet18, vgg16 and mobilenet_v2 (1000 classes).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "vgg16": 138_357_544, "mobilenetv2": 3_504_872}

_BUILT: dict = {}


def built(name: str) -> nn.Module:
    """One shared default instance per model (do not modify it)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = zoo.build(name)
    return _BUILT[name]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch norm non-trivial statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model


def onnx_layer_names(path) -> list[str]:
    import onnx

    proto = onnx.load(str(path))
    return [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]


# ----------------------------------------------------------------------- registry


def test_names_and_shapes():
    assert zoo.names() == [
        "digits-mlp",
        "digits-cnn",
        "mnist1d-cnn",
        "mnist1d-resnet",
        "digits-vit",
        "resnet20",
        "resnet18",
        "vgg16",
        "mobilenetv2",
        "vit-b32",
        "vit-b16",
    ]
    assert zoo.input_shape("digits-cnn") == (1, 8, 8)
    assert zoo.input_shape("mnist1d-cnn") == (1, 1, 40)
    assert zoo.input_shape("mnist1d-resnet") == (1, 1, 40)
    assert zoo.input_shape("resnet20") == (3, 32, 32)
    assert zoo.input_shape("resnet18") == (3, 224, 224)


def test_unknown_model_and_bad_kwargs():
    with pytest.raises(CimError, match="unknown model 'resnet50'.*digits-cnn"):
        zoo.build("resnet50")
    with pytest.raises(CimError, match="unknown model"):
        zoo.input_shape("alexnet")
    with pytest.raises(CimError, match="digits-mlp"):
        zoo.build("digits-mlp", depth=3)
    with pytest.raises(CimError, match="shortcut"):
        zoo.build("resnet20", shortcut="C")
    with pytest.raises(CimError, match="mnist1d-resnet: need three stage widths"):
        zoo.build("mnist1d-resnet", channels=(16, 32))


@pytest.mark.parametrize("name", zoo.names())
def test_forward_on_input_shape(name):
    model = built(name).eval()
    shape = zoo.input_shape(name)
    assert model.input_shape == shape
    batch = 1 if shape[-1] > 100 else 4
    with torch.no_grad():
        y = model(torch.randn(batch, *shape))
    expected = 1000 if shape == (3, 224, 224) else 10
    assert y.shape == (batch, expected)
    assert torch.isfinite(y).all()


def test_num_classes():
    model = zoo.build("resnet20", num_classes=100).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_parameter_counts_match_torchvision(name):
    assert sum(p.numel() for p in built(name).parameters()) == TORCHVISION_PARAMS[name]


# ------------------------------------------------------------------------- layers


def test_resnet18_layers():
    model = built("resnet18")
    assert zoo.quantizable_layers(model) == RESNET18_LAYERS
    assert zoo.depthwise_layers(model) == []
    conv = model.get_submodule("layer2.0.downsample.0")
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert model.get_submodule("conv1").kernel_size == (7, 7)
    assert model.get_submodule("fc").in_features == 512
    assert isinstance(model.get_submodule("layer4.1.bn2"), nn.BatchNorm2d)


def test_vgg16_layers():
    model = built("vgg16")
    assert zoo.quantizable_layers(model) == VGG16_LAYERS
    assert model.get_submodule("classifier.0").in_features == 512 * 7 * 7
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    bn = zoo.build("vgg16", batch_norm=True, hidden=16)
    layers = zoo.quantizable_layers(bn)
    assert len(layers) == 16 and layers[:3] == ["features.0", "features.3", "features.7"]
    assert isinstance(bn.get_submodule("features.1"), nn.BatchNorm2d)


def test_resnet20_layers():
    model = built("resnet20")
    layers = zoo.quantizable_layers(model)
    assert len(layers) == 20
    assert layers[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert layers[-3:] == ["layer3.2.conv1", "layer3.2.conv2", "fc"]
    widths = [model.get_submodule(f"layer{i}.0.conv1").out_channels for i in (1, 2, 3)]
    assert widths == [16, 32, 64]
    assert sum(p.numel() for p in model.parameters()) == 269_722

    projected = zoo.quantizable_layers(zoo.build("resnet20", shortcut="B"))
    assert len(projected) == 22
    assert "layer2.0.downsample.0" in projected and "layer3.0.downsample.0" in projected


def test_mobilenetv2_layers():
    model = built("mobilenetv2")
    layers = zoo.quantizable_layers(model)
    assert len(layers) == 53
    assert layers[:7] == [
        "features.0.0",
        "features.1.conv.0.0",
        "features.1.conv.1",
        "features.2.conv.0.0",
        "features.2.conv.1.0",
        "features.2.conv.2",
        "features.3.conv.0.0",
    ]
    assert layers[-2:] == ["features.18.0", "classifier.1"]
    depthwise = zoo.depthwise_layers(model)
    assert len(depthwise) == 17
    assert depthwise[:2] == ["features.1.conv.0.0", "features.2.conv.1.0"]
    for path in depthwise:
        conv = model.get_submodule(path)
        assert conv.groups == conv.in_channels == conv.out_channels
        assert conv.kernel_size == (3, 3)
    dense = zoo.quantizable_layers(model, include_depthwise=False)
    assert dense == [p for p in layers if p not in depthwise]
    assert model.get_submodule("classifier.1").in_features == 1280


def test_small_models_layers():
    assert zoo.quantizable_layers(built("digits-mlp")) == ["fc1", "fc2", "fc3"]
    assert zoo.quantizable_layers(built("digits-cnn")) == ["conv1", "conv2", "fc1", "fc2"]
    m = built("mnist1d-cnn")
    assert zoo.quantizable_layers(m) == ["conv1", "conv2", "conv3", "fc"]
    assert all(m.get_submodule(f"conv{i}").kernel_size[0] == 1 for i in (1, 2, 3))


def test_mnist1d_resnet_layers():
    model = built("mnist1d-resnet")
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    expected = ["conv1"]
    for block in blocks:
        expected += [f"{block}.conv1", f"{block}.conv2"]
        if block in ("layer2.0", "layer3.0"):
            expected.append(f"{block}.downsample.0")
    assert zoo.quantizable_layers(model) == expected + ["fc"]
    assert len(expected) + 1 == 22
    assert sum(p.numel() for p in model.parameters()) == 93_946
    for path in expected:  # signals of height 1: every kernel and stride keeps it 1
        conv = model.get_submodule(path)
        assert conv.kernel_size[0] == 1 and conv.stride[0] == 1 and conv.padding[0] == 0
    assert model.get_submodule("conv1").kernel_size == (1, 5)
    assert model.get_submodule("layer2.0.conv1").kernel_size == (1, 3)
    for stage, width in (("layer2", 32), ("layer3", 64)):
        projection = model.get_submodule(f"{stage}.0.downsample.0")
        assert projection.kernel_size == (1, 1) and projection.stride == (1, 2)
        assert projection.out_channels == width
        assert isinstance(model.get_submodule(f"{stage}.0.downsample.1"), nn.BatchNorm2d)
    identities = [b for b in blocks if model.get_submodule(b).downsample is None]
    assert len(identities) == 7 and "layer1.0" in identities
    assert model.get_submodule("fc").in_features == 64

    shallow = zoo.build("mnist1d-resnet", channels=(8, 16, 32), blocks=1)
    assert len(zoo.quantizable_layers(shallow)) == 10


# ------------------------------------------------------------ batch-norm folding


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("resnet20", (3, 32, 32)),
        ("resnet20-B", (3, 32, 32)),
        ("mobilenetv2", (3, 64, 64)),
        ("mnist1d-cnn", (1, 1, 40)),
        ("mnist1d-resnet", (1, 1, 40)),
        ("vgg16-bn", (3, 32, 32)),
    ],
)
def test_fold_batchnorm_preserves_outputs(name, shape):
    torch.manual_seed(1)
    if name == "resnet20-B":
        model = zoo.build("resnet20", shortcut="B")
    elif name == "vgg16-bn":
        model = zoo.build("vgg16", batch_norm=True, hidden=32)
    else:
        model = zoo.build(name)
    randomize_batchnorm(model)
    folded = zoo.fold_batchnorm(model)

    assert model.training and not folded.training
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert zoo.quantizable_layers(folded) == zoo.quantizable_layers(model)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, *shape)
    model.eval()
    with torch.no_grad():
        expected, got = model(x), folded(x)
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= 1e-4 * max(1.0, scale)


def test_fold_batchnorm_untraceable_model_uses_module_order():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = self.bn(self.conv(x))
            if x.sum() > 0:
                x = x * 2
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    model = randomize_batchnorm(Branchy()).eval()
    folded = zoo.fold_batchnorm(model)
    assert isinstance(folded.bn, nn.Identity)
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_batchnorm_leaves_shared_convolutions_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.conv(self.bn(self.conv(x)))

    for cls in (Shared, Reused):
        model = randomize_batchnorm(cls()).eval()
        folded = zoo.fold_batchnorm(model)
        assert isinstance(folded.bn, nn.BatchNorm2d)
        x = torch.randn(1, model.conv.in_channels, 3, 3)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x))


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize(
    "name", ["digits-mlp", "digits-cnn", "mnist1d-cnn", "mnist1d-resnet", "resnet20"]
)
def test_export_onnx_small_models(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.build(name))
    path = zoo.export_onnx(model, tmp_path / f"{name}.onnx")
    assert model.training
    assert onnx_layer_names(path) == zoo.quantizable_layers(model)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    (inp,) = proto.graph.input
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "x" and dims == [1, *zoo.input_shape(name)]
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    constants = {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    constants |= {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Pad":
            assert node.input[1] in constants

    x = torch.randn(1, *zoo.input_shape(name))
    model.eval()
    with torch.no_grad():
        expected = model(x).numpy()
    (got,) = ReferenceEvaluator(proto).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_export_onnx_names_match_the_frontend(tmp_path):
    pytest.importorskip("onnx")
    import onnx

    from tvm_cim.compiler.frontend import onnx_operator_names

    model = built("resnet20")
    path = zoo.export_onnx(model, tmp_path / "resnet20.onnx")
    assert onnx_operator_names(onnx.load(str(path))) == zoo.quantizable_layers(model)


def test_export_onnx_resnet18(tmp_path):
    pytest.importorskip("onnx")
    model = built("resnet18")
    path = zoo.export_onnx(model, tmp_path / "resnet18.onnx")
    assert onnx_layer_names(path) == RESNET18_LAYERS


def test_export_onnx_vgg16_layout(tmp_path):
    pytest.importorskip("onnx")
    model = zoo.build("vgg16", hidden=64)
    path = zoo.export_onnx(model, tmp_path / "vgg16.onnx")
    assert onnx_layer_names(path) == VGG16_LAYERS


def test_export_onnx_mobilenetv2(tmp_path):
    pytest.importorskip("onnx")
    model = built("mobilenetv2")
    path = zoo.export_onnx(model, tmp_path / "mobilenetv2.onnx", input_shape=(3, 96, 96))
    assert onnx_layer_names(path) == zoo.quantizable_layers(model)


@pytest.mark.slow
def test_export_onnx_vgg16_full(tmp_path):
    pytest.importorskip("onnx")
    model = built("vgg16")
    path = zoo.export_onnx(model, tmp_path / "vgg16.onnx")
    assert onnx_layer_names(path) == zoo.quantizable_layers(model, include_depthwise=False)


def test_export_onnx_needs_an_input_shape(tmp_path):
    with pytest.raises(CimError, match="input_shape"):
        zoo.export_onnx(nn.Linear(4, 2), tmp_path / "linear.onnx")
    pytest.importorskip("onnx")
    path = zoo.export_onnx(nn.Sequential(nn.Linear(4, 2)), tmp_path / "s.onnx", (4,))
    assert onnx_layer_names(path) == ["0"]


# ------------------------------------------------------------------ data + model


def test_digits_cnn_trains():
    pytest.importorskip("sklearn")
    from tvm_cim.learn import data

    torch.manual_seed(0)
    ds = data.load("digits")
    model = zoo.build("digits-cnn")
    assert ds.input_shape == zoo.input_shape("digits-cnn")
    train, val, _ = ds.loaders(32, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threads only add synchronisation on busy CPUs
    try:
        for _ in range(3):
            model.train()
            for x, y in train:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in val)
    assert correct / len(ds.val[1]) > 0.8


@pytest.mark.parametrize(("dataset", "model"), [("mnist1d", "mnist1d-cnn"), ("synthetic", None)])
def test_dataset_batches_fit_models(dataset, model, tmp_path, monkeypatch):
    if dataset == "mnist1d":
        pytest.importorskip("sklearn")
        pytest.importorskip("mnist1d")
        monkeypatch.setenv("TVM_CIM_CACHE", str(tmp_path))
    from tvm_cim.learn import data

    ds = data.load(dataset)
    net = (
        zoo.build(model)
        if model
        else zoo.build("digits-cnn", num_classes=ds.num_classes)  # same (1, 8, 8) input
    )
    if model:
        assert ds.input_shape == zoo.input_shape(model)
    x, y = next(iter(ds.loaders(16, seed=0)[0]))
    out = net(x)
    assert out.shape == (16, ds.num_classes)
    nn.functional.cross_entropy(out, y).backward()


def test_the_package_reaches_the_zoo():
    import tvm_cim

    assert tvm_cim.models is zoo
    assert tvm_cim.models.build("digits-mlp").input_shape == (1, 8, 8)
