"""``tvm-cim train``: the training stages from the command line.

The output folder and the files the stage starts from are checked before training; a
stage that fails leaves none of the files it wrote.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tvm_cim.cli.common import (
    SEED,
    check_output_file,
    check_output_folder,
    claim_output,
    positive_float,
    positive_int,
)
from tvm_cim.core.errors import CimError


def train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="zoo model, e.g. digits-cnn")
    p.add_argument("--dataset", required=True, help="digits, mnist1d or synthetic")
    p.add_argument(
        "--stage",
        choices=("fp32", "w8a8", "mixed"),
        help="fp32 pretraining, W8A8 QAT or mixed-precision finetuning (default: mixed "
        "when --precision is given, w8a8 with --from, else fp32)",
    )
    p.add_argument("--precision", metavar="CFG", help="per-layer bits (YAML, JSON or .npy)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--from", dest="start", metavar="CKPT", help="start from this checkpoint")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _outputs(out: Path, stage: str) -> dict[str, Path]:
    """The files a stage writes into ``out``."""
    return {
        "checkpoint": out / f"{stage}.pt",
        "metrics": out / f"{stage}.metrics.json",
        "onnx": out / f"{stage}.onnx",
    }


def train(args: argparse.Namespace) -> int:
    """``tvm-cim train``: train one stage, write its checkpoint, metrics and ONNX file."""
    if args.epochs < 0:
        raise CimError(f"--epochs must be >= 0, got {args.epochs}")
    stage = args.stage or ("mixed" if args.precision else "w8a8" if args.start else "fp32")
    out = check_output_folder(args.out, "training outputs")
    outputs = _outputs(out, stage)
    for what, path in outputs.items():
        check_output_file(path, what)
    if args.precision is not None and not Path(args.precision).is_file():
        raise CimError(f"precision file {args.precision} does not exist")

    import torch

    from tvm_cim.core.precision import Precision
    from tvm_cim.learn import data, qat, train, zoo

    if args.precision is not None:
        Precision.load(args.precision)  # a bad file fails now, not after training
    start = None
    if args.start:
        start, _ = train.load_checkpoint(args.start, args.model)
    config = train.TrainConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    model, result = train.run_stage(
        stage,
        args.model,
        args.dataset,
        config,
        precision=args.precision,
        start=start,
        progress=not args.no_progress,
    )
    for path in outputs.values():
        claim_output(path)  # removed again if a later step fails
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = train.save_checkpoint(model, result, outputs["checkpoint"])
    train.write_metrics(result, outputs["metrics"])
    print(
        f"{args.model} on {args.dataset}, stage {stage}: val {result.val_accuracy:.2f} %, "
        f"test {result.test_accuracy:.2f} % ({result.seconds:.1f} s)"
    )
    print(f"wrote {checkpoint}")
    example = torch.from_numpy(data.load(args.dataset, seed=args.seed).test[0][:1])
    if stage == "fp32":  # a float graph: compiling it needs --calibration
        onnx_path = zoo.export_onnx(model, outputs["onnx"], tuple(example.shape[1:]))
    else:
        onnx_path = qat.export_onnx(model, outputs["onnx"], example)
    print(f"wrote {onnx_path} (compile it with: tvm-cim compile {onnx_path} -o model.so)")
    return 0
