"""Precision-search benchmark: every strategy under the same episode budget, confirmed on
the test split.

For the deep ``mnist1d-resnet`` on ``mnist1d-80k`` and for ``digits-cnn`` on ``digits``
(arch ``rram-4b``), each strategy runs with each seed for the same number of episodes.
Each search chooses its best policy on the selection (validation) split; the bench then
reports that one policy on the test split, which no search saw: its speedup over W8A8,
its drop against W8A8 on the same test samples with the paired-bootstrap 95 % interval,
and the verdict on the allowed drop. A search is credited with its speedup when the
measured test drop is at most ``--max-acc-drop`` points, else with W8A8's 1.0x: no
second policy is tried on the test split. Goals: at least 2.5x credited on the deep
model, DQN at least as good as every baseline on the mean, at most 30 minutes per
search. The base models are trained once and cached in the output directory.

Every finished search's row is written to ``<out>/bench-search.json`` at once, and a
rerun with the same settings keeps those rows and runs only the searches still missing
(an interrupted one starts again), so the deep model's twelve searches may be spread
over several runs; ``--fresh`` discards the recorded rows.

    python bench/search.py [--episodes 150] [--seeds 0 1 2] [--models ...] \\
        [--final-epochs 0] [--out runs/bench-search] [--fresh]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from tvm_cim.agent.search import SearchSettings, run_search
from tvm_cim.agent.strategies import STRATEGIES
from tvm_cim.core.files import atomic_path

MODELS = {
    "mnist1d-resnet": "mnist1d-80k",
    "digits-cnn": "digits",
    "mnist1d-cnn": "mnist1d",
    "digits-vit": "digits",
}
DEFAULT_MODELS = ("mnist1d-resnet", "digits-cnn")
DEEP_MODEL = "mnist1d-resnet"
GOAL_SPEEDUP = 2.5
GOAL_MINUTES = 30
#: The settings a recorded row must share with this run to be kept.
ROW_SETTINGS = ("episodes", "max_acc_drop", "final_epochs")


def row_of(result, seconds: float, final: bool) -> dict:
    """One search's figures: the chosen policy's speedup and its test-split comparison
    (after the final finetune if ``final``)."""
    comparison = result.confirmation["final" if final else "searched"]
    speedup = result.reference_latency_us / result.best.latency_us
    within = comparison["drop"] <= result.settings.max_acc_drop + 1e-9
    return {
        "model": result.settings.model,
        "strategy": result.settings.strategy,
        "seed": result.settings.seed,
        "speedup": speedup,
        "credited_speedup": speedup if within else 1.0,
        "val_drop": result.references["W8A8"].accuracy - result.best.accuracy,
        "test_drop": comparison["drop"],
        "test_low": comparison["low"],
        "test_high": comparison["high"],
        "verdict": comparison["verdict"],
        "test_samples": comparison["n"],
        "minutes": seconds / 60,
        "evaluations": result.evaluations,
        "episodes": result.settings.episodes,
        "max_acc_drop": result.settings.max_acc_drop,
        "final_epochs": result.settings.final_epochs,
    }


def recorded_rows(path: Path, args) -> dict[tuple, dict]:
    """The rows of an earlier run with this run's settings, by (model, strategy, seed)."""
    if args.fresh or not path.is_file():
        return {}
    rows = json.loads(path.read_text())
    wanted = {name: getattr(args, name) for name in ROW_SETTINGS}
    return {
        (r["model"], r["strategy"], r["seed"]): r
        for r in rows
        if all(r.get(name) == value for name, value in wanted.items())
    }


