"""``tvm-cim report``: the latency study of a zoo model at its standard shapes."""

from __future__ import annotations

import argparse
from pathlib import Path

from tvm_cim.cli.common import EXIT_OK, add_arch_argument, check_output_file, write_json


def report_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim report``."""
    p.add_argument(
        "--model",
        required=True,
        help="zoo model: resnet18, vgg16, mobilenetv2, vit-b32, vit-b16, ...",
    )
    add_arch_argument(p, "study")
    p.add_argument(
        "--precision",
        metavar="CFG|POLICY.npy",
        help="per-layer bits: YAML/JSON by layer path, or a list / CIM-AQ .npy in "
        "named_modules() order (default W8A8)",
    )
    p.add_argument("--crossbars", type=int, help="crossbars working in parallel (arch override)")
    p.add_argument("--adc-bits", type=int, help="finite ADC resolution (arch override)")
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="also compile for a batch of this many images: its latency, throughput and "
        "writes per image (default 1)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="also a stream of images: weights written once when they fit the chip, "
        "layers pipelined; the interval between images and writes per image",
    )
    p.add_argument("--json", metavar="FILE", help="also write the study as JSON")


def report(args: argparse.Namespace) -> int:
    """``tvm-cim report``: print the study's table and write it as JSON with ``--json``."""
    if args.json:
        check_output_file(args.json, "study")  # before the study, not after it
    from tvm_cim.workflows.study import latency_study, study_arch, study_table

    arch = study_arch(args.arch, args.crossbars, args.adc_bits)
    data = latency_study(args.model, arch, args.precision, args.batch, args.stream)
    print(f"{args.model} on {arch.name}: cost-only compile, one input")
    print(study_table(data))
    if args.json:
        path = Path(args.json)
        write_json(path, data, "study")
        print(f"wrote {path}")
    return EXIT_OK
