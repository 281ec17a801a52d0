"""``tvm-cim report``: the latency study of zoo models against CIM-AQ's formula."""

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from torch import nn  # noqa: E402

from tvm_cim.cli.main import main as cli_main  # noqa: E402
from tvm_cim.learn import zoo as models  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def formula_latency_us(model_name: str, w_bits=8, a_bits=8) -> list[float]:
    """CIM-AQ's per-layer latency (reference page, rram-4b: 256x256, 4-bit cells, 1-bit
    inputs, differential columns, 56 us writes, 1.4 us MVMs), from the PyTorch layers'
    own shapes, in ``named_modules()`` order."""
    model = models.build(model_name).eval()
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with torch.no_grad():
        model(torch.zeros(1, *models.input_shape(model_name)))
    for h in hooks:
        h.remove()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            n_in, m_out = m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
            invocations = shapes[name][2] * shapes[name][3]
        elif isinstance(m, nn.Linear):
            n_in, m_out, invocations = m.in_features, m.out_features, 1
        else:
            continue
        cols = 2 * m_out * math.ceil(w_bits / 4)
        writes = math.ceil(cols / 256) * math.ceil(n_in / 256)
        execs = invocations * writes * a_bits
        out.append((writes * 56_000_000 + execs * 1_400_000) / 1e6)  # integer picoseconds
    return out


def _report(tmp_path, capsys, *args):
    path = tmp_path / "report.json"
    assert cli_main(["report", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("model_name, layers", [("vgg16", 16), ("resnet18", 21)])
def test_w8a8_report_is_the_reference_formula(tmp_path, capsys, model_name, layers):
    data, out = _report(tmp_path, capsys, "--model", model_name, "--arch", "rram-4b")
    expected = formula_latency_us(model_name)
    assert len(data["layers"]) == len(expected) == layers
    assert [round(op["latency_us"], 6) for op in data["layers"]] == [round(v, 6) for v in expected]
    assert data["total_latency_us"] == pytest.approx(sum(expected), abs=1e-6)
    assert data["w8a8_latency_us"] == data["total_latency_us"] and data["speedup"] == 1.0
    assert f"over {layers} layers" in out


def test_npy_policy_in_named_modules_order(tmp_path, capsys):
    model = models.build("resnet20")
    count = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    policy = np.array([[8, 8]] + [[4, 2 + i % 5] for i in range(count - 2)] + [[8, 8]])
    np.save(tmp_path / "policy.npy", policy)
    data, out = _report(
        tmp_path, capsys, "--model", "resnet20", "--precision", str(tmp_path / "policy.npy")
    )
    assert [[op["w_bits"], op["a_bits"]] for op in data["layers"]] == policy.tolist()
    expected = sum(
        formula_latency_us("resnet20", *map(int, row))[i] for i, row in enumerate(policy)
    )
    assert data["sequential_latency_us"] == pytest.approx(expected, abs=1e-6)
    assert data["speedup"] == pytest.approx(data["w8a8_latency_us"] / data["total_latency_us"])
    assert data["speedup"] > 1.5


def test_more_crossbars_run_tiles_and_weight_copies_side_by_side(tmp_path, capsys):
    one, _ = _report(tmp_path, capsys, "--model", "resnet20")
    four, out = _report(tmp_path, capsys, "--model", "resnet20", "--crossbars", "4")
    assert four["total_latency_us"] < one["total_latency_us"] / 3
    # the same input vectors, spread over copies that each write their tiles
    assert [op["mvm_executions"] for op in four["layers"]] == [
        op["mvm_executions"] for op in one["layers"]
    ]
    assert sum(op["writes"] for op in four["layers"]) > sum(op["writes"] for op in one["layers"])
    assert one["sequential_latency_us"] == pytest.approx(one["total_latency_us"])
    assert "crossbars=4" in out


def test_depthwise_layers_reach_the_crossbars_and_take_the_policy(tmp_path, capsys):
    data, _ = _report(tmp_path, capsys, "--model", "mobilenetv2")
    assert len(data["layers"]) == 53 and data["cpu_operators"] == []
    # A CIM-AQ policy may list the 17 depthwise layers or leave them out (W8A8).
    for count, depthwise_bits in ((53, (3, 5)), (36, (8, 8))):
        policy = tmp_path / f"policy{count}.npy"
        np.save(policy, np.array([[3, 5]] * count))
        data, _ = _report(tmp_path, capsys, "--model", "mobilenetv2", "--precision", str(policy))
        widths = {op["name"]: (op["w_bits"], op["a_bits"]) for op in data["layers"]}
        assert widths["features.1.conv.0.0"] == depthwise_bits  # the first depthwise layer
        assert widths["features.0.0"] == (3, 5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "alexnet"], "unknown model 'alexnet'"),
        (["--model", "resnet20", "--precision", "POLICY"], "entries, but resnet20 has 20"),
        (
            ["--model", "resnet20", "--arch", "ARCH"],
            "missing the key crossbar.resolution_input_bits",
        ),
        (["--model", "resnet20", "--crossbars", "0"], "crossbars"),
        (["--model", "resnet20", "--batch", "0"], "the batch must be a positive number"),
    ],
)
def test_bad_input(tmp_path, capsys, args, message):
    np.save(tmp_path / "short.npy", np.array([[8, 8]] * 5))
    (tmp_path / "arch.yaml").write_text(
        "crossbar:\n  size: {m: 256, n: 256}\n  resolution_weight_bits: 4\n"
    )
    replace = {"POLICY": str(tmp_path / "short.npy"), "ARCH": str(tmp_path / "arch.yaml")}
    assert cli_main(["report", *[replace.get(a, a) for a in args]]) == 2
    assert message in capsys.readouterr().err


