"""The compile plan: one partition, regions read once, lowered at several precisions; the
``relax.ext.cim`` codegen at the precision the partition recorded; CPU reasons from the
pattern checks."""

import json

import numpy as np
import pytest

from tests.compiler import models
from tests.compiler.conftest import build_llvm, run_vm
from tvm_cim import CimArch, CimError, compile_for_cim, cost_report, partition_for_cim
from tvm_cim.compiler.plan import ARCH_ATTR, BITS_ATTR, plan_for_cim
from tvm_cim.core.precision import Bits
from tvm_cim.relay_passes.partition import offloaded_functions

tvm = pytest.importorskip("tvm")
relax = tvm.relax


def test_plan_holds_the_regions_as_read_and_the_resolved_bits(rng):
    plan = plan_for_cim(models.float_cnn(rng), precision={"conv2d_0": [4, 6]})
    assert plan.names == ["conv2d_0", "conv2d_1", "dense_2"]
    assert [gv for gv, _ in plan.regions] == [gv for gv, _ in offloaded_functions(plan.module)]
    assert plan.bits == {"conv2d_0": Bits(4, 6), "conv2d_1": None, "dense_2": None}
    assert all(op.is_float and op.input is None and op.w_bits is None for op in plan.operators)


@pytest.mark.parametrize("precision", [None, {"default": [3, 5]}, {"dense_1": [2, 7]}])
def test_lowering_at_another_precision_equals_a_fresh_cost_report(rng, precision):
    mod = models.float_mlp(rng)
    arch = CimArch(rows=16, cols=16, crossbars=2)
    plan = plan_for_cim(mod, arch=arch)
    again = plan.cost_report(plan.resolve(precision))
    fresh = cost_report(mod, arch=arch, precision=precision)
    assert [op.to_dict() for op in again.operators] == [op.to_dict() for op in fresh.operators]
    assert again.total_latency_us == fresh.total_latency_us
    assert again.cpu == fresh.cpu


def test_plan_lower_matches_compile_for_cim(rng):
    mod = models.float_mlp(rng)
    calib = [rng.standard_normal((4, 32)).astype("float32") for _ in range(3)]
    lowered, report = plan_for_cim(mod).lower(calib)
    ex, expected = compile_for_cim(mod, calibration=calib)
    assert [op.to_dict() for op in report.operators] == [op.to_dict() for op in expected.operators]
    x = calib[1]
    np.testing.assert_array_equal(run_vm(tvm.compile(lowered, target="llvm"), x), run_vm(ex, x))


def test_partition_records_bits_and_arch_on_each_function(rng):
    part = partition_for_cim(models.float_mlp(rng), arch="rram-2b", precision={"dense_0": [4, 4]})
    ((_, fn),) = offloaded_functions(part)
    assert json.loads(str(fn.attrs[BITS_ATTR])) == {"dense_0": [4, 4], "dense_1": None}
    assert CimArch.from_dict(json.loads(str(fn.attrs[ARCH_ATTR]))) == CimArch.load("rram-2b")


def test_relax_ext_cim_lowers_at_the_recorded_precision(rng):
    mod = models.qdq_mlp(rng, batch=50)
    precision = {"default": {"w_bits": 8, "a_bits": 5}}
    lowered = relax.transform.RunCodegen()(partition_for_cim(mod, precision=precision))
    x = rng.standard_normal((50, 16)).astype("float32") * 2
    got = run_vm(tvm.compile(lowered, target="llvm"), x)
    ex, report = compile_for_cim(mod, precision=precision)
    assert [op.a_bits for op in report.operators] == [5, 5]
    np.testing.assert_array_equal(got, run_vm(ex, x))
    assert not np.array_equal(got, run_vm(compile_for_cim(mod)[0], x))  # not the default bits


def test_relax_ext_cim_float_model_needs_calibration(rng):
    part = partition_for_cim(models.float_mlp(rng))
    with pytest.raises(CimError, match="dense_0: a float operator needs calibration"):
        relax.transform.RunCodegen()(part)


def test_cim_pipeline_takes_the_precision(rng):
    mod = models.qdq_mlp(rng, batch=20)
    precision = {"default": [8, 4]}
    pipeline = relax.get_pipeline("cim", precision=precision)
    ex = tvm.compile(mod, target="cim", relax_pipeline=pipeline)
    x = rng.standard_normal((20, 16)).astype("float32")
    expected = run_vm(compile_for_cim(mod, precision=precision)[0], x)
    np.testing.assert_array_equal(run_vm(ex, x), expected)


# ------------------------------------------------------------------ CPU reasons


def test_cpu_reasons_come_from_the_pattern_checks(rng):
    plan = plan_for_cim(models.mixed_unsupported(rng))
    assert plan.names == ["dense_1"]
    reasons = {entry["name"]: entry["reason"] for entry in plan.cpu}
    assert reasons == {
        "conv2d_0": "layout NHWC/HWIO is not NCHW/OIHW",
        "dense_2": "dense_2: an activation-activation matmul reading another crossbar "
        "operator's result in the same region is not mapped",
    }


def test_oversized_weight_stays_on_cpu_with_its_reason(rng):
    from tvm_cim.sim.isa import MAX_COLUMNS

    k = MAX_COLUMNS + 1
    x = relax.Var("x", relax.TensorType((1, k), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            w = relax.const(np.zeros((k, 2), "float32"))
            y = bb.emit_output(relax.op.matmul(x, w))
        bb.emit_func_output(y)
    plan = plan_for_cim(bb.get())
    assert plan.names == []
    assert plan.cpu[0]["reason"] == f"weight matrix {k}x2 exceeds {MAX_COLUMNS} rows or columns"


def _tied_layers(rng, between):
    """Three dense layers sharing one weight; ``between`` is the op between them."""
    from tests.compiler.models import _module, c, tensor

    w = rng.standard_normal((16, 16)).astype("float32") / 4

    def body(bb, x):
        h = x
        for _ in range(2):
            h = bb.emit(between(bb.emit(relax.op.matmul(h, c(w)))))
        return relax.op.matmul(h, c(w))

    return _module([tensor("x", (2, 16))], body)


@pytest.mark.parametrize("between", [relax.op.sigmoid, relax.op.nn.relu], ids=["cpu", "merged"])
def test_layers_with_equal_weights_stay_separate_operators(rng, between):
    """Fusion shares one function among equal matches; each layer keeps its own name,
    precision and report row all the same, whether CPU operators separate them (sigmoid)
    or they merge into one region (ReLU)."""
    mod = _tied_layers(rng, between)
    names = ["a", "b", "c"]
    precision = {"b": {"w_bits": 4, "a_bits": 3}, "default": {"w_bits": 8, "a_bits": 8}}
    plan = plan_for_cim(mod, names=names, precision=precision)
    assert plan.names == names
    report = plan.cost_report()
    assert [(op.name, op.w_bits, op.a_bits) for op in report.operators] == [
        ("a", 8, 8),
        ("b", 4, 3),
        ("c", 8, 8),
    ]
    x = rng.standard_normal((2, 16)).astype("float32")
    calibration = [rng.standard_normal((2, 16)).astype("float32") for _ in range(4)]
    ex, report = compile_for_cim(mod, names=names, calibration=calibration)  # W8A8
    assert [op.name for op in report.operators] == names
    got, ref = run_vm(ex, x), run_vm(build_llvm(mod), x)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
