"""Precision-search benchmark: every strategy under the same episode budget.

For ``digits-cnn`` and ``mnist1d-cnn`` on ``rram-4b``, each strategy runs with each seed
for the same number of episodes. The table gives, per strategy, the best speedup over
W8A8 among the policies whose validation accuracy is at most ``--max-acc-drop`` points
below W8A8's (evaluated the same way), per seed and on the mean, and the wall time of a
search. Goals: DQN at least as good as every baseline on the mean, a speedup of at least
2.5x, at most 30 minutes per search. The base models are trained once per run.

    python bench/search.py [--episodes 150] [--seeds 0 1 2] [--out runs/bench-search]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tvm_cim.agent.search import SearchSettings, run_search
from tvm_cim.agent.strategies import STRATEGIES

MODELS = {"digits-cnn": "digits", "mnist1d-cnn": "mnist1d"}
GOAL_SPEEDUP = 2.5
GOAL_MINUTES = 30


def best_feasible_speedup(result, max_drop: float) -> float:
    """Largest speedup among episodes within ``max_drop`` points of W8A8 (1.0 if none)."""
    target = result.references["W8A8"].accuracy - max_drop
    feasible = [o.latency_us for o in result.episodes if o.accuracy >= target - 1e-9]
    return result.reference_latency_us / min(feasible) if feasible else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-acc-drop", type=float, default=0.1)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-search"))
    args = parser.parse_args()

    rows = []
    for model in args.models:
        out = args.out / model
        for log in out.glob("*.episodes.jsonl"):  # fresh searches; keep the base model
            log.unlink()
        (out / "optuna.db").unlink(missing_ok=True)
        for strategy in args.strategies:
            speedups, seconds = [], []
            for seed in args.seeds:
                settings = SearchSettings(
                    model=model,
                    dataset=MODELS[model],
                    out=out,
                    strategy=strategy,
                    episodes=args.episodes,
                    max_acc_drop=args.max_acc_drop,
                    seed=seed,
                    verify=False,
                    progress=False,
                )
                began = time.perf_counter()
                result = run_search(settings, log=lambda *_: None)
                seconds.append(time.perf_counter() - began)
                speedups.append(best_feasible_speedup(result, args.max_acc_drop))
                print(
                    f"{model:12s} {strategy:6s} seed {seed}: {speedups[-1]:.3f}x "
                    f"({seconds[-1]:.0f} s, {result.evaluations} evaluations)",
                    flush=True,
                )
            rows.append((model, strategy, speedups, seconds))

    print()
    print(
        f"best speedup over W8A8 at <= {args.max_acc_drop} points accuracy loss, "
        f"{args.episodes} episodes per search, rram-4b"
    )
    header = f"{'model':12s} {'strategy':8s} " + " ".join(f"seed {s:<3d}" for s in args.seeds)
    print(header + "     mean   s/search")
    for model, strategy, speedups, seconds in rows:
        cells = " ".join(f"{v:7.3f}x" for v in speedups)
        mean = statistics.mean(speedups)
        print(f"{model:12s} {strategy:8s} {cells}  {mean:6.3f}x  {statistics.mean(seconds):8.1f}")
    for model in args.models:
        means = {s: statistics.mean(v) for m, s, v, _ in rows if m == model}
        if "dqn" in means:
            others = {s: v for s, v in means.items() if s != "dqn"}
            verdict = all(means["dqn"] >= v for v in others.values())
            print(
                f"{model}: DQN mean {means['dqn']:.3f}x, best baseline "
                f"{max(others.values(), default=0):.3f}x: DQN at least as good as every "
                f"baseline: {'yes' if verdict else 'no'}; speedup goal {GOAL_SPEEDUP}x met: "
                f"{'yes' if means['dqn'] >= GOAL_SPEEDUP else 'no'}"
            )
    slowest = max(max(s) for *_, s in rows) / 60
    print(f"slowest search: {slowest:.1f} min (goal <= {GOAL_MINUTES} min)")


if __name__ == "__main__":
    main()
