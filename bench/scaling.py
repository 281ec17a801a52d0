"""Scaling benchmark: episodes per minute of a search with 1 and 2 Dask workers, and a
projection to 64 workers.

For ``digits-cnn`` on ``digits`` and the deep ``mnist1d-resnet`` on ``mnist1d-80k``, a
random search (its cost is its measurements alone, and it plays the same episodes for
every worker count) runs the same episodes three ways, in the same run: in this process
(the task time, ``t``), on a local cluster of 1 worker and on one of 2 (``--workers``).
The rate counts the strategy's loop only (the sum of the log's episode times), not the
base model, latency table or start-up. Goal: 2 workers at least 1.7x the rate of 1.

Projection. With ``T1`` the time per measurement on 1 worker and ``T2`` the time per
batch of 2 on 2 workers, the coordination cost of a batch of ``n`` is modelled as
``c0 + n * c1`` on top of the task time: ``c0 + c1 = T1 - t`` and ``c1 = T2 - T1``
(clipped at 0), so ``n`` workers reach ``n * T1 / (t + c0 + n * c1)`` times the rate of
one. DQN and DDPG learn from whole rounds, and TPE suggests a batch knowing only the
trials before it, so the figure is the measurement throughput, not the search quality.

    python bench/scaling.py [--episodes 24] [--models digits-cnn mnist1d-resnet]
        [--out runs/bench-scaling]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tvm_cim.agent.log import EpisodeLog
from tvm_cim.agent.search import SearchSettings, run_search

MODELS = {"digits-cnn": "digits", "mnist1d-resnet": "mnist1d-80k"}
GOAL = 1.7
PROJECTED = 64


def _loop_seconds(out: Path) -> tuple[float, int]:
    """The strategy loop's wall time (the log's episode times) and its episodes."""
    records = EpisodeLog.read_records(out / "random-s0.episodes.jsonl")
    episodes = [r for r in records if r["type"] == "episode"]
    return sum(r["seconds"] for r in episodes), len(episodes)


def measure(model: str, episodes: int, root: Path) -> dict:
    """The three runs of one model; the base model is trained once in ``root``."""
    rates, measured = {}, {}
    for label, workers in (("in-process", None), ("1 worker", 1), ("2 workers", 2)):
        out = root / model / label.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        base = root / model / f"base-{model}-{MODELS[model]}"
        if base.is_dir():
            shutil.copytree(base, out / base.name)
        settings = SearchSettings(
            model=model, dataset=MODELS[model], out=out, strategy="random", episodes=episodes,
            workers=workers, verify=False, final_epochs=0, progress=False,
        )  # fmt: skip
        result = run_search(settings, log=lambda *a: None)
        if not base.is_dir():
            shutil.copytree(out / base.name, base)
        seconds, played = _loop_seconds(out)
        rates[label] = played / seconds * 60
        measured[label] = (seconds, result.evaluations - 3)  # less the uniform points
    task = measured["in-process"][0] / measured["in-process"][1]
    one = measured["1 worker"][0] / measured["1 worker"][1]
    two = measured["2 workers"][0] / (measured["2 workers"][1] / 2)
    per_task = max(two - one, 0.0)
    fixed = max(one - task - per_task, 0.0)
    projection = PROJECTED * one / (task + fixed + PROJECTED * per_task)
    return {
        "model": model,
        "episodes": episodes,
        "episodes_per_min": rates,
        "speedup_2_vs_1": rates["2 workers"] / rates["1 worker"],
        "task_s": task,
        "batch_overhead_s": fixed,
        "per_task_overhead_s": per_task,
        f"projected_speedup_{PROJECTED}": projection,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    args = parser.parse_args(argv)
    rows = [measure(model, args.episodes, args.out) for model in args.models]
    print(f"{'model':16s} {'in-proc/min':>11s} {'1 w/min':>8s} {'2 w/min':>8s} "
          f"{'2 vs 1':>7s} {'task s':>7s} {'64 w proj':>9s}")  # fmt: skip
    for row in rows:
        rate = row["episodes_per_min"]
        print(
            f"{row['model']:16s} {rate['in-process']:11.1f} {rate['1 worker']:8.1f} "
            f"{rate['2 workers']:8.1f} {row['speedup_2_vs_1']:6.2f}x {row['task_s']:7.2f} "
            f"{row[f'projected_speedup_{PROJECTED}']:8.1f}x"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-scaling.json").write_text(json.dumps(rows, indent=1))
    met = all(row["speedup_2_vs_1"] >= GOAL for row in rows)
    print(f"goal (2 workers >= {GOAL}x the rate of 1): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
