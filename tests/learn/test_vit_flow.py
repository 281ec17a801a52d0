"""The zoo's small ViT through the whole flow: trained, quantization-aware trained at a
policy, exported, compiled for cim with its attention matmuls on the crossbars, and
simulated against PyTorch's fake quantization."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from tests.learn.simulated import simulated_logits  # noqa: E402
from tvm_cim.learn import data  # noqa: E402
from tvm_cim.learn import train as training  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def w8a8_vit():
    fp32, _ = training.run_stage(
        "fp32", "digits-vit", "digits", training.TrainConfig(epochs=10, lr=3e-3, seed=0)
    )
    config = training.TrainConfig(epochs=3, lr=2e-4, seed=0)
    model, _ = training.run_stage("w8a8", "digits-vit", "digits", config, start=fp32)
    return model


#: Low widths on the attention matmuls of the first block, W8A8 elsewhere.
MIXED = {
    "encoder.layers.encoder_layer_0.self_attention.qk": [4, 6],
    "encoder.layers.encoder_layer_0.self_attention.av": [3, 4],
    "encoder.layers.encoder_layer_1.self_attention.in_proj": [4, 4],
}


@pytest.mark.parametrize("policy", [None, MIXED], ids=["W8A8", "mixed"])
@pytest.mark.parametrize("frontend", ["onnx", "torch.export"])
def test_simulated_vit_agrees_with_pytorch(w8a8_vit, tmp_path, policy, frontend):
    model = w8a8_vit
    if policy is not None:
        config = training.TrainConfig(epochs=2, lr=2e-4, seed=0)
        model, _ = training.run_stage(
            "mixed", "digits-vit", "digits", config, precision=policy, start=w8a8_vit
        )
    x, y = data.load("digits").test
    ref = training.predictions(model, x)
    got, report = simulated_logits(model, x, tmp_path, frontend)
    assert sum(op.kind == "matmul" for op in report.operators) == 4
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995
    acc_ref, acc_sim = (100 * (p.argmax(1) == y).mean() for p in (ref, got))
    assert abs(acc_sim - acc_ref) <= 0.5
