"""Does the search's "evaluate this policy" step rank policies as the final finetune does?

For each model, a fixed, seeded set of policies on ``rram-4b``'s search space (uniform
widths from W8A8 down, and mixed ones around a drawn width) is scored by every
evaluation variant (validation accuracy after recalibration and a short finetune: plain
at several step counts, or distilled from the W8A8 base model), and finetuned as the
search finetunes its best policy (``final_finetune``, from the default variant's
candidate). The table gives each variant's Spearman rank correlation with the final test
accuracy, over all policies and over the better half (the region the search's accuracy
target falls in), with its p-value, and the seconds one evaluation takes. The base W8A8
models are the search's, cached under ``<out>/base-<model>-<dataset>/``.

    OMP_NUM_THREADS=1 python bench/predictive.py [--models mnist1d-cnn digits-cnn]
        [--policies 16] [--seed 0] [--final-epochs 5] [--variants s20 s60 ...]
        [--out runs/bench-predictive]
    python bench/predictive.py --report runs/bench-predictive/predictive-*.json

``--models mnist1d-resnet`` trains on ``mnist1d-80k`` (slower; use fewer policies).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from search import MODELS  # bench/search.py, beside this script: each model and its dataset

from tvm_cim.agent.scoring import QatAccuracy, final_finetune
from tvm_cim.agent.search import SearchSettings, base_model
from tvm_cim.agent.space import SearchSpace
from tvm_cim.core.arch import CimArch
from tvm_cim.core.precision import Bits
from tvm_cim.learn import data, qat, train

ARCH = "rram-4b"
DEFAULT_VARIANT = "s20"
#: Evaluation variants: finetune steps and distillation temperature (None: plain).
VARIANTS = {
    "s0": (0, None),
    "s20": (20, None),
    "s60": (60, None),
    "s150": (150, None),
    "kd20-T2": (20, 2.0),
    "kd20-T4": (20, 4.0),
    "kd60-T2": (60, 2.0),
    "kd60-T4": (60, 4.0),
}
UNIFORM_WIDTHS = (8, 6, 5, 4, 3, 2)


def draw_policies(layers: int, count: int, seed: int) -> list[tuple[Bits, ...]]:
    """Uniform policies (W8A8 first), then mixed ones: per layer, a drawn centre width
    plus or minus two bits, clipped to the space, independently for weights and
    activations; distinct policies only."""
    space = SearchSpace()
    w_choices = space.weight_choices(CimArch.preset(ARCH).cell_bits)
    a_choices = space.activation_choices()
    policies = [(Bits(b, b),) * layers for b in UNIFORM_WIDTHS[: min(count, 6)]]
    rng = random.Random(seed)

    def width(centre: int, choices: list[int]) -> int:
        return min(max(centre + rng.randint(-2, 2), choices[0]), choices[-1])

    while len(policies) < count:
        centre = rng.randint(3, 7)
        policy = tuple(
            Bits(width(centre, w_choices), width(centre, a_choices)) for _ in range(layers)
        )
        if policy not in policies:
            policies.append(policy)
    return policies


def label(policy: tuple[Bits, ...]) -> str:
    if len(set(policy)) == 1:
        return f"W{policy[0].w_bits}A{policy[0].a_bits}"
    return " ".join(f"{b.w_bits}{b.a_bits}" for b in policy)


def correlation(scores: list[float], final: list[float]) -> tuple[float, float]:
    """Spearman's rho and its p-value; NaN where either side holds one value only."""
    if len(set(scores)) < 2 or len(set(final)) < 2:
        return float("nan"), float("nan")
    rho, p = spearmanr(scores, final)
    return float(rho), float(p)


def gain_interval(scores, reference, final, resamples: int = 1000) -> tuple[float, float]:
    """90 % paired-bootstrap interval of ``rho(scores) - rho(reference)`` over policies:
    whether a variant ranks better than the default beyond the policies' draw."""
    scores, reference, final = map(np.asarray, (scores, reference, final))
    rng = np.random.default_rng(0)
    gains = []
    for _ in range(resamples):
        i = rng.integers(0, len(final), len(final))
        with warnings.catch_warnings():  # a resample may hold one value only: no rank
            warnings.simplefilter("ignore")
            gains.append(spearmanr(scores[i], final[i])[0] - spearmanr(reference[i], final[i])[0])
    low, high = np.nanpercentile(gains, [5, 95])
    return float(low), float(high)


