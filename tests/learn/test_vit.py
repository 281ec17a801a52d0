"""Vision transformers in the zoo and QAT of attention's activation matmuls."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tests.learn.test_zoo import built  # noqa: E402
from tvm_cim.core.errors import CimError  # noqa: E402
from tvm_cim.core.quant import quantize  # noqa: E402
from tvm_cim.learn import qat, zoo  # noqa: E402
from tvm_cim.learn.onnx_export import fold_constant_nodes  # noqa: E402

BLOCK_LAYERS = (
    "self_attention.in_proj",
    "self_attention.qk",
    "self_attention.av",
    "self_attention.out_proj",
    "mlp.0",
    "mlp.3",
)

# Parameter counts of torchvision's vit_b_32 and vit_b_16 (1000 classes).
TORCHVISION_PARAMS = {"vit-b32": 88_224_232, "vit-b16": 86_567_656}


def cim_aq_order(blocks: int) -> list[str]:
    """CIM-AQ's layer order of a ViT: the patch projection, six operators a block, the head."""
    layers = [
        f"encoder.layers.encoder_layer_{i}.{name}" for i in range(blocks) for name in BLOCK_LAYERS
    ]
    return ["conv_proj", *layers, "heads.head"]


# ------------------------------------------------- torchvision's layout, as reference


class _TorchvisionBlock(nn.Module):
    """torchvision's ``EncoderBlock``, with ``nn.MultiheadAttention``."""

    def __init__(self, heads, hidden, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(mlp, hidden),
            nn.Dropout(0.0),
        )

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inp
        return x + self.mlp(self.ln_2(x))


class _TorchvisionViT(nn.Module):
    """torchvision's ``VisionTransformer``: its module names are its state dict's keys."""

    def __init__(self, image, patch, layers, heads, hidden, mlp, classes, channels=3):
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(channels, hidden, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.encoder = nn.Module()
        seq = (image // patch) ** 2 + 1
        self.encoder.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
        self.encoder.dropout = nn.Dropout(0.0)
        blocks = (
            (f"encoder_layer_{i}", _TorchvisionBlock(heads, hidden, mlp)) for i in range(layers)
        )
        self.encoder.layers = nn.Sequential(OrderedDict(blocks))
        self.encoder.ln = nn.LayerNorm(hidden, eps=1e-6)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, classes)))

    def forward(self, x):
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.hidden, (h // self.patch) * (w // self.patch))
        x = torch.cat([self.class_token.expand(n, -1, -1), x.permute(0, 2, 1)], dim=1)
        enc = self.encoder
        x = enc.ln(enc.layers(enc.dropout(x + enc.pos_embedding)))
        return self.heads(x[:, 0])


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for every parameter (torchvision zero-initialises the head)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model


# ------------------------------------------------------------------------- models


def test_vit_b32_layers_in_cim_aq_order():
    model = built("vit-b32")
    layers = zoo.quantizable_layers(model)
    assert len(layers) == 74 and layers == cim_aq_order(12)
    assert qat.layer_names(model) == layers
    matmuls = [p for p, m in model.named_modules() if isinstance(m, zoo.ActivationMatmul)]
    assert matmuls == [p for p in layers if p.endswith((".qk", ".av"))] and len(matmuls) == 24
    assert zoo.depthwise_layers(model) == []
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS["vit-b32"]
    conv = model.get_submodule("conv_proj")
    assert conv.kernel_size == conv.stride == (32, 32) and conv.out_channels == 768
    assert model.class_token.shape == (1, 1, 768)
    assert model.encoder.pos_embedding.shape == (1, 50, 768)
    block = "encoder.layers.encoder_layer_11"
    assert model.get_submodule(f"{block}.self_attention.in_proj").out_features == 3 * 768
    kinds = [type(model.get_submodule(f"{block}.mlp.{i}")) for i in range(5)]
    assert kinds == [nn.Linear, nn.GELU, nn.Dropout, nn.Linear, nn.Dropout]
    assert model.get_submodule(f"{block}.mlp.0").out_features == 3072
    assert isinstance(model.get_submodule("encoder.ln"), nn.LayerNorm)
    assert model.get_submodule("heads.head").out_features == 1000


def test_vit_b16_layers():
    model = built("vit-b16")
    assert zoo.quantizable_layers(model) == cim_aq_order(12)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS["vit-b16"]
    assert model.get_submodule("conv_proj").kernel_size == (16, 16)
    assert model.encoder.pos_embedding.shape == (1, 197, 768)


def test_vit_b32_exports_with_static_shapes():
    program = torch.export.export(built("vit-b32").eval(), (torch.zeros(1, 3, 224, 224),))
    (out,) = [n for n in program.graph.nodes if n.op == "output"]
    assert tuple(out.args[0][0].meta["val"].shape) == (1, 1000)
    matmuls = [n for n in program.graph.nodes if n.target == torch.ops.aten.matmul.default]
    assert len(matmuls) == 24  # qk and av of the 12 blocks


def test_torchvision_state_dict_loads_and_computes_the_same():
    torch.manual_seed(3)
    reference = _randomize(_TorchvisionViT(16, 4, 2, 4, 32, 48, 7), seed=1).eval()
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in reference.state_dict()
    ours = zoo.VisionTransformer(16, 4, 2, 4, 32, 48, num_classes=7)
    ours = copy.deepcopy(ours)  # the key renaming survives copies
    ours.load_state_dict(reference.state_dict())  # strict: every key and shape fits
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference(x), atol=1e-5, rtol=1e-5)


