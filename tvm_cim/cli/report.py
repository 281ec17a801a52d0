"""``tvm-cim report``: the latency study of a zoo model at its standard shapes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tvm_cim.cli.search import add_arch_argument
from tvm_cim.core.errors import CimError


def report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo model: resnet18, vgg16, mobilenetv2, ...")
    add_arch_argument(p)
    p.add_argument(
        "--precision",
        metavar="CFG|POLICY.npy",
        help="per-layer bits: YAML/JSON by layer path, or a list / CIM-AQ .npy in "
        "named_modules() order (default W8A8)",
    )
    p.add_argument("--crossbars", type=int, help="crossbars working in parallel (arch override)")
    p.add_argument("--adc-bits", type=int, help="finite ADC resolution (arch override)")
    p.add_argument("--json", metavar="FILE", help="also write the study as JSON")


def report(args: argparse.Namespace) -> int:
    from tvm_cim.workflows.study import latency_study, study_arch, study_table

    arch = study_arch(args.arch, args.crossbars, args.adc_bits)
    data = latency_study(args.model, arch, args.precision)
    print(f"{args.model} on {arch.name}: cost-only compile, one input")
    print(study_table(data))
    if args.json:
        path = Path(args.json)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2))
        except OSError as exc:
            raise CimError(f"cannot write {path}: {exc.strerror or exc}") from None
        print(f"wrote {path}")
    return 0
