"""The paper's one-crossbar model against chips of many crossbars.

VGG-16 and ResNet-18 (224x224, cost-only compiles) at W8A8 and W4A4 on 1, 4, 16, 64 and
256 crossbars of each arch (``rram-4b``, the paper's, and ``isaac``, which has energy
figures): the scheduled latency of one image (tiles on their own crossbars side by side,
convolutions copied onto idle crossbars), its ratio to the one-crossbar latency measured
in the same run, the crossbar writes the copies cost, and for a batch of images (the
model compiled for it: its copies chosen for the batch, its writes shared) the images
per second, their ratio to one image at a time, writes per image and, where the arch
has energy figures, the energy per image of one image and of the batch.

    python bench/crossbars.py [--models vgg16 resnet18] [--crossbars 1 4 16 64 256] \\
        [--archs rram-4b isaac] [--batch 16]
"""

from __future__ import annotations

import argparse

from tvm_cim.workflows.study import latency_study, study_arch

POLICIES = {"W8A8": None, "W4A4": {"default": {"w_bits": 4, "a_bits": 4}}}


def _energy_uj(nj: float | None) -> str:
    return "-" if nj is None else f"{nj / 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--crossbars", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--archs", nargs="+", default=["rram-4b", "isaac"])
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    batch = args.batch
    print(
        f"{'arch':8s} {'model':9s} {'bits':5s} {'crossbars':>9s} {'latency ms':>11s} "
        f"{'vs 1':>8s} {'writes':>7s} {f'img/s b{batch}':>10s} {'vs b1':>6s} "
        f"{'writes/img':>10s} {'uJ/img':>8s} {f'uJ/img b{batch}':>10s}"
    )
    for arch_name in args.archs:
        for model in args.models:
            for label, precision in POLICIES.items():
                one = None
                for crossbars in args.crossbars:
                    arch = study_arch(arch_name, crossbars)
                    data = latency_study(model, arch, precision, batch=batch)
                    latency = data["total_latency_us"] / 1e3
                    one = latency if crossbars == 1 else one
                    ratio = f"{one / latency:7.2f}x" if one else "-"
                    writes = sum(layer["writes"] for layer in data["layers"])
                    figures = data["batch"]
                    gain = figures["throughput_per_s"] * latency / 1e3
                    print(
                        f"{arch_name:8s} {model:9s} {label:5s} {crossbars:9d} {latency:11.1f} "
                        f"{ratio:>8s} {writes:7d} {figures['throughput_per_s']:10.1f} "
                        f"{gain:5.2f}x {figures['writes_per_item']:10.1f} "
                        f"{_energy_uj(data['total_energy_nj']):>8s} "
                        f"{_energy_uj(figures['energy_per_item_nj']):>10s}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
