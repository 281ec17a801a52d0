"""One definition of a scale: QAT's torch tensors and the compiler's numpy arrays get the
same float32 weight and activation scales, edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from tvm_cim.core.quant import activation_scale, weight_scales  # noqa: E402
from tvm_cim.learn import qat  # noqa: E402

# Magnitudes from the edges of float32 (zero, subnormal, tiny, huge) and ordinary ones.
ABSMAX = [0.0, 1e-45, 1e-38, 1e-8, 0.3, 1.0, 6.0, 3.4e38, float("nan"), -1.0]


def _weights() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 3, 2, 2)).astype(np.float32)
    w[1] = 0.0  # an all-zero output channel
    w[2] = np.float32(1e-45)  # subnormal: the scale underflows to 0
    w[3] *= np.float32(1e-30)
    w[4] = -w[4]  # negative weights: the magnitude counts
    w[5, 0, 0, 0] = np.float32(3.0e38)
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_scales_are_identical_in_torch_and_numpy(bits):
    w = _weights()
    ref = weight_scales(w, bits, axis=0)
    got = weight_scales(torch.from_numpy(w), bits, axis=0)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), ref)
    np.testing.assert_array_equal(qat.weight_fake_quantize(torch.from_numpy(w), bits)[1], ref)
    # the compiler's layout: output channels last
    np.testing.assert_array_equal(weight_scales(np.moveaxis(w, 0, -1), bits), ref)
    assert ref.dtype == np.float32 and ref[1] == 1.0
    # the smallest subnormal divided by qmax >= 3 underflows to 0: unit scale again
    assert ref[2] == (np.float32(1e-45) if bits == 2 else 1.0)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [False, True])
def test_activation_scales_are_identical_in_torch_and_numpy(bits, signed):
    for absmax in ABSMAX:
        ref = activation_scale(absmax, bits, signed)
        assert isinstance(ref, float)
        got = activation_scale(torch.tensor(absmax), bits, signed)
        assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
        assert np.float32(ref) == got.numpy(), (absmax, bits, signed)
        assert activation_scale(np.float32(absmax), bits, signed) == ref


def test_scale_edge_cases():
    # never a non-zero value: unit scale, so a bias still fits the int32 accumulator
    assert activation_scale(0.0, 8, False) == 1.0
    assert activation_scale(float("nan"), 8, True) == 1.0
    assert float(activation_scale(torch.tensor(0.0), 8, False)) == 1.0
    # signed 1-bit codes are -1..0: -absmax is code -1
    assert activation_scale(0.5, 1, True) == 0.5
    assert activation_scale(0.5, 1, False) == 0.5
    assert activation_scale(2.54, 8, True) == float(np.float32(2.54) / np.float32(127))
    assert weight_scales(np.zeros((3, 2)), 4).tolist() == [1.0, 1.0]


def test_qat_layers_use_the_shared_activation_scale():
    layer = qat.prepare(nn.Sequential(nn.Linear(4, 3)), {"default": {"w_bits": 4, "a_bits": 3}})[0]
    for absmax in ABSMAX[:-2]:
        layer.act_absmax.fill_(absmax)
        for act_min in (0.0, -1.0):
            layer.act_min.fill_(act_min)
            ref = activation_scale(absmax, 3, act_min < 0)
            assert float(layer.act_scale()) == ref
