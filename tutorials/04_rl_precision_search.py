"""
Reinforcement-learning precision search
=======================================

A DQN agent (Stable-Baselines3) picks weight and activation widths per layer of
``digits-cnn``; the reward trades latency on the crossbars (the compiler's static cost
model) against validation accuracy (a short QAT finetune per policy). A small budget
here; ``tvm-cim search`` runs the same from the command line.
"""

######################################################################
# The environment
# ---------------
# ``CimQuantEnv`` walks the layers; per layer it asks for weight bits, then activation
# bits. Its latency table holds every layer's latency at every width pair.

import tempfile
from pathlib import Path

import torch

from tvm_cim.agent.latency import LatencyTable
from tvm_cim.learn import zoo as models

torch.set_num_threads(1)
table = LatencyTable.for_model(models.build("digits-cnn").eval(), torch.zeros(1, 1, 8, 8))
for i, op in enumerate(table.operators):
    print(f"{op.name:6s} W8A8 {table.latency_us[i, 7, 7]:7.1f} us  W4A4 "
          f"{table.latency_us[i, 3, 3]:7.1f} us  W2A2 {table.latency_us[i, 1, 1]:7.1f} us")  # fmt: skip

######################################################################
# A search
# --------
# ``run_search`` trains the base model (FP32, then W8A8), runs DQN for the budget,
# writes the best policy, the episode log, the plots and a summary, and compiles and
# simulates the best policy to close the loop.

from tvm_cim.agent.search import SearchSettings, run_search  # noqa: E402

out = Path(tempfile.mkdtemp())
settings = SearchSettings(
    model="digits-cnn", dataset="digits", out=out, strategy="dqn", episodes=20, progress=False
)
result = run_search(settings)
print(result.files["summary_md"].read_text())

######################################################################
# The outputs
# -----------
# ``dqn-s0.best.yaml`` and ``dqn-s0.best.npy`` (CIM-AQ's format) are precision configs
# for ``tvm-cim compile --precision`` and ``tvm-cim report --precision``;
# ``pareto.png`` plots every episode of every search in the directory.

for path in sorted(out.iterdir()):
    print(path.name)
