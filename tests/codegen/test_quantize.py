"""One operator record from the graph reader to the codegen, completed by quantization
(numpy only: no TVM)."""

import numpy as np
import pytest

from tvm_cim import CimArch, CimError
from tvm_cim.codegen.layers import CimOp, Codes, ConvGeometry, Region
from tvm_cim.codegen.mapping import is_placeholder
from tvm_cim.codegen.quantize import code_bits, quantize_op, quantize_region
from tvm_cim.codegen.region import lower_region
from tvm_cim.core.precision import Bits
from tvm_cim.core.quant import weight_qmax
from tvm_cim.sim import im2col_params, isa


def float_dense(rng, k=6, n=4) -> CimOp:
    weight = rng.standard_normal((k, n)).astype(np.float32)
    return CimOp("fc", "dense", ("param", 0), weight, in_shape=(2, k), out_shape=(2, n))


def test_float_operator_quantized_in_place_of_its_graph_fields():
    rng = np.random.default_rng(0)
    op = float_dense(rng)
    assert op.is_float and op.input is None and op.w_bits is None
    q = quantize_op(op, Bits(4, 3), {"fc": (-1.0, 2.0)})
    assert not q.is_float and q.w_bits == 4 and q.a_bits == 3
    assert q.input.signed and q.input.scale == pytest.approx(2.0 / 3)
    assert np.abs(q.weight).max() <= weight_qmax(4)
    assert (q.name, q.kind, q.source, q.in_shape, q.out_shape) == (
        op.name,
        op.kind,
        op.source,
        op.in_shape,
        op.out_shape,
    )
    assert op.is_float  # the graph's record stays as read


def test_graph_codes_keep_their_width_and_zero_point():
    weight = np.array([[3, -2], [1, 0]], np.int64)
    op = CimOp("mm", "dense", ("param", 0), weight, input=Codes(8, False, None, 5))
    q = quantize_op(op, None, {})
    assert q.w_bits == code_bits(weight) == 3 and q.input == op.input
    np.testing.assert_array_equal(q.int_bias, -5 * weight.sum(axis=0))
    with pytest.raises(CimError, match="mm: its weight codes need 3 bits"):
        quantize_op(op, Bits(2, 8), {})


def test_cost_only_uses_a_placeholder_weight():
    op = float_dense(np.random.default_rng(1))
    q = quantize_op(op, None, None)
    assert is_placeholder(q.weight) and q.w_bits == 8 and q.input.scale == 1.0


def test_float_operator_without_calibration_names_it():
    with pytest.raises(CimError, match="fc: a float operator needs calibration"):
        quantize_op(float_dense(np.random.default_rng(2)), None, {})


def test_region_is_lowered_only_in_integer_form():
    rng = np.random.default_rng(3)
    region = Region("r", [((2, 6), "float32")], [float_dense(rng)], [0])
    with pytest.raises(CimError, match="fc: not in integer form"):
        lower_region(region, CimArch())
    program = lower_region(quantize_region(region, {"fc": None}, {"fc": (0.0, 1.0)}), CimArch())
    assert program.attrs["operators"][0]["name"] == "fc"


def test_conv_geometry_is_the_im2col_params():
    g = ConvGeometry(3, 7, 9, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2))
    params = im2col_params(7, 9, 3, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2))
    np.testing.assert_array_equal(g.params(), params)
    fields = dict(zip(isa.IM2COL_PARAMS, params[0]))
    assert (g.out_height, g.out_width) == (fields["OH"], fields["OW"]) == (4, 8)
