"""Learning per evaluation: DQN and DDPG playing one episode at a time against two in
lockstep.

With ``--workers 2`` the agents play two environments in lockstep: each learns from a
round only when both of its episodes are measured, so it chooses each episode knowing
fewer results than one playing alone. This bench measures what that costs in search
quality per evaluation: for each strategy and seed, on ``digits-cnn`` / ``digits``, a
search in this process (one environment) and one on a local cluster of 2 workers (two
environments), same budget. After every ``--step`` distinct measured policies, the best
reward found so far; the table shows its mean over the seeds for each way, and the mean
paired difference (2 environments less 1) with its 95 % bootstrap interval over the seeds.

An asynchronous agent (learning from each episode as it finishes, with the other still in
flight) sits between the two: it knows more than a lockstep round and less than a lone
agent. What lockstep costs in throughput instead, waiting for the slower measurement of
each round, is the spread of the task times that ``bench/scaling.py`` reports.

    python bench/lockstep.py [--episodes 48] [--seeds 0 1 2 3 4 5] [--step 16]
        [--strategies dqn ddpg] [--out runs/bench-lockstep]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from scipy import stats

from tvm_cim.agent.log import EpisodeLog
from tvm_cim.agent.search import SearchSettings, run_search

MODEL, DATASET = "digits-cnn", "digits"
WAYS = {"1 env": None, "2 envs": 2}


def best_after(log: Path, step: int) -> list[float]:
    """The best reward of the episodes so far after every ``step`` distinct policies the
    search measured (the uniform references, measured first, are not counted)."""
    records = EpisodeLog.read_records(log)
    seen = {tuple(map(tuple, r["policy"])) for r in records if r["type"] == "reference"}
    measured, best, curve = 0, -np.inf, []
    for record in (r for r in records if r["type"] == "episode"):
        best = max(best, record["reward"])
        policy = tuple(map(tuple, record["policy"]))
        if policy not in seen:
            seen.add(policy)
            measured += 1
            if measured % step == 0:
                curve.append(best)
    return curve


def search(strategy: str, seed: int, episodes: int, workers, root: Path, way: str) -> Path:
    """One search's episode log; the base model is trained by the first and shared."""
    out = root / way.replace(" ", "-")
    base = root / next(iter(WAYS)).replace(" ", "-") / f"base-{MODEL}-{DATASET}" / "w8a8.pt"
    settings = SearchSettings(
        model=MODEL, dataset=DATASET, out=out, strategy=strategy, episodes=episodes,
        seed=seed, workers=workers, verify=False, final_epochs=0, progress=False,
        base_checkpoint=base if base.is_file() else None,
    )  # fmt: skip
    for stale in out.glob(f"{strategy}-s{seed}.*"):  # a search of an earlier run
        stale.unlink()
    run_search(settings, log=lambda *a: None)
    return out / f"{strategy}-s{seed}.episodes.jsonl"


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of ``differences`` (over the seeds)."""
    if len(set(differences)) < 2:
        return differences[0], differences[0]
    result = stats.bootstrap((np.asarray(differences),), np.mean, random_state=0)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--strategies", nargs="+", default=["dqn", "ddpg"])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-lockstep"))
    args = parser.parse_args(argv)
    rows = []
    for strategy in args.strategies:
        curves = {way: [] for way in WAYS}
        for seed in args.seeds:
            for way, workers in WAYS.items():
                log = search(strategy, seed, args.episodes, workers, args.out, way)
                curves[way].append(best_after(log, args.step))
        points = min(len(c) for way in WAYS for c in curves[way])
        for point in range(points):
            ones = [c[point] for c in curves["1 env"]]
            twos = [c[point] for c in curves["2 envs"]]
            differences = [b - a for a, b in zip(ones, twos, strict=True)]
            rows.append(
                {
                    "strategy": strategy,
                    "evaluations": (point + 1) * args.step,
                    "best_1_env": statistics.mean(ones),
                    "best_2_envs": statistics.mean(twos),
                    "difference": statistics.mean(differences),
                    "interval": paired_interval(differences),
                    "seeds": args.seeds,
                }
            )
    print(f"best reward after N distinct evaluations, mean over seeds {args.seeds}")
    print(f"{'strategy':8s} {'N':>4s} {'1 env':>8s} {'2 envs':>8s} {'2 less 1 [95 % CI]':>26s}")
    for row in rows:
        low, high = row["interval"]
        print(
            f"{row['strategy']:8s} {row['evaluations']:4d} {row['best_1_env']:8.2f} "
            f"{row['best_2_envs']:8.2f} {row['difference']:+8.2f} [{low:+.2f}, {high:+.2f}]"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-lockstep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
