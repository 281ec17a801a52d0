"""
Mixed-precision quantization-aware training
===========================================

Train ``digits-cnn``, fine-tune it at W8A8 and then at a mixed policy with 2- to 4-bit
layers, export it, compile it for ``cim`` and check that the simulator reproduces
PyTorch's fake-quantized accuracy. (Few epochs here; ``tvm-cim train`` does the same
from the command line.)
"""

######################################################################
# The three training stages
# -------------------------
# ``run_stage`` trains FP32 from scratch, or QAT from the previous stage's model.
# Activation scales are calibrated (running maximum), weights symmetric per channel.

import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm
from tvm import relax

from tvm_cim import compile_for_cim
from tvm_cim.compiler.frontend import load_onnx
from tvm_cim.learn import data, qat, train

torch.set_num_threads(1)
config = train.TrainConfig(epochs=10, lr=3e-3, batch_size=32, seed=0)
fp32, r_fp32 = train.run_stage("fp32", "digits-cnn", "digits", config)
qat_config = train.TrainConfig(epochs=2, lr=2e-4, batch_size=32, seed=0)
w8a8, r_w8a8 = train.run_stage("w8a8", "digits-cnn", "digits", qat_config, start=fp32)
policy = {"conv1": [8, 8], "conv2": [2, 4], "fc1": [4, 3], "fc2": [3, 2]}
mixed, r_mixed = train.run_stage(
    "mixed", "digits-cnn", "digits", qat_config, precision=policy, start=w8a8
)
for r in (r_fp32, r_w8a8, r_mixed):
    print(f"{r.stage:6s} test accuracy {r.test_accuracy:.2f} %")

######################################################################
# Export and compile
# ------------------
# The QDQ ONNX file carries each layer's widths (a Clip to the code range before every
# QuantizeLinear), so it compiles with no precision flag. ``load_torch(mixed, x)`` would
# take the same model through ``torch.export`` instead.

workdir = Path(tempfile.mkdtemp())
x_test, y_test = data.load("digits").test
example = torch.from_numpy(x_test[:1])
mod, names = load_onnx(qat.export_onnx(mixed, workdir / "mixed.onnx", example))
executable, report = compile_for_cim(mod, names=names)
print(report.table())

######################################################################
# Simulated against PyTorch
# -------------------------
# The rounding, clamping and requantization are one definition shared by QAT, the
# compiler and the simulator: the compiled model classifies like the PyTorch model.

vm = relax.VirtualMachine(executable, tvm.cpu())
simulated = np.concatenate([vm["main"](tvm.runtime.tensor(s[None])).numpy() for s in x_test])
reference = train.predictions(mixed, x_test)
print(f"PyTorch   {100 * (reference.argmax(1) == y_test).mean():.2f} %")
print(f"simulated {100 * (simulated.argmax(1) == y_test).mean():.2f} %")
print(f"same argmax on {100 * (simulated.argmax(1) == reference.argmax(1)).mean():.1f} %")
