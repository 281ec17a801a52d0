"""The paper's one-crossbar model against chips of many crossbars.

Cost-only compiles of VGG-16 and ResNet-18 (224x224), three tables from one run:

1. ``rram-4b`` (the paper's arch) at W8A8 and W4A4 on 1, 4, 16, 64 and 256 crossbars: the
   scheduled latency of one image (tiles side by side, convolutions copied onto idle
   crossbars), its ratio to one crossbar, the crossbar writes, and for a batch of images
   (the model compiled for it, its writes shared) images per second, their ratio to one
   image at a time, and writes per image;
2. ``isaac`` (ISAAC's published energy figures) at W8A8: latency and energy per image,
   alone and in a batch;
3. a stream of images on a chip that holds every tile (``rram-4b``, 4,096 crossbars):
   weights written once at load, layers pipelined; the first image's latency, the
   interval between images and its ratio to one image at a time.

    python bench/crossbars.py [--models vgg16 resnet18] [--crossbars 1 4 16 64 256] \\
        [--batch 16] [--energy-crossbars 8 64 256] [--stream-models resnet18]
"""

from __future__ import annotations

import argparse

from tvm_cim.workflows.study import latency_study, study_arch

POLICIES = {"W8A8": None, "W4A4": {"default": {"w_bits": 4, "a_bits": 4}}}
STREAM_CROSSBARS = 4096


def latency_table(models, crossbar_counts, batch: int) -> None:
    print(
        f"{'model':9s} {'bits':5s} {'crossbars':>9s} {'latency ms':>11s} {'vs 1':>8s} "
        f"{'writes':>7s} {f'img/s b{batch}':>11s} {'vs b1':>6s} {'writes/img':>10s}"
    )
    for model in models:
        for label, precision in POLICIES.items():
            one = None
            for crossbars in crossbar_counts:
                data = latency_study(model, study_arch("rram-4b", crossbars), precision, batch)
                latency = data["total_latency_us"] / 1e3
                one = latency if crossbars == 1 else one
                ratio = f"{one / latency:7.2f}x" if one else "-"
                writes = sum(layer["writes"] for layer in data["layers"])
                figures = data["batch"]
                gain = figures["throughput_per_s"] * latency / 1e3
                print(
                    f"{model:9s} {label:5s} {crossbars:9d} {latency:11.1f} {ratio:>8s} "
                    f"{writes:7d} {figures['throughput_per_s']:11.1f} {gain:5.2f}x "
                    f"{figures['writes_per_item']:10.1f}",
                    flush=True,
                )


def energy_table(models, crossbar_counts, batch: int) -> None:
    print(
        f"\n{'model':9s} {'arch':6s} {'crossbars':>9s} {'latency ms':>11s} {'uJ/img':>9s} "
        f"{f'uJ/img b{batch}':>11s}"
    )
    for model in models:
        for crossbars in crossbar_counts:
            data = latency_study(model, study_arch("isaac", crossbars), None, batch)
            print(
                f"{model:9s} {'isaac':6s} {crossbars:9d} {data['total_latency_us'] / 1e3:11.2f} "
                f"{data['total_energy_nj'] / 1e3:9.1f} "
                f"{data['batch']['energy_per_item_nj'] / 1e3:11.1f}",
                flush=True,
            )


def stream_table(models) -> None:
    print(
        f"\n{'model':9s} {'bits':5s} {'crossbars':>9s} {'1 image ms':>10s} {'stationary':>10s} "
        f"{'load writes':>11s} {'first ms':>9s} {'interval ms':>11s} {'img/s':>8s} {'vs 1':>7s}"
    )
    arch = study_arch("rram-4b", STREAM_CROSSBARS)
    for model in models:
        for label, precision in POLICIES.items():
            data = latency_study(model, arch, precision, stream=True)
            s = data["stream"]
            print(
                f"{model:9s} {label:5s} {STREAM_CROSSBARS:9d} {data['total_latency_us'] / 1e3:10.2f} "
                f"{str(s['stationary']):>10s} {s['load_writes']:11d} "
                f"{s['first_image_us'] / 1e3:9.2f} {s['interval_us'] / 1e3:11.3f} "
                f"{s['throughput_per_s']:8.1f} {data['total_latency_us'] / s['interval_us']:6.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--crossbars", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--energy-crossbars", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--stream-models", nargs="+", default=["resnet18"])
    args = parser.parse_args()
    latency_table(args.models, args.crossbars, args.batch)
    energy_table(args.models, args.energy_crossbars, args.batch)
    stream_table(args.stream_models)


if __name__ == "__main__":
    main()
