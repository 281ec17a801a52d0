"""What the compiler does with a region it matched but cannot lower, and with its own bugs.

A region the reader refuses with a ``CimError`` (a form the pattern table takes but the
codegen does not, here weights with a nonzero zero point) goes back to the CPU with that
reason, and the rest of the model still reaches the crossbars. A bug inside the compiler
is an ``InternalCompilerError`` naming the operators, and the command lines exit with
status 3 for it; ``tvm-cim inspect`` lists the operators with the error instead.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402
from tests.compiler.conftest import build_llvm, run_vm  # noqa: E402
from tests.compiler.models import _module, c, tensor  # noqa: E402
from tvm_cim.core.errors import InternalCompilerError  # noqa: E402

R = relax.op


def _two_layer_qdq(rng, second_zero_point: int):
    """Two QDQ dense layers; the second's weights have ``second_zero_point``."""
    w1 = rng.integers(-7, 8, (12, 16)).astype("int8")
    w2 = rng.integers(-7, 8, (10, 12)).astype("int8")

    def body(bb, x):
        h = bb.emit(R.quantize(x, c(np.float32(0.05)), c(np.int8(0)), out_dtype="int8"))
        for i, (w, zp) in enumerate(((w1, 0), (w2, second_zero_point))):
            x_dq = bb.emit(R.dequantize(h, c(np.float32(0.05)), c(np.int8(0))))
            scale = np.full(w.shape[0], 0.02, "float32")
            w_dq = bb.emit(R.dequantize(c(w), c(scale), c(np.full(w.shape[0], zp, "int8")), axis=0))
            y = bb.emit(R.matmul(x_dq, bb.emit(R.permute_dims(w_dq, [1, 0]))))
            if i == 0:
                h = bb.emit(R.quantize(y, c(np.float32(0.05)), c(np.int8(0)), out_dtype="int8"))
        return y

    return _module([tensor("x", (4, 16))], body)


def test_a_region_the_reader_refuses_runs_on_the_cpu_with_its_reason(rng):
    mod = _two_layer_qdq(rng, second_zero_point=3)
    plan = tvm_cim.plan_for_cim(mod, names=["fc1", "fc2"])
    assert plan.names == ["fc1"]
    assert list(plan.refused) == ["fc2"]
    assert "nonzero zero point" in plan.refused["fc2"]
    assert [(e["name"], e["reason"]) for e in plan.cpu] == [("fc2", plan.refused["fc2"])]

    x = rng.standard_normal((4, 16)).astype("float32")
    ex, report = tvm_cim.compile_for_cim(mod, names=["fc1", "fc2"])
    assert [op.name for op in report.operators] == ["fc1"]
    got, ref = run_vm(ex, x), run_vm(build_llvm(mod), x)
    # fc1 requantizes exactly in integers, llvm in float: at most one code step apart.
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_a_bug_while_lowering_names_the_operators(rng, monkeypatch):
    import tvm_cim.compiler.plan as plan_module

    def broken(region, arch, copies=None):
        raise IndexError("list index out of range")

    monkeypatch.setattr(plan_module, "lower_region", broken)
    plan = tvm_cim.plan_for_cim(_two_layer_qdq(rng, second_zero_point=0), names=["fc1", "fc2"])
    with pytest.raises(InternalCompilerError, match=r"while lowering fc1, fc2: IndexError"):
        plan.programs()


def test_a_bug_while_reading_raises_or_goes_to_the_cpu(rng, monkeypatch):
    import tvm_cim.compiler.plan as plan_module

    def broken(name, fn, images=None):
        raise KeyError("surprise")

    monkeypatch.setattr(plan_module, "read_region", broken)
    mod = _two_layer_qdq(rng, second_zero_point=0)
    with pytest.raises(InternalCompilerError, match=r"while reading fc1, fc2: KeyError"):
        tvm_cim.plan_for_cim(mod, names=["fc1", "fc2"])
    plan = tvm_cim.plan_for_cim(mod, names=["fc1", "fc2"], internal_errors="cpu")
    assert plan.names == []
    assert [e["name"] for e in plan.cpu] == ["fc1", "fc2"]
    assert all("internal compiler error while reading" in e["reason"] for e in plan.cpu)


def test_the_command_line_exits_3_for_an_internal_error(tmp_path, monkeypatch, capsys):
    from tvm_cim.cli.common import BUG_HINT, EXIT_UNEXPECTED, Cli, Command

    def handler(args):
        raise InternalCompilerError(ValueError("bad"), "lowering", ["conv1"])

    cli = Cli("tvm-cim", "test", (Command("go", "go", lambda p: None, handler),))
    assert cli.main(["go"]) == EXIT_UNEXPECTED
    err = capsys.readouterr().err
    expected = "tvm-cim: error: internal compiler error while lowering conv1: ValueError: bad"
    assert err == expected + BUG_HINT + "\n"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_are_refused_naming_the_input(rng, bad):
    from tvm_cim.core.errors import InputError

    ex, _ = tvm_cim.compile_for_cim(_two_layer_qdq(rng, second_zero_point=0))
    x = rng.standard_normal((4, 16)).astype("float32")
    x[1, 3] = bad
    with pytest.raises(InputError, match="input 'in0' holds NaN or infinite values"):
        run_vm(ex, x)
