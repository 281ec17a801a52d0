"""onnxruntime's ``quantize_static`` (QDQ) in its common settings, on trained CNNs.

Per-channel or per-tensor weights, shared or dedicated QDQ pairs, asymmetric uint8 or
symmetric int8 activations, on a residual CNN and on a MobileNet-like stack of
depthwise, pointwise and grouped convolutions: every Conv/Gemm on the crossbars, each at
the W8A8 the file states, the outputs equal to the file's float64 evaluation and as close
to onnxruntime (node by node) as TVM's llvm build is.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

from tests.conformance import suite  # noqa: E402

SETTINGS = [
    suite.OrtSettings(per_channel=True, dedicated_pairs=False, activation_symmetric=False),
    suite.OrtSettings(per_channel=False, dedicated_pairs=True, activation_symmetric=False),
    suite.OrtSettings(per_channel=True, dedicated_pairs=True, activation_symmetric=True),
    suite.OrtSettings(per_channel=False, dedicated_pairs=False, activation_symmetric=True),
]


@pytest.fixture(scope="module")
def float_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ort-float")
    return {name: suite.export_float(name, folder / f"{name}.onnx") for name in suite.FLOAT_MODELS}


@pytest.mark.parametrize("model", sorted(suite.FLOAT_MODELS))
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.tag)
def test_onnxruntime_qdq(float_files, model, settings, tmp_path):
    path = suite.quantize_with_onnxruntime(float_files[model], settings, tmp_path / "q.onnx")
    nodes = suite.crossbar_nodes(path)
    x, _ = suite.samples(48)
    result = suite.measure(model, "onnxruntime", path, x, widths=[(8, 8)] * len(nodes))
    assert result.compiled, result.error
    assert result.cpu == []
    assert result.offloaded == result.nodes == len(nodes) > 0
    assert result.widths_equal
    # The crossbars compute exactly what the file says (its float64 evaluation); onnxruntime
    # and llvm sum in float32, which moves a code now and then.
    assert result.exact_error < 1e-6
    assert result.rel_error <= result.llvm_rel_error + result.llvm_exact_error + 1e-6
    assert result.agreement == 1.0


def test_the_trained_models_are_worth_comparing():
    """The float models classify digits well: argmax agreement is not a coin toss."""
    import torch

    x, y = suite.samples(360)
    for name in suite.FLOAT_MODELS:
        with torch.no_grad():
            predicted = suite.trained(name)(torch.from_numpy(x)).argmax(1).numpy()
        assert np.mean(predicted == y) > 0.9, name