def test_cim_aq_hardware_config_is_an_arch(tmp_path, capsys):
    (tmp_path / "hardware_config.yaml").write_text(
        "crossbar:\n  size:\n    m: 256\n    n: 256\n  resolution_weight_bits: 4\n"
        "  resolution_input_bits: 1\n  mvm_write_latency: 56\n  mvm_execute_latency: 1.4\n"
        "mapper:\n  mapping_type: dc\n"
    )
    theirs, _ = _report(
        tmp_path, capsys, "--model", "resnet20", "--arch", str(tmp_path / "hardware_config.yaml")
    )
    ours, _ = _report(tmp_path, capsys, "--model", "resnet20", "--arch", "rram-4b")
    assert theirs["total_latency_us"] == ours["total_latency_us"]
    assert theirs["total_latency_us"] == pytest.approx(sum(formula_latency_us("resnet20")))


def test_energy_per_image_with_the_isaac_preset(tmp_path, capsys):
    (tmp_path / "w4a4.json").write_text('{"default": {"w_bits": 4, "a_bits": 4}}')
    precision = str(tmp_path / "w4a4.json")
    data, out = _report(
        tmp_path, capsys, "--model", "resnet20", "--arch", "isaac", "--precision", precision
    )
    arch = data["arch"]
    per_layer = [
        op["writes"] * arch["write_energy_nj"] + op["mvm_executions"] * arch["mvm_energy_nj"]
        for op in data["layers"]
    ]
    # ADC and digital energy come on top of the writes and the crossbar steps
    assert data["total_energy_nj"] > sum(per_layer)
    assert data["total_energy_nj"] == pytest.approx(sum(op["energy_nj"] for op in data["layers"]))
    assert data["w8a8_energy_nj"] > data["total_energy_nj"]
    assert f"energy {data['total_energy_nj'] / 1e3:.3f} uJ" in out
    assert "energy uJ" in out.splitlines()[1]


def test_no_energy_column_without_figures(tmp_path, capsys):
    data, out = _report(tmp_path, capsys, "--model", "resnet20")
    assert data["total_energy_nj"] is None and data["w8a8_energy_nj"] is None
    assert "energy" not in out.replace(str(tmp_path), "")


