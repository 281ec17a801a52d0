"""The cim target end to end: partitioning, numerics against llvm, latency, errors."""

import numpy as np
import pytest

from tests.compiler import models
from tests.compiler.conftest import build_llvm, run_vm
from tvm_cim import CimArch, CimError, compile_for_cim, partition_for_cim
from tvm_cim.relay_passes.extract import read_region
from tvm_cim.relay_passes.partition import offloaded_functions

tvm = pytest.importorskip("tvm")


def offloaded_ops(mod):
    part = partition_for_cim(mod)
    return [
        (op.name, op.kind)
        for gv, fn in offloaded_functions(part)
        for op in read_region(gv.name_hint, fn).ops
    ]


def paper_latency_us(op, arch):
    """CIM-AQ's per-layer formula."""
    k, n = op.weight_shape
    slices = -(-op.w_bits // arch.cell_bits)
    cols, rows = n * slices * 2, k  # differential column
    writes = -(-cols // arch.cols) * -(-rows // arch.rows)
    invocations = op.out_shape[2] * op.out_shape[3] if op.kind == "conv2d" else 1
    return writes * 56 + invocations * writes * op.a_bits * 1.4


# ------------------------------------------------------------------ partitioning


def test_mlp_partition_merges_dense_layers(rng):
    mod = models.float_mlp(rng)
    part = partition_for_cim(mod)
    funcs = offloaded_functions(part)
    assert len(funcs) == 1  # adjacent composites merge into one region
    assert offloaded_ops(mod) == [("dense_0", "dense"), ("dense_1", "dense")]
    assert "cim" in part.script()


def test_residual_add_stays_on_cpu(rng):
    part = partition_for_cim(models.residual_block(rng))
    main = part["main"].script()
    assert "R.add" in main and "R.nn.relu" in main  # the skip connection runs on llvm
    assert [k for _, k in offloaded_ops(models.residual_block(rng))] == ["conv2d", "conv2d"]


def test_unsupported_operators_stay_on_cpu(rng):
    mod = models.mixed_unsupported(rng)
    assert offloaded_ops(mod) == [("dense_1", "dense")]
    main = partition_for_cim(mod)["main"].script()
    assert 'data_layout="NHWC"' in main  # the NHWC convolution on llvm
    assert main.count("R.matmul") == 1  # the activation-by-activation matmul on llvm


def test_symbols_unique_per_build(rng):
    mod = models.float_mlp(rng)
    a = {str(fn.attrs["global_symbol"]) for _, fn in offloaded_functions(partition_for_cim(mod))}
    b = {str(fn.attrs["global_symbol"]) for _, fn in offloaded_functions(partition_for_cim(mod))}
    assert a.isdisjoint(b)


# ------------------------------------------------------------------ integer graphs: bit-exact


@pytest.mark.parametrize("zero_point,x_dtype", [(0, "uint8"), (7, "uint8"), (0, "int8")])
@pytest.mark.parametrize("arch", ["rram-4b", "rram-2b"])
def test_integer_matmul_bit_exact(rng, zero_point, x_dtype, arch):
    mod = models.int_matmul(rng, zero_point=zero_point, x_dtype=x_dtype)
    ex, report = compile_for_cim(mod, arch=arch)
    assert [op.kind for op in report.operators] == ["dense"]
    lo, hi = (0, 256) if x_dtype == "uint8" else (-128, 128)
    x = rng.integers(lo, hi, (3, 40)).astype(x_dtype)
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(build_llvm(mod), x))


@pytest.mark.parametrize(
    "stride,padding,dilation",
    [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, (1, 0, 2, 1), 1), (3, 1, 2)],
)
def test_integer_conv_bit_exact(rng, stride, padding, dilation):
    mod = models.int_conv(rng, stride=stride, padding=padding, dilation=dilation)
    ex, report = compile_for_cim(mod, arch=CimArch(rows=16, cols=16))
    assert [op.kind for op in report.operators] == ["conv2d"]
    x = rng.integers(-128, 128, (2, 3, 7, 7)).astype("int8")
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(build_llvm(mod), x))


# ------------------------------------------------------------------ quantized and float graphs


def test_qdq_mlp_within_one_step_and_same_argmax(rng):
    mod = models.qdq_mlp(rng, batch=1000, quantize_output=True)
    ex, report = compile_for_cim(mod)
    assert len(report.operators) == 2
    assert len(report.programs) == 1  # both layers, and the requantization between, in one
    x = rng.standard_normal((1000, 16)).astype("float32") * 2
    got, ref = run_vm(ex, x), run_vm(build_llvm(mod), x)
    assert got.dtype == np.int8
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # one quantization step
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.999


