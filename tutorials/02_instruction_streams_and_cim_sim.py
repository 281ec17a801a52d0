"""
Instruction streams and ``cim-sim``
===================================

Below the TVM target sits a crossbar instruction set and an instruction-level
simulator. This tutorial lowers one layer to a program, reads its assembly, runs it with
the ``cim-sim`` command line and reads the statistics, which equal CIM-AQ's latency
formula on the ``rram-4b`` preset.
"""

######################################################################
# Lower a layer
# -------------
# ``lower_matmul`` slices 4-bit signed weights over 4-bit cells (differential columns:
# one column for the positive part, one for the negative), drives a 6-bit input one bit
# per step and tiles the matrix over 256x256 crossbars.

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tvm_cim import CimArch
from tvm_cim.codegen import lower_matmul
from tvm_cim.sim import Simulator

arch = CimArch.preset("rram-4b")
rng = np.random.default_rng(0)
w = rng.integers(-8, 8, (300, 40))  # K=300 inputs: two crossbar tiles of rows
program = lower_matmul(w, w_bits=4, a_bits=6, arch=arch, batch=4)
workdir = Path(tempfile.mkdtemp())
program.save(workdir / "layer.cimp")

######################################################################
# Read the assembly
# -----------------
# ``prog`` writes a crossbar image, ``mvm`` drives one input bit-slice through it,
# ``shadd`` shifts and adds partial sums, ``store`` writes the result.


def cim_sim(*args):
    cmd = [sys.executable, "-m", "tvm_cim.cli.sim", *map(str, args)]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


print("\n".join(cim_sim("disasm", workdir / "layer.cimp").splitlines()[:24]))

######################################################################
# Run it
# ------
# The simulator computes the exact integer product. From Python:

x = rng.integers(0, 64, (4, 300))
result = Simulator(arch).run(program, {"x": x})
assert (result.outputs["y"] == x @ w).all()
print("bit-exact:", True, "| latency", result.stats.latency_us, "us")

######################################################################
# and from the command line, with inputs and outputs as ``.npy`` files:

np.save(workdir / "x.npy", x)
print(cim_sim("run", workdir / "layer.cimp", "--input", f"x={workdir / 'x.npy'}",
              "--output-dir", workdir / "out"))  # fmt: skip
assert (np.load(workdir / "out" / "y.npy") == x @ w).all()

######################################################################
# Statistics and the paper's formula
# ----------------------------------
# ``stats`` gives the static estimate without running; it equals the simulated figures.
# CIM-AQ's model: ``writes * 56 us + batch * writes * ceil(a / dac) * 1.4 us``.

print(cim_sim("stats", workdir / "layer.cimp", "--batch", 4))
writes = 2 * 1  # 300 rows -> 2 row tiles; 40 outputs * 1 slice * 2 columns -> 1 column tile
print("formula:", writes * 56 + 4 * writes * 6 * 1.4, "us")

######################################################################
# ``tvm-cim compile model.onnx --dump-programs DIR`` writes the program of every region
# of a compiled model, ready for the same commands.