def test_a_batch_shares_the_writes(tmp_path, capsys):
    one, _ = _report(tmp_path, capsys, "--model", "resnet20", "--crossbars", "16")
    eight, out = _report(
        tmp_path, capsys, "--model", "resnet20", "--crossbars", "16", "--batch", "8"
    )
    assert eight["total_latency_us"] == one["total_latency_us"]  # the one-image figures
    single, batch = one["batch"], eight["batch"]
    assert single["batch"] == 1 and single["latency_us"] == one["total_latency_us"]
    assert single["writes_per_item"] == sum(op["writes"] for op in one["layers"])
    assert batch["batch"] == 8
    assert batch["writes_per_item"] < single["writes_per_item"] / 2
    assert batch["throughput_per_s"] == pytest.approx(8e6 / batch["latency_us"])
    assert batch["throughput_per_s"] > single["throughput_per_s"]
    assert f"batch of 8: {batch['latency_us']:.1f} us" in out


def test_a_stream_with_stationary_weights(tmp_path, capsys):
    data, out = _report(tmp_path, capsys, "--model", "digits-cnn", "--crossbars", "64", "--stream")
    stream = data["stream"]
    assert stream["stationary"] and stream["writes_per_image"] == 0
    assert 0 < stream["load_writes"] <= 64
    assert stream["interval_us"] < data["total_latency_us"]
    assert f"one every {stream['interval_us']:.1f} us" in out
    few, _ = _report(tmp_path, capsys, "--model", "digits-cnn", "--crossbars", "2", "--stream")
    assert not few["stream"]["stationary"]
    assert few["stream"]["writes_per_image"] == sum(op["writes"] for op in few["layers"])


def vit_formula_latency_us(patch: int, policy) -> list[float]:
    """CIM-AQ's latency of a ViT-B (224x224, width 768, 12 blocks of 12 heads, MLP 3072,
    1000 classes) layer by layer, in its 74-layer order: the patch embedding, per block
    the QKV projection, Q·Kᵀ, A·V, the output projection, MLP 1 and MLP 2, then the head.
    A layer is ``(n inputs, m outputs, invocations, repeats)``: the tokens invoke every
    linear layer, and each attention matmul repeats once per head with its stored operand
    (Kᵀ: 64 inputs, a token's score per output; V: a token per input, 64 outputs)."""
    patches = (224 // patch) ** 2
    tokens, width, heads, head_dim, mlp = patches + 1, 768, 12, 64, 3072
    block = [
        (width, 3 * width, tokens, 1),
        (head_dim, tokens, tokens, heads),
        (tokens, head_dim, tokens, heads),
        (width, width, tokens, 1),
        (width, mlp, tokens, 1),
        (mlp, width, tokens, 1),
    ]
    layers = [(3 * patch * patch, width, patches, 1), *block * 12, (width, 1000, 1, 1)]
    out = []
    for (n_in, m_out, invocations, repeats), (w_bits, a_bits) in zip(layers, policy, strict=True):
        writes = math.ceil(2 * m_out * math.ceil(w_bits / 4) / 256) * math.ceil(n_in / 256)
        execs = invocations * writes * a_bits
        out.append(repeats * (writes * 56_000_000 + execs * 1_400_000) / 1e6)
    return out


@pytest.mark.slow
def test_vit_b32_report_is_the_reference_formula_layer_by_layer(tmp_path, capsys):
    rng = np.random.default_rng(0)
    policy = rng.integers(2, 9, (74, 2))
    policy[0] = policy[-1] = 8  # CIM-AQ pins the first and last layers
    np.save(tmp_path / "vit.npy", policy)
    data, out = _report(
        tmp_path, capsys, "--model", "vit-b32", "--precision", str(tmp_path / "vit.npy")
    )
    names = models.quantizable_layers(models.build("vit-b32"))
    assert [op["name"] for op in data["layers"]] == names and len(names) == 74
    assert [[op["w_bits"], op["a_bits"]] for op in data["layers"]] == policy.tolist()
    expected = vit_formula_latency_us(32, policy)
    assert [round(op["latency_us"], 6) for op in data["layers"]] == [round(v, 6) for v in expected]
    assert data["total_latency_us"] == pytest.approx(sum(expected), abs=1e-6)
    w8a8 = vit_formula_latency_us(32, [(8, 8)] * 74)
    assert data["w8a8_latency_us"] == pytest.approx(sum(w8a8), abs=1e-6)
    assert data["cpu_operators"] == [] and "over 74 layers" in out
