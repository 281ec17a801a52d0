"""Zoo models through ``torch.export`` (``tvm_cim.frontend.load_torch``), batch norms and all.

Cost-only at their own input sizes: every ``Conv2d`` and ``Linear`` of the model reaches
the crossbars (batch norms folded into the convolution before them by the graph passes,
depthwise and grouped convolutions by their own mapping). A small trained model is then
compiled in full and compared with PyTorch itself.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402
from tests.conformance import suite  # noqa: E402
from tvm_cim.compiler.frontend import load_torch  # noqa: E402
from tvm_cim.learn import zoo  # noqa: E402


@pytest.mark.parametrize("name", ["digits-cnn", "mnist1d-cnn", "resnet20"])
def test_every_layer_of_a_zoo_model_reaches_the_crossbars(name):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    mod, names = load_torch(model, torch.zeros((1, *zoo.input_shape(name))))
    plan = tvm_cim.plan_for_cim(mod, names=names)
    layers = zoo.quantizable_layers(model)
    assert len(plan.operators) == len(layers), plan.cpu
    assert plan.cpu == []
    assert plan.cost_report().total_latency_us > 0


def test_a_trained_model_through_torch_export_matches_pytorch():
    model = suite.trained("residual")
    x, _ = suite.samples(64)
    mod, names = load_torch(model, torch.from_numpy(x[: suite.BATCH]))
    calibration = [x[i : i + suite.BATCH] for i in range(0, 32, suite.BATCH)]
    ex, report = tvm_cim.compile_for_cim(mod, calibration=calibration, names=names)
    assert len(report.operators) == 4 and report.cpu == []
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def run(batch):
        out = vm["main"](tvm.runtime.tensor(batch))
        return (out[0] if hasattr(out, "__len__") and not hasattr(out, "numpy") else out).numpy()

    got = suite.run_batches(run, x)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    # W8A8 from calibration: argmax as PyTorch's, logits within a few percent.
    assert np.mean(got.argmax(1) == expected.argmax(1)) >= 0.98
    assert np.linalg.norm(got - expected) <= 0.05 * np.linalg.norm(expected)
