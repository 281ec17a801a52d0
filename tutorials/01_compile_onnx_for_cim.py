"""
Compile an ONNX model for the ``cim`` target
============================================

tvm-cim is a TVM "bring your own codegen" (BYOC) backend. This tutorial walks its four
steps on a small convolutional network exported to ONNX:

1. the **patterns** that say which Relax subgraphs the crossbars run,
2. **partitioning** the graph into ``cim`` functions and CPU code,
3. **codegen**: one crossbar program per partitioned region,
4. **running** the result in the Relax VM, where crossbar regions execute on the
   bit-exact simulator, and comparing with a plain ``llvm`` build.
"""

######################################################################
# A model to compile
# ------------------
# ``digits-cnn`` from the model zoo (random weights are enough here), exported to ONNX
# with its layers named by module path. ``load_onnx`` imports it into Relax and returns
# the ONNX node names of the operators the crossbars may run.

import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

import tvm_cim
from tvm_cim.compiler.frontend import load_onnx
from tvm_cim.learn import zoo as models

torch.manual_seed(0)
workdir = Path(tempfile.mkdtemp())
onnx_path = models.export_onnx(models.build("digits-cnn"), workdir / "digits-cnn.onnx")
mod, names = load_onnx(onnx_path)
print("offloadable operators:", names)

######################################################################
# Step 1: the pattern table
# -------------------------
# Importing TVM registers the ``cim`` patterns: dense (``matmul``) and ``conv2d`` with an
# optional bias and ReLU, in a float, a QDQ and an integer form. Each carries check
# functions (one per hardware limit); a failing operator stays on the CPU.

from tvm_cim.relay_passes.patterns import cim_patterns  # noqa: E402

for pattern in cim_patterns()[:6]:
    print(pattern.name)

######################################################################
# Step 2: partitioning
# --------------------
# ``partition_for_cim`` fuses the matches and merges adjacent ones into functions marked
# ``Codegen="cim"``; ``main`` now calls them between its CPU operators (pooling,
# flattening).

partitioned = tvm_cim.partition_for_cim(mod, names=names)
offloaded = [gv.name_hint for gv, f in partitioned.functions.items() if "Codegen" in f.attrs]
print("cim functions:", offloaded)

######################################################################
# Step 3: codegen
# ---------------
# A float model is quantized on the way (here W8A8 with per-channel weights; calibration
# samples fix the activation ranges). Each region becomes one crossbar program, carried as
# a constant argument of ``tvm_cim.run``; the report lists every layer's crossbar cost.

rng = np.random.default_rng(0)
calibration = [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(16)]
executable, report = tvm_cim.compile_for_cim(mod, arch="rram-4b", calibration=calibration)
print(report.table())

######################################################################
# Step 4: run, and compare with llvm
# ----------------------------------
# The crossbar layers compute in integers on the simulator, so the result differs from
# the float ``llvm`` build by the quantization error only.

x = rng.random((1, 1, 8, 8), dtype=np.float32)
cim_out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
llvm_exe = tvm.compile(mod, target="llvm")
llvm_out = relax.VirtualMachine(llvm_exe, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
error = np.abs(cim_out - llvm_out).max() / np.abs(llvm_out).max()
print(f"largest difference to llvm: {100 * error:.2f} % of the output range")

######################################################################
# ``tvm_cim.build(mod, target="cim", calibration=...)`` does steps 2 to 4 in one call
# and returns a library that ``export_library`` makes self-contained.