def test_vit_b32_loads_a_torchvision_state_dict():
    torch.manual_seed(0)
    state = _TorchvisionViT(224, 32, 12, 12, 768, 3072, 1000).state_dict()
    model = zoo.build("vit-b32")
    model.load_state_dict(state)
    key = "encoder.layers.encoder_layer_5.self_attention"
    assert torch.equal(model.get_submodule(f"{key}.in_proj").weight, state[f"{key}.in_proj_weight"])
    assert torch.equal(model.get_submodule(f"{key}.in_proj").bias, state[f"{key}.in_proj_bias"])


def test_bad_vit_shapes():
    with pytest.raises(CimError, match="not a multiple of num_heads"):
        zoo.build("digits-vit", num_heads=3)
    with pytest.raises(CimError, match="not a multiple of patch_size"):
        zoo.build("digits-vit", patch_size=3)


# ----------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from tvm_cim.learn import data

    return data.load("digits", seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """``digits-vit`` after 10 float epochs (96.9 % on the test split when measured)."""
    from tvm_cim.learn import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: threads only add synchronisation
    try:
        model, result = train.run_stage(
            "fp32", "digits-vit", "digits", train.TrainConfig(epochs=10, lr=3e-3, seed=0)
        )
    finally:
        torch.set_num_threads(threads)
    return model, result


def test_digits_vit_trains(trained, digits):
    model, result = trained
    assert model.input_shape == digits.input_shape
    assert zoo.quantizable_layers(model) == cim_aq_order(2)
    assert result.test_accuracy > 90.0


# ---------------------------------------------------------------------------- QAT

QK = "encoder.layers.encoder_layer_0.self_attention.qk"
AV = "encoder.layers.encoder_layer_1.self_attention.av"
MIXED = {"default": [8, 8], QK: [2, 5], AV: [4, 3], "encoder.layers.encoder_layer_1.mlp.0": [4, 6]}


def _prepared(trained, digits, precision=MIXED):
    model = qat.prepare(copy.deepcopy(trained[0]), precision)
    x = torch.from_numpy(digits.train[0][:256])
    qat.calibrate(model, [x[:128], x[128:]])
    return model.eval()


def test_prepare_quantizes_the_matmuls(trained, digits):
    model = _prepared(trained, digits)
    names = cim_aq_order(2)
    assert qat.layer_names(model) == names
    assert list(qat.precision_of(model)) == names
    assert qat.precision_of(model)[QK] == {"w_bits": 2, "a_bits": 5}
    qk = model.get_submodule(QK)
    assert isinstance(qk, qat.QuantActivationMatmul) and isinstance(qk, zoo.ActivationMatmul)
    assert (qk.stored.bits, qk.driven.bits) == (2, 5)
    qat.set_precision(model, {QK: [3, 6]})
    assert (qk.stored.bits, qk.driven.bits) == (3, 6)
    assert qat.precision_of(model)[QK] == {"w_bits": 3, "a_bits": 6}
    with pytest.raises(CimError, match=f"{QK}: symmetric weights need at least 2 bits"):
        qat.set_precision(model, {QK: [1, 4]})
    with pytest.raises(CimError, match=f"{AV}: symmetric weights need at least 2 bits"):
        qat.prepare(copy.deepcopy(trained[0]), {AV: [1, 8]})


def test_matmul_operands_are_the_project_codes(trained, digits):
    model = _prepared(trained, digits)
    seen = {}

    def keep(path):
        def hook(module, inputs, output):
            seen[path] = (module, inputs[0].numpy(), output.numpy())

        return hook

    for path in (QK, AV):
        for role in ("driven", "stored"):
            model.get_submodule(f"{path}.{role}").register_forward_hook(keep(f"{path}.{role}"))
    with torch.no_grad():
        model(torch.from_numpy(digits.test[0][:64]))
    codes = {}
    for path, (module, x, out) in seen.items():
        scale = np.float32(module.act_scale())
        codes[path] = quantize(x, scale, 0, module.bits, module.signed_input)
        np.testing.assert_array_equal(out, (codes[path] * scale).astype(np.float32))
    # q, kᵀ and v have both signs; the attention weights a = softmax(...) are non-negative.
    signed = {path: seen[path][0].signed_input for path in seen}
    assert signed == {
        f"{QK}.driven": True,
        f"{QK}.stored": True,
        f"{AV}.driven": False,
        f"{AV}.stored": True,
    }
    stored_2bit = codes[f"{QK}.stored"]
    assert set(np.unique(stored_2bit)) <= {-2, -1, 0, 1} and len(np.unique(stored_2bit)) >= 3
    assert np.unique(codes[f"{QK}.driven"]).size > 4  # 5-bit codes, -16..15
    assert codes[f"{AV}.driven"].min() >= 0 and codes[f"{AV}.driven"].max() <= 7  # 3 bits


def test_exported_onnx_matches_onnxruntime(trained, digits, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _prepared(trained, digits)
    test = digits.test[0][:200]
    path = qat.export_onnx(model, tmp_path / "vit.onnx", torch.from_numpy(test[:1]))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    layer_nodes = [n for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert [n.name for n in layer_nodes] == cim_aq_order(2)

    folded = copy.deepcopy(proto)  # scales and bounds pass through Casts: fold those
    fold_constant_nodes(folded)
    producer = {o: n for n in folded.graph.node for o in n.output}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in folded.graph.initializer}
    for n in folded.graph.node:
        if n.op_type == "Constant":
            constants[n.output[0]] = onnx.numpy_helper.to_array(n.attribute[0].t)
    for layer in (QK, AV):
        (node,) = [n for n in layer_nodes if n.name == layer]
        matmul = model.get_submodule(layer)
        for operand, role in zip(node.input, ("driven", "stored")):
            dq = producer[operand]
            q = producer[dq.input[0]]
            clip = producer[q.input[0]]
            assert (dq.op_type, q.op_type, clip.op_type) == (
                "DequantizeLinear",
                "QuantizeLinear",
                "Clip",
            )
            quantizer = getattr(matmul, role)
            scale = float(quantizer.act_scale())
            assert float(constants[q.input[1]]) == pytest.approx(scale, rel=1e-7)
            lo, hi = (float(constants[name]) for name in clip.input[1:])
            qmin, qmax = quantizer.act_range()
            assert (lo, hi) == pytest.approx((qmin * scale, qmax * scale), rel=1e-6)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"x": t[None]})[0] for t in test])
    with torch.no_grad():
        ref = model(torch.from_numpy(test)).numpy()
    assert (got.argmax(1) == ref.argmax(1)).all()
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    assert (ref.argmax(1) == digits.test[1][:200]).mean() > 0.85