def clear_search(out: Path, settings: SearchSettings) -> None:
    """Remove what an interrupted run of this search left, so it starts afresh."""
    for suffix in (".episodes.jsonl", ".agent.zip", ".optuna.db"):
        (out / f"{settings.tag}{suffix}").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-acc-drop", type=float, default=0.1)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument(
        "--final-epochs",
        type=int,
        default=0,
        help="QAT epochs of the final finetune before the test split (default: none; the "
        "policy is confirmed as the search measured it)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    parser.add_argument(
        "--fresh", action="store_true", help="rerun every search, discarding recorded rows"
    )
    args = parser.parse_args()

    record = args.out / "bench-search.json"
    done = recorded_rows(record, args)
    rows = []
    for model in args.models:
        out = args.out / model
        for strategy in args.strategies:
            for seed in args.seeds:
                if (model, strategy, seed) in done:
                    rows.append(done[model, strategy, seed])
                    print_row(rows[-1], "recorded")
                    continue
                settings = SearchSettings(
                    model=model,
                    dataset=MODELS[model],
                    out=out,
                    strategy=strategy,
                    episodes=args.episodes,
                    max_acc_drop=args.max_acc_drop,
                    seed=seed,
                    verify=False,
                    final_epochs=args.final_epochs,
                    progress=False,
                )
                if strategy == "tpe":  # a study of its own, which clear_search may remove
                    study = (out / f"{settings.tag}.optuna.db").resolve()
                    settings = dataclasses.replace(settings, storage=f"sqlite:///{study}")
                clear_search(out, settings)
                began = time.perf_counter()
                result = run_search(settings, log=lambda *_: None)
                row = row_of(result, time.perf_counter() - began, args.final_epochs > 0)
                rows.append(row)
                save_rows(record, [*done.values(), *rows])
                print_row(row, "searched")
    save_rows(record, [*done.values(), *rows])
    print_table(rows, args)


def print_row(row: dict, how: str) -> None:
    print(
        f"{row['model']:14s} {row['strategy']:6s} seed {row['seed']}: {row['speedup']:.3f}x, "
        f"test drop {row['test_drop']:+.2f} [{row['test_low']:+.2f}, {row['test_high']:+.2f}] "
        f"({row['verdict']}), {row['minutes']:.1f} min ({how})",
        flush=True,
    )


def save_rows(path: Path, rows: list[dict]) -> None:
    """Write the rows once, atomically (a run killed mid-write keeps the last file)."""
    unique = {(r["model"], r["strategy"], r["seed"]): r for r in rows}
    with atomic_path(path) as partial:
        partial.write_text(json.dumps(list(unique.values()), indent=2))


def print_table(rows: list[dict], args) -> None:
    stage = f"after {args.final_epochs} final QAT epochs" if args.final_epochs else "as searched"
    print()
    print(
        f"{args.episodes} episodes per search, rram-4b, seeds {args.seeds}; best policy chosen "
        f"on the validation split, confirmed on the test split ({stage}); credited speedup: "
        f"the speedup when the test drop is <= {args.max_acc_drop} points, else 1.0"
    )
    print(
        f"{'model':14s} {'strategy':8s} {'credited':>9s} {'speedup':>8s} {'test drop':>10s} "
        f"{'95 % CI of the drop (per seed)':34s} {'holds':>6s} {'min/search':>10s}"
    )
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["strategy"]), []).append(row)
    means = {}
    for (model, strategy), group in groups.items():
        credited = statistics.mean(r["credited_speedup"] for r in group)
        means[model, strategy] = credited
        intervals = " ".join(f"[{r['test_low']:+.2f},{r['test_high']:+.2f}]" for r in group)
        holds = sum(r["verdict"] == "holds" for r in group)
        print(
            f"{model:14s} {strategy:8s} {credited:8.3f}x "
            f"{statistics.mean(r['speedup'] for r in group):7.3f}x "
            f"{statistics.mean(r['test_drop'] for r in group):+10.2f} {intervals:34s} "
            f"{holds:>3d}/{len(group):<2d} {statistics.mean(r['minutes'] for r in group):10.1f}"
        )
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {s: v for (m, s), v in means.items() if m == model}
        if "dqn" not in mine:
            continue
        others = {s: v for s, v in mine.items() if s != "dqn"}
        line = f"{model}: DQN credited mean {mine['dqn']:.3f}x"
        if others:
            verdict = all(mine["dqn"] >= v for v in others.values())
            line += (
                f", best baseline {max(others.values()):.3f}x; DQN at least as good as every "
                f"baseline: {'yes' if verdict else 'no'}"
            )
        if model == DEEP_MODEL:
            line += f"; goal {GOAL_SPEEDUP}x met: {'yes' if mine['dqn'] >= GOAL_SPEEDUP else 'no'}"
        print(line)
    slowest = max(r["minutes"] for r in rows)
    print(f"slowest search: {slowest:.1f} min (goal <= {GOAL_MINUTES} min)")


if __name__ == "__main__":
    main()