def test_qdq_float_output_matches_llvm(rng):
    mod = models.qdq_mlp(rng, batch=200)
    ex, _ = compile_for_cim(mod)
    x = rng.standard_normal((200, 16)).astype("float32") * 2
    got, ref = run_vm(ex, x), run_vm(build_llvm(mod), x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_cim_target_tag_registered():
    target = tvm.target.Target("cim")
    assert str(target.kind.name) == "llvm"
    assert {"cim", "cpu"} <= {str(k) for k in target.keys}


def test_float_cnn_close_to_float_with_calibration(rng):
    mod = models.float_cnn(rng)
    calib = [rng.standard_normal((2, 3, 10, 10)).astype("float32") for _ in range(8)]
    ex, report = compile_for_cim(mod, calibration=calib)
    assert [op.kind for op in report.operators] == ["conv2d", "conv2d", "dense"]
    x = calib[0]
    got, ref = run_vm(ex, x), run_vm(build_llvm(mod), x)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_report_latency_is_the_paper_formula(rng):
    arch = CimArch.preset("rram-4b")
    mod = models.float_cnn(rng, batch=1)
    calib = [rng.standard_normal((1, 3, 10, 10)).astype("float32")]
    _, report = compile_for_cim(
        mod, arch=arch, calibration=calib, precision={"default": {"w_bits": 8, "a_bits": 8}}
    )
    for op in report.operators:
        assert op.latency_us == pytest.approx(paper_latency_us(op, arch), abs=1e-6)
    assert report.total_latency_us == pytest.approx(report.sequential_latency_us)


def test_mixed_precision_changes_latency(rng):
    mod = models.float_mlp(rng)
    calib = [rng.standard_normal((4, 32)).astype("float32")]
    _, w8 = compile_for_cim(mod, calibration=calib)
    _, mixed = compile_for_cim(
        mod, calibration=calib, precision={"dense_0": {"w_bits": 4, "a_bits": 4}}
    )
    assert mixed.operators[0].a_bits == 4 and mixed.operators[1].a_bits == 8
    assert mixed.total_latency_us < w8.total_latency_us


def test_native_tvm_compile_with_cim_pipeline(rng):
    mod = models.int_matmul(rng)
    ex = tvm.compile(mod, target="cim", relax_pipeline="cim")
    x = rng.integers(0, 256, (3, 40)).astype("uint8")
    np.testing.assert_array_equal(run_vm(ex, x), run_vm(build_llvm(mod), x))


# ------------------------------------------------------------------ bad input


def test_unknown_operator_in_precision(rng):
    with pytest.raises(CimError, match="'nope' is not an offloaded operator"):
        partition_for_cim(models.float_mlp(rng), precision={"nope": {"w_bits": 4, "a_bits": 4}})


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(rng, bits):
    with pytest.raises(CimError, match="dense_0"):
        partition_for_cim(
            models.float_mlp(rng), precision={"dense_0": {"w_bits": bits, "a_bits": 8}}
        )


def test_wrong_policy_length(rng):
    with pytest.raises(CimError, match="3 entries for 2 offloaded operators"):
        partition_for_cim(models.float_mlp(rng), precision=np.full((3, 2), 8))


def test_float_model_without_calibration(rng):
    with pytest.raises(CimError, match="dense_0: a float operator needs calibration"):
        compile_for_cim(models.float_mlp(rng))


def test_dynamic_shapes_rejected():
    from tvm import relax, tirx

    n = tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType((n, 4), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(np.ones((4, 2), "float32"))))
        bb.emit_func_output(y)
    with pytest.raises(CimError, match="dynamic shape"):
        partition_for_cim(bb.get())


def test_zero_row_arch_rejected():
    from tvm_cim import ArchError

    with pytest.raises(ArchError, match="rows"):
        CimArch(rows=0)


def test_relax_ext_cim_codegen_through_run_codegen(rng):
    from tvm import relax

    mod = models.int_matmul(rng, zero_point=3)
    lowered = relax.transform.RunCodegen()(partition_for_cim(mod))
    assert "call_dps_packed" in lowered["main"].script()
    x = rng.integers(0, 256, (3, 40)).astype("uint8")
    got = run_vm(tvm.compile(lowered, target="llvm"), x)
    np.testing.assert_array_equal(got, run_vm(build_llvm(mod), x))


@pytest.mark.parametrize("mapping", ["differential-column", "offset", "differential-row"])
@pytest.mark.parametrize("crossbars", [1, 3])
def test_cost_only_report_equals_full_compile(rng, mapping, crossbars):
    from tvm_cim import cost_report

    arch = CimArch(rows=32, cols=32, mapping=mapping, crossbars=crossbars)
    mod = models.float_cnn(rng)
    calib = [rng.standard_normal((2, 3, 10, 10)).astype("float32")]
    precision = {"conv2d_0": {"w_bits": 4, "a_bits": 6}}
    _, full = compile_for_cim(mod, arch=arch, calibration=calib, precision=precision)
    cost = cost_report(mod, arch=arch, precision=precision)
    assert [op.to_dict() for op in cost.operators] == [op.to_dict() for op in full.operators]
    assert cost.total_latency_us == pytest.approx(full.total_latency_us)
    assert all(
        img.cells.strides == (0, 0)
        for p in cost.programs
        for img in p.images
        if not img.differential_rows
    )


@pytest.mark.parametrize(
    "make,shape",
    [
        (models.float_mlp, [(4, 32)]),
        (models.residual_block, [(2, 4, 6, 6)]),
        (models.mixed_unsupported, [(2, 4, 4, 4), (8, 3)]),
    ],
)
def test_float_models_close_to_llvm(rng, make, shape):
    mod = make(rng)
    samples = [tuple(rng.standard_normal(s).astype("float32") for s in shape) for _ in range(4)]
    ex, report = compile_for_cim(mod, calibration=samples)
    assert report.operators
    got, ref = run_vm(ex, *samples[0]), run_vm(build_llvm(mod), *samples[0])
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
