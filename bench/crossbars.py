"""The paper's one-crossbar model against chips of many crossbars.

VGG-16 and ResNet-18 (224x224, one image, cost-only compiles on ``rram-4b``) at W8A8 and
W4A4 on 1, 4, 16, 64 and 256 crossbars: the scheduled latency (tiles on their own
crossbars side by side, convolutions copied onto idle crossbars), its ratio to the one-
crossbar latency measured in the same run, and the crossbar writes the copies cost.

    python bench/crossbars.py [--models vgg16 resnet18] [--crossbars 1 4 16 64 256]
"""

from __future__ import annotations

import argparse

from tvm_cim.workflows.study import latency_study, study_arch

POLICIES = {"W8A8": None, "W4A4": {"default": {"w_bits": 4, "a_bits": 4}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--crossbars", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    args = parser.parse_args()
    print(
        f"{'model':9s} {'bits':5s} {'crossbars':>9s} {'latency ms':>11s} {'vs 1':>8s} {'writes':>7s}"
    )
    for model in args.models:
        for label, precision in POLICIES.items():
            one = None
            for crossbars in args.crossbars:
                data = latency_study(model, study_arch("rram-4b", crossbars), precision)
                latency = data["total_latency_us"] / 1e3
                one = latency if crossbars == 1 else one
                ratio = f"{one / latency:7.2f}x" if one else "-"
                writes = sum(layer["writes"] for layer in data["layers"])
                print(
                    f"{model:9s} {label:5s} {crossbars:9d} {latency:11.1f} {ratio:>8s} {writes:7d}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