def test_exported_program_quantizes_both_operands(trained, digits):
    model = _prepared(trained, digits)
    x = torch.from_numpy(digits.test[0][:1])
    program = qat.export_program(model, x)
    targets = [n.target for n in program.graph.nodes]
    per_tensor = targets.count(torch.ops.aten.fake_quantize_per_tensor_affine.default)
    per_channel = targets.count(torch.ops.aten.fake_quantize_per_channel_affine.default)
    assert (per_tensor, per_channel) == (10 + 2 * 4, 10)  # layer inputs, matmul operands
    for node in program.graph.nodes:  # every operand of an attention matmul is quantized
        if node.target == torch.ops.aten.matmul.default:
            for arg in node.args:
                assert arg.target == torch.ops.aten.fake_quantize_per_tensor_affine.default
                assert arg.args[0].target == torch.ops.aten.clamp.default
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), atol=1e-5, rtol=0)


def test_prepared_vit_checkpoint_round_trip(trained, digits, tmp_path):
    from tvm_cim.learn import train

    model = _prepared(trained, digits)
    result = _stage_result(train, model)
    path = train.save_checkpoint(model, result, tmp_path / "mixed.pt")
    loaded, _ = train.load_checkpoint(path, "digits-vit")
    assert qat.precision_of(loaded) == qat.precision_of(model)
    qk = loaded.get_submodule(QK)
    assert float(qk.stored.act_scale()) == float(model.get_submodule(QK).stored.act_scale())
    x = torch.from_numpy(digits.test[0][:32])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def _stage_result(train, model):
    """What a mixed stage of ``digits-vit`` would have produced, less the metrics."""
    return train.StageResult(
        stage="mixed",
        model="digits-vit",
        dataset="digits",
        precision=qat.precision_of(model),
        val_accuracy=math.nan,
        test_accuracy=math.nan,
        seconds=0.0,
    )
