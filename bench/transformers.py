"""Transformers on the crossbars: ViT-B/32's latency study and the small ViT's search.

1. ViT-B/32 (224x224, CIM-AQ's 74 layers) compiled cost-only on ``rram-4b`` with 1 and 64
   crossbars, at W8A8 and at a given mixed policy (W4A4 everywhere but the first and last
   layers, which CIM-AQ pins to W8A8): the latency of one image, its speedup over W8A8 on
   the same chip, and the share of the attention matmuls (Q·Kᵀ and A·V), whose stored
   operand is written into crossbars at run time for every image and head.
2. ``digits-vit`` searched by every strategy on ``digits`` (``bench/search.py``'s rows):
   the chosen policy's speedup, confirmed on the test split, credited only where its
   test drop is within the allowed drop.

    python bench/transformers.py [--crossbars 1 64] [--episodes 150] [--seeds 0 1 2] \\
        [--final-epochs 5] [--out runs/bench-vit] [--skip-search]
"""

from __future__ import annotations

import argparse
import runpy
import sys
import tempfile
from pathlib import Path

import numpy as np

from tvm_cim.workflows.study import latency_study, study_arch

MODEL = "vit-b32"
LAYERS = 74


def mixed_policy() -> np.ndarray:
    """W4A4 for every layer but the first and the last (W8A8)."""
    policy = np.full((LAYERS, 2), 4)
    policy[0] = policy[-1] = 8
    return policy


def vit_table(crossbar_counts) -> None:
    print(
        f"{'policy':7s} {'crossbars':>9s} {'latency ms':>11s} {'speedup':>8s} "
        f"{'writes':>7s} {'attention share':>16s} {'attention writes':>17s}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixed.npy"
        np.save(path, mixed_policy())
        for crossbars in crossbar_counts:
            arch = study_arch("rram-4b", crossbars)
            for label, precision in (("W8A8", None), ("mixed", path)):
                data = latency_study(MODEL, arch, precision)
                attention = [op for op in data["layers"] if op["kind"] == "matmul"]
                share = sum(op["scheduled_us"] for op in attention) / data["total_latency_us"]
                print(
                    f"{label:7s} {crossbars:9d} {data['total_latency_us'] / 1e3:11.1f} "
                    f"{data['speedup']:7.3f}x {sum(op['writes'] for op in data['layers']):7d} "
                    f"{100 * share:15.1f}% {sum(op['writes'] for op in attention):17d}"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crossbars", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--final-epochs", type=int, default=5, help="QAT epochs before the test")
    parser.add_argument("--out", default="runs/bench-vit")
    parser.add_argument("--skip-search", action="store_true", help="the ViT-B/32 table only")
    args = parser.parse_args()
    vit_table(args.crossbars)
    if args.skip_search:
        return
    print()
    argv = ["search.py", "--models", "digits-vit", "--episodes", str(args.episodes)]
    argv += ["--seeds", *map(str, args.seeds), "--out", args.out]
    argv += ["--final-epochs", str(args.final_epochs)]
    saved, sys.argv = sys.argv, argv
    try:
        runpy.run_path(str(Path(__file__).resolve().parent / "search.py"), run_name="__main__")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
