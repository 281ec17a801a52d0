"""Simulator throughput against numpy's float32 GEMM, measured in one run.

    python bench/sim_throughput.py [--batch 4096] [--repeats 5]

Prints cell-MACs per second (every DAC-chunk x cell product the crossbars perform)
for each backend on one 256x256 crossbar at W8A8 with 4-bit cells, lossless and with an
8-bit ADC, as a ratio of numpy float32 GEMM multiply-accumulates per second on this
machine; the instruction rate of both backends on a stream of small instructions
(64x64 crossbars, one input vector); and the peak memory of the largest run.
Targets: cython >= 0.5x GEMM lossless, >= 0.25x with adc_bits=8, and faster than the
numpy reference on the small-instruction stream.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from tvm_cim import CimArch
from tvm_cim.codegen import lower_matmul
from tvm_cim.sim import Simulator, available_backends


def best_time(fn, repeats: int) -> float:
    fn()  # warm up caches and lazy setup
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_macs_per_s(batch: int, repeats: int) -> float:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch, 256), dtype=np.float32)
    b = rng.standard_normal((256, 256), dtype=np.float32)
    out = np.empty((batch, 256), dtype=np.float32)
    seconds = best_time(lambda: np.matmul(a, b, out=out), repeats)
    return batch * 256 * 256 / seconds


def one_crossbar_program(adc_bits: int | None):
    """W8A8 on 4-bit cells, differential column: 64 outputs fill 256 columns."""
    arch = CimArch.preset("rram-4b").replace(adc_bits=adc_bits)
    rng = np.random.default_rng(1)
    weight = rng.integers(-128, 128, (256, 64))
    return lower_matmul(weight, w_bits=8, a_bits=8, arch=arch)


def crossbar_rates(batch: int, repeats: int, gemm: float) -> list[tuple]:
    rows = []
    x = np.random.default_rng(2).integers(0, 256, (batch, 256))
    for adc_bits in (None, 8):
        program = one_crossbar_program(adc_bits)
        for backend in available_backends():
            sim = Simulator(backend=backend)
            prepared = sim.prepare(program)
            macs = sim.run(prepared, {"x": x}).stats.cell_macs
            seconds = best_time(lambda s=sim, p=prepared: s.run(p, {"x": x}), repeats)
            rate = macs / seconds
            label = "lossless" if adc_bits is None else f"adc_bits={adc_bits}"
            rows.append((backend, label, rate, rate / gemm))
    return rows


def small_stream_rates(repeats: int) -> dict[str, float]:
    arch = CimArch(rows=64, cols=64)
    rng = np.random.default_rng(3)
    program = lower_matmul(rng.integers(-128, 128, (512, 128)), w_bits=8, a_bits=8, arch=arch)
    x = rng.integers(0, 256, (1, 512))
    rates = {}
    for backend in available_backends():
        sim = Simulator(backend=backend)
        prepared = sim.prepare(program)
        seconds = best_time(lambda s=sim, p=prepared: s.run(p, {"x": x}), repeats)
        rates[backend] = len(program) / seconds
    return rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    gemm = gemm_macs_per_s(args.batch, args.repeats)
    print(f"numpy float32 GEMM: {gemm / 1e9:.1f} G MAC/s ({args.batch}x256 @ 256x256)")
    print(f"\ncrossbar simulation, 256x256, W8A8, 4-bit cells, batch {args.batch}")
    print(f"{'backend':<8} {'ADC':<11} {'G cell-MAC/s':>13} {'x GEMM':>8}  target")
    targets = {"lossless": 0.5, "adc_bits=8": 0.25}
    for backend, label, rate, ratio in crossbar_rates(args.batch, args.repeats, gemm):
        target = f">= {targets[label]}" if backend == "cython" else ""
        print(f"{backend:<8} {label:<11} {rate / 1e9:>13.2f} {ratio:>8.2f}  {target}")

    rates = small_stream_rates(args.repeats)
    print("\nsmall-instruction stream, 64x64 crossbars, batch 1")
    for backend, rate in rates.items():
        print(f"{backend:<8} {rate / 1e6:>8.3f} M instructions/s")
    if "cython" in rates:
        print(f"cython / numpy: {rates['cython'] / rates['numpy']:.1f}x  (target > 1)")

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this benchmark: {peak_mib:.0f} MiB (target < 2048)")


if __name__ == "__main__":
    main()
