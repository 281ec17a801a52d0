"""The deep zoo model ``mnist1d-resnet`` through QAT, both exports, the crossbar compiler,
the simulator and ``tvm-cim report``."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from tests.learn.test_zoo import randomize_batchnorm  # noqa: E402
from tvm_cim import compile_for_cim  # noqa: E402
from tvm_cim.cli.main import main as cli_main  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx, load_torch  # noqa: E402
from tvm_cim.learn import qat, zoo  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NAME = "mnist1d-resnet"


def _mixed_policy(layers: list[str]) -> dict:
    """Every layer at a different width pair, 2..8 bits, cycling over the layers."""
    pairs = [[8, 8], [6, 4], [4, 6], [3, 5], [2, 8], [5, 3], [8, 2]]
    return {name: pairs[i % len(pairs)] for i, name in enumerate(layers)}


@pytest.fixture(scope="module")
def samples():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(64, *zoo.input_shape(NAME), generator=gen)


def _quantized(precision, samples) -> torch.nn.Module:
    """A seeded model with non-trivial batch norms, prepared and calibrated, in eval mode."""
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.build(NAME))
    if precision == "mixed":
        precision = _mixed_policy(zoo.quantizable_layers(model))
    qat.prepare(model, precision)
    qat.calibrate(model, [samples])
    return model.eval()


@pytest.mark.parametrize(
    ("precision", "frontend"), [(None, "torch.export"), ("mixed", "onnx")], ids=["W8A8", "mixed"]
)
def test_simulated_outputs_match_the_fake_quantized_model(samples, tmp_path, precision, frontend):
    import tvm
    from tvm import relax

    model = _quantized(precision, samples)
    example = samples[:1]
    if frontend == "onnx":
        mod, names = load_onnx(qat.export_onnx(model, tmp_path / "model.onnx", example))
    else:
        mod, names = load_torch(model, example)
    ex, report = compile_for_cim(mod, names=names)
    assert [op.name for op in report.operators] == zoo.quantizable_layers(model)
    assert report.cpu == []
    bits = {op.name: {"w_bits": op.w_bits, "a_bits": op.a_bits} for op in report.operators}
    assert bits == qat.precision_of(model)  # the widths travel in the graph

    vm = relax.VirtualMachine(ex, tvm.cpu())
    test = samples[-4:]
    outputs = [vm["main"](tvm.runtime.tensor(s[None].numpy())) for s in test]
    if frontend != "onnx":  # torch.export programs return a tuple
        outputs = [out[0] for out in outputs]
    got = np.concatenate([out.numpy() for out in outputs])
    with torch.no_grad():
        expected = model(test).numpy()
    tolerance = 1e-3 * np.abs(expected).max()
    assert np.ptp(expected, axis=0).max() > 20 * tolerance  # the samples are told apart
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    assert np.abs(got - expected).max() <= tolerance


def test_qat_steps_train_every_layer(samples):
    model = _quantized("mixed", samples).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = samples[:8]
    labels = torch.arange(len(batch)) % 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):  # gradients reach every layer through the shortcuts' straight-through
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        opt.step()
    for layer in zoo.quantizable_layers(model):
        weight = f"{layer}.weight"
        assert not torch.equal(before[weight], model.get_parameter(weight)), layer


def _formula_latency_us(model, bits: dict[str, tuple[int, int]]) -> float:
    """CIM-AQ's latency on rram-4b for a model whose every layer fits one 256x256 crossbar
    (one 56 us write; one 1.4 us MVM per output position and input bit)."""
    positions = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: positions.__setitem__(name, o[0, 0].numel())
        )
        for name in bits
    ]
    with torch.no_grad():
        model(torch.zeros(1, *zoo.input_shape(NAME)))
    for hook in hooks:
        hook.remove()
    return sum(56.0 + 1.4 * positions[name] * a for name, (_, a) in bits.items())


def test_report_gives_the_latency_of_every_layer(tmp_path, capsys):
    model = zoo.build(NAME).eval()
    layers = zoo.quantizable_layers(model)
    policy = np.array([[8, 8] if i % 2 else [4, 2] for i in range(len(layers))])
    np.save(tmp_path / "policy.npy", policy)
    runs = {}
    for label, extra in [("w8a8", []), ("mixed", ["--precision", str(tmp_path / "policy.npy")])]:
        path = tmp_path / f"{label}.json"
        args = ["report", "--model", NAME, "--arch", "rram-4b", "--json", str(path), *extra]
        assert cli_main(args) == 0
        runs[label] = json.loads(path.read_text())
    assert "22 layers" in capsys.readouterr().out
    w8a8, mixed = runs["w8a8"], runs["mixed"]
    assert [op["name"] for op in w8a8["layers"]] == layers
    assert [op["writes"] for op in w8a8["layers"]] == [1] * len(layers)
    expected = _formula_latency_us(model, {name: (8, 8) for name in layers})
    assert w8a8["total_latency_us"] == pytest.approx(expected)
    assert w8a8["total_latency_us"] == pytest.approx(6731.2)
    mixed_bits = {name: tuple(map(int, policy[i])) for i, name in enumerate(layers)}
    assert mixed["total_latency_us"] == pytest.approx(_formula_latency_us(model, mixed_bits))
    assert mixed["speedup"] == pytest.approx(w8a8["total_latency_us"] / mixed["total_latency_us"])
    assert mixed["speedup"] > 1.0
