"""``make demo``: compile and simulate a built-in integer MLP on the rram-4b crossbars.

The network is a fixed, seeded two-layer perceptron shaped like a digits classifier
(64 inputs, 128 hidden units with ReLU, 10 outputs). Each layer is lowered with
``lower_matmul`` at W8A8 and at a mixed W4A4/W8A8 precision, run on the simulator,
checked bit for bit against numpy, and its latency printed beside the CIM-AQ formula.

    python -m tvm_cim.demo [--arch rram-4b|FILE] [--batch 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from tvm_cim.arch import CimArch
from tvm_cim.codegen import input_steps, lower_matmul, weight_slices
from tvm_cim.quant import Requantize, quant_range
from tvm_cim.sim import Simulator

LAYERS = (("fc1", 64, 128), ("fc2", 128, 10))
POLICIES = {"W8A8": ((8, 8), (8, 8)), "mixed": ((4, 4), (8, 4))}


def paper_latency_us(k: int, n: int, w_bits: int, a_bits: int, batch: int, arch: CimArch):
    """CIM-AQ's per-layer latency model (reference page), for comparison."""
    cols = n * weight_slices(w_bits, arch.cell_bits)
    rows = k
    if arch.mapping == "differential-column":
        cols *= 2
    elif arch.mapping == "offset":
        cols += 1
    else:
        rows *= 2
    writes = math.ceil(cols / arch.cols) * math.ceil(rows / arch.rows)
    execs = batch * writes * input_steps(a_bits, arch.dac_bits)
    return writes * arch.write_latency_us + execs * arch.mvm_latency_us


def run_policy(name, bits, arch, batch, sim, out_dir):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1 << bits[0][1], (batch, LAYERS[0][1]))
    rows = []
    for i, ((layer, k, n), (w_bits, a_bits)) in enumerate(zip(LAYERS, bits)):
        lo, hi = quant_range(w_bits, True)
        weight = rng.integers(lo, hi + 1, (k, n))
        last = i == len(LAYERS) - 1
        # hidden layers requantize to the next layer's unsigned activation width
        requant = None
        if not last:
            next_a = bits[i + 1][1]
            requant = Requantize(multiplier=1, shift=w_bits + a_bits, out_bits=next_a, relu=True)
        program = lower_matmul(
            weight, w_bits=w_bits, a_bits=a_bits, arch=arch, requant=requant, name=layer
        )
        if out_dir is not None:
            program.save(out_dir / f"{name}_{layer}.cimp")
        result = sim.run(program, {"x": x})
        y = result.outputs["y"].astype(np.int64)
        expected = x @ weight if requant is None else requant.apply(x @ weight)
        if not np.array_equal(y, expected):
            raise SystemExit(f"{name}/{layer}: simulator disagrees with numpy")
        st = result.stats
        paper = paper_latency_us(k, n, w_bits, a_bits, batch, arch)
        rows.append((layer, f"W{w_bits}A{a_bits}", len(program), st, paper))
        x = y
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile and simulate a built-in MLP")
    parser.add_argument("--arch", default="rram-4b", help="preset name or arch file")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="program files")
    args = parser.parse_args(argv)

    arch = CimArch.load(args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    sim = Simulator(arch)
    print(
        f"arch {arch.name}: {arch.rows}x{arch.cols}, {arch.cell_bits}-bit cells, "
        f"{arch.dac_bits}-bit DAC, {arch.mapping}, {arch.crossbars} crossbar(s); "
        f"backend {sim.backend}; batch {args.batch}\n"
    )
    header = (
        f"{'policy':<7} {'layer':<5} {'bits':<5} {'instrs':>6} {'writes':>6} "
        f"{'MVMs':>6} {'latency us':>11} {'paper us':>9}"
    )
    print(header)
    print("-" * len(header))
    totals = {}
    for name, bits in POLICIES.items():
        total = 0.0
        for layer, tag, n_instr, st, paper in run_policy(
            name, bits, arch, args.batch, sim, args.out
        ):
            print(
                f"{name:<7} {layer:<5} {tag:<5} {n_instr:>6} {st.crossbar_writes:>6} "
                f"{st.mvm_executions:>6} {st.latency_us:>11.1f} {paper:>9.1f}"
            )
            total += st.latency_us
        totals[name] = total
    print(f"\nall outputs bit-exact against numpy; programs written to {args.out}/")
    speedup = totals["W8A8"] / totals["mixed"]
    print(
        f"total latency: W8A8 {totals['W8A8']:.1f} us, mixed {totals['mixed']:.1f} us, "
        f"speedup {speedup:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
