"""Accuracy of the zoo's trainable models through the training stages, and the QAT model
compiled for cim and run on the simulator against PyTorch's fake quantization."""

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
    torch.set_num_threads(1)  # small models: threads only add waiting on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits_stages():
    config = training.TrainConfig(epochs=30, lr=3e-3, batch_size=32, seed=0)
    fp32, r_fp32 = training.run_stage("fp32", "digits-cnn", "digits", config)
    qat_config = training.TrainConfig(epochs=8, lr=2e-4, batch_size=32, seed=0)
    w8a8, r_w8a8 = training.run_stage("w8a8", "digits-cnn", "digits", qat_config, start=fp32)
    return fp32, r_fp32, w8a8, r_w8a8


def test_digits_cnn_fp32_and_w8a8_accuracy(digits_stages):
    _, r_fp32, _, r_w8a8 = digits_stages
    assert r_fp32.test_accuracy >= 97.0
    assert r_w8a8.test_accuracy >= r_fp32.test_accuracy - 0.5


def test_mnist1d_cnn_fp32_accuracy():
    config = training.TrainConfig(epochs=20, lr=3e-3, batch_size=64, seed=0)
    _, result = training.run_stage("fp32", "mnist1d-cnn", "mnist1d", config)
    assert result.test_accuracy >= 90.0


@pytest.mark.parametrize(
    "policy",
    [None, {"conv1": [8, 8], "conv2": [2, 4], "fc1": [4, 3], "fc2": [3, 2]}],
    ids=["W8A8", "mixed-2to4"],
)
@pytest.mark.parametrize("frontend", ["onnx", "torch.export"])
def test_simulated_accuracy_matches_pytorch(digits_stages, tmp_path, policy, frontend):
    _, _, w8a8, _ = digits_stages
    model = w8a8
    if policy is not None:
        config = training.TrainConfig(epochs=5, lr=2e-4, batch_size=32, seed=0)
        model, _ = training.run_stage(
            "mixed", "digits-cnn", "digits", config, precision=policy, start=w8a8
        )
    x, y = data.load("digits").test
    ref = training.predictions(model, x)
    got, _ = simulated_logits(model, x, tmp_path, frontend)
    acc_ref = 100 * (ref.argmax(1) == y).mean()
    acc_sim = 100 * (got.argmax(1) == y).mean()
    assert abs(acc_sim - acc_ref) <= 0.1
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.995
