"""
A CIM latency study: VGG-16 and ResNet-18
=========================================

The paper's latency study, with tvm-cim's cost-only compile: ImageNet-size models at
224x224, per-layer crossbar writes, MVM executions and latency, at W8A8 and at a mixed
policy, and what a machine with several crossbars working in parallel changes.
"""

######################################################################
# W8A8 on the paper's machine
# ---------------------------
# ``rram-4b`` is CIM-AQ's configuration with one crossbar: every layer's latency is the
# reference formula ``writes * 56 us + MVMs * 1.4 us``.

from tvm_cim.workflows.study import latency_study, study_arch, study_table

vgg = latency_study("vgg16", "rram-4b")
print(study_table(vgg))
resnet = latency_study("resnet18", "rram-4b")
print(f"ResNet-18 W8A8: {resnet['total_latency_us'] / 1000:.1f} ms over "
      f"{len(resnet['layers'])} layers")  # fmt: skip

######################################################################
# A mixed policy
# --------------
# A list policy follows the ``named_modules()`` order of the convolution and linear
# layers, as CIM-AQ indexes them (``.npy`` policies too). First and last layer W8A8,
# 4-bit weights and activations elsewhere:

count = len(resnet["layers"])
policy = [[8, 8]] + [[4, 4]] * (count - 2) + [[8, 8]]
mixed = latency_study("resnet18", "rram-4b", policy)
print(f"ResNet-18 mixed: {mixed['total_latency_us'] / 1000:.1f} ms, "
      f"speedup {mixed['speedup']:.2f}x over W8A8")  # fmt: skip

######################################################################
# Beyond the paper's model
# ------------------------
# With several crossbars, tiles go round-robin over them and the simulator's schedule
# overlaps the writing of one crossbar with computing on another; the paper's sum of
# per-layer latencies becomes a makespan. The gain stops once the layers that fit on one
# crossbar dominate: their input positions run one after another on that crossbar, and
# replicating weights to split them is not modelled.

for crossbars in (1, 4, 16):
    arch = study_arch("rram-4b", crossbars=crossbars)
    data = latency_study("resnet18", arch, policy)
    print(f"{crossbars:3d} crossbars: {data['total_latency_us'] / 1000:8.1f} ms "
          f"(sequential sum {data['sequential_latency_us'] / 1000:.1f} ms)")  # fmt: skip