def measure(model_name: str, args) -> dict:
    """Scores, final accuracies and seconds of every policy for one model."""
    dataset_name = MODELS[model_name]
    dataset = data.load(dataset_name)
    settings = SearchSettings(model=model_name, dataset=dataset_name, out=args.out)
    base = base_model(settings, dataset, log=lambda *_: None)
    names = qat.layer_names(base)
    evaluations = {
        variant: QatAccuracy(
            base,
            dataset,
            VARIANTS[variant][0],
            teacher=base if VARIANTS[variant][1] is not None else None,
            temperature=VARIANTS[variant][1],
        )
        for variant in args.variants
    }
    rows = []
    for policy in draw_policies(len(names), args.policies, args.seed):
        precision = dict(zip(names, policy, strict=True))
        row = {"policy": [[b.w_bits, b.a_bits] for b in policy], "label": label(policy)}
        for variant, evaluate in evaluations.items():
            began = time.perf_counter()
            row[variant] = evaluate(precision)
            row[f"{variant} s"] = time.perf_counter() - began
        began = time.perf_counter()
        tuned, _ = final_finetune(
            evaluations[DEFAULT_VARIANT].candidate(precision), dataset, args.final_epochs
        )
        row["final s"] = time.perf_counter() - began
        row["final val"] = train.accuracy(tuned, dataset.val)
        row["final test"] = train.accuracy(tuned, dataset.test)
        rows.append(row)
        scores = " ".join(f"{v} {row[v]:5.1f}" for v in args.variants)
        print(
            f"{model_name} {row['label']:>24s}: {scores} | final val {row['final val']:5.1f} "
            f"test {row['final test']:5.1f} ({row['final s']:.0f} s)",
            flush=True,
        )
    return {
        "model": model_name,
        "dataset": dataset_name,
        "layers": names,
        "final_epochs": args.final_epochs,
        "rows": rows,
    }


def report(result: dict, variants: list[str], final_epochs: int) -> None:
    rows = result["rows"]
    final = [r["final test"] for r in rows]
    better = sorted(range(len(rows)), key=lambda i: -final[i])[: max(3, len(rows) // 2)]
    print()
    print(
        f"{result['model']} on {result['dataset']}, {ARCH}: {len(rows)} policies, final "
        f"finetune {final_epochs} epochs; final test accuracy {min(final):.1f}..{max(final):.1f} %"
    )
    print(
        f"{'variant':10s} {'rho(test)':>9s} {'p':>8s} {'rho(val)':>9s} {'rho(half)':>9s} "
        f"{'p':>8s} {'gain vs ' + DEFAULT_VARIANT + ' (90 %)':>22s} {'s/eval':>7s}"
    )
    reference = [r[DEFAULT_VARIANT] for r in rows]
    for variant in variants:
        scores = [r[variant] for r in rows]
        rho, p = correlation(scores, final)
        rho_val, _ = correlation(scores, [r["final val"] for r in rows])
        rho_half, p_half = correlation([scores[i] for i in better], [final[i] for i in better])
        low, high = gain_interval(scores, reference, final)
        seconds = statistics.mean(r[f"{variant} s"] for r in rows)
        print(
            f"{variant:10s} {rho:9.3f} {p:8.2g} {rho_val:9.3f} {rho_half:9.3f} {p_half:8.2g} "
            f"{f'[{low:+.3f}, {high:+.3f}]':>22s} {seconds:7.2f}"
        )
    rho, p = correlation([r["final val"] for r in rows], final)
    print(
        f"reference: the final model's own val accuracy ranks its test accuracy at rho "
        f"{rho:.3f} (p {p:.2g}); final finetune "
        f"{statistics.mean(r['final s'] for r in rows):.1f} s per policy"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=["mnist1d-cnn", "digits-cnn"]
    )
    parser.add_argument("--policies", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--final-epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-predictive"))
    parser.add_argument(
        "--report", type=Path, nargs="+", help="print the tables of saved figures, measure nothing"
    )
    args = parser.parse_args()
    if DEFAULT_VARIANT not in args.variants:
        parser.error(f"--variants must include the search's default, {DEFAULT_VARIANT}")
    torch.set_num_threads(1)

    if args.report:
        for path in args.report:
            result = json.loads(path.read_text())
            report(result, [v for v in VARIANTS if v in result["rows"][0]], result["final_epochs"])
        return
    for model_name in args.models:
        result = measure(model_name, args)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"predictive-{model_name}-p{args.policies}-s{args.seed}.json"
        path.write_text(json.dumps(result, indent=2))
        report(result, args.variants, args.final_epochs)
        print(f"per-policy figures: {path}")


if __name__ == "__main__":
    main()
