"""Energy and batches: the compile report's figures equal the simulator's."""

import math

import pytest

from tests.compiler import models
from tests.compiler.conftest import run_vm
from tvm_cim import CimArch, compile_for_cim, cost_report
from tvm_cim.compiler import runtime

tvm = pytest.importorskip("tvm")

PRECISION = {"conv2d_0": {"w_bits": 4, "a_bits": 6}, "dense_2": {"w_bits": 6, "a_bits": 4}}


def energy_from_counts(stats, arch) -> float:
    return math.fsum(
        s.crossbar_writes * arch.write_energy_nj
        + s.mvm_executions * arch.mvm_energy_nj
        + s.adc_conversions * arch.adc_energy_nj
        + s.digital_ops * arch.digital_energy_nj
        for s in stats
    )


@pytest.mark.parametrize("crossbars", [1, 3])
def test_report_energy_equals_simulated_energy(rng, crossbars):
    # ISAAC's figures on small crossbars, so that the layers take several tiles.
    arch = CimArch.preset("isaac").replace(rows=32, cols=32, crossbars=crossbars, adc_bits=None)
    mod = models.float_cnn(rng, batch=1)
    calib = [rng.standard_normal((1, 3, 10, 10)).astype("float32")]
    ex, report = compile_for_cim(mod, arch=arch, calibration=calib, precision=PRECISION)
    run_vm(ex, calib[0])
    simulated = [runtime.last_stats()[p.name] for p in report.programs]
    total = math.fsum(s.energy_nj for s in simulated)
    assert total > 0
    assert total == pytest.approx(energy_from_counts(simulated, arch), rel=1e-12)
    assert report.total_energy_nj == pytest.approx(total, rel=1e-12)
    assert math.fsum(op.energy_nj for op in report.operators) == pytest.approx(total, rel=1e-12)
    assert report.to_dict()["total_energy_nj"] == report.total_energy_nj
    assert "energy" in report.table()
    cost = cost_report(mod, arch=arch, precision=PRECISION)
    assert cost.total_energy_nj == pytest.approx(total, rel=1e-12)


def test_no_energy_without_figures(rng):
    report = cost_report(models.float_cnn(rng, batch=1), arch="rram-4b")
    assert report.total_energy_nj is None
    assert {op.energy_nj for op in report.operators} == {None}
    assert "energy" not in report.table()


@pytest.mark.parametrize("batch", [1, 4])
def test_batch_figures_are_those_of_a_simulated_batch(rng, batch):
    arch = CimArch.preset("isaac").replace(rows=32, cols=32, crossbars=5, adc_bits=None)
    mod = models.float_cnn(rng, batch=batch)
    x = rng.standard_normal((batch, 3, 10, 10)).astype("float32")
    ex, report = compile_for_cim(mod, arch=arch, calibration=[x], precision=PRECISION)
    run_vm(ex, x)
    simulated = [runtime.last_stats()[p.name] for p in report.programs]
    figures = report.batch_figures(batch)
    latency_us = sum(s.latency_us for s in simulated)
    assert figures["batch"] == batch
    assert figures["latency_us"] == pytest.approx(latency_us, rel=1e-12)
    assert figures["throughput_per_s"] == pytest.approx(batch / latency_us * 1e6)
    assert figures["writes_per_item"] == sum(s.crossbar_writes for s in simulated) / batch
    energy = math.fsum(s.energy_nj for s in simulated)
    assert figures["energy_per_item_nj"] == pytest.approx(energy / batch, rel=1e-12)
