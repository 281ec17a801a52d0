"""Scaling benchmark: episodes per minute of a search with 1 and 2 Dask workers, and a
projection to 64 workers.

For ``digits-cnn`` on ``digits`` and the deep ``mnist1d-resnet`` on ``mnist1d-80k``, a
random search (its cost is its measurements alone, and it plays the same episodes for
every worker count) runs the same episodes three ways: in this process, on a local
cluster of 1 worker and on one of 2 (the cluster ``--workers N`` starts, joined here
through its address so that the scheduler's task stream can be read). The runs are
repeated ``--repeats`` times, interleaved, with seeds 0, 1, ...; the rates are shown as
the median and the range of the repeats. A rate counts the strategy's loop only (the
sum of the log's episode times), not the base model, latency table or start-up. Goal:
2 workers at least 1.7x the rate of 1 (on this machine's 2 cores, next to the driver and
the scheduler). The machine's own ceiling, measured in the same repeat: two searches of
the same episodes run as two plain processes at once, with no Dask (``2 processes``: the
sum of their rates); it shows what two measurements at once cost the cores (shared
caches and memory bandwidth) apart from any engine. The two start together, but a
loop of seconds (digits-cnn) overlaps its twin's only in part, which overstates it there.

Projection. From the task stream, each measurement's compute time on its worker; the
rest of a batch's wall time on 1 worker, ``c1``, is coordination. Dask's own cost of a
batch of ``n`` tasks, ``d(n)``, is measured on the 2-worker cluster with an evaluation
that returns at once (``n`` up to 64: the scheduler handles every task of the batch); the
rest of ``c1``, ``s = c1 - d(1)``, is the driver's serial work per episode. A batch of
``n`` is modelled as ``E[max of n task times] + d(n) + n * s``, the slowest of ``n`` drawn
from the 1-worker task times (a batch waits for its slowest), so ``n`` workers reach
``n * (t + c1) / (E[max_n] + d(n) + n * s)`` times the rate of one, with every worker on
a core of its own. DQN and DDPG learn from whole rounds, and TPE suggests a batch knowing
only the trials before it, so the figure is the measurement throughput, not the search
quality per evaluation (``bench/lockstep.py`` measures that for DQN and DDPG).

    python bench/scaling.py [--episodes 24] [--repeats 3] [--models ...]
        [--out runs/bench-scaling]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tvm_cim.agent.cluster import local_cluster
from tvm_cim.agent.log import EpisodeLog
from tvm_cim.agent.search import UNIFORM, SearchSettings, run_search

MODELS = {"digits-cnn": "digits", "mnist1d-resnet": "mnist1d-80k"}
RUNS = {"in-process": None, "1 worker": 1, "2 workers": 2}
GOAL = 1.7
PROJECTED = (8, 64)
REFERENCES = len(UNIFORM)  # the uniform points, measured before the loop


def _loop_seconds(out: Path, seed: int) -> float:
    """The strategy loop's wall time: the sum of the log's episode times."""
    records = EpisodeLog.read_records(out / f"random-s{seed}.episodes.jsonl")
    return sum(r["seconds"] for r in records if r["type"] == "episode")


def _measurements(stream) -> list[tuple[float, str]]:
    """Each measurement's compute time and worker, in the order they started."""
    tasks = []
    for task in stream:
        if not str(task["key"]).startswith("_measured"):
            continue
        for part in task["startstops"]:
            if part["action"] == "compute":
                tasks.append((part["start"], part["stop"] - part["start"], task["worker"]))
    return [(seconds, worker) for _, seconds, worker in sorted(tasks)]


def _search(model: str, episodes: int, seed: int, out: Path, base: Path, workers, address):
    shutil.rmtree(out, ignore_errors=True)
    if base.is_dir():
        shutil.copytree(base, out / base.name)
    settings = SearchSettings(
        model=model, dataset=MODELS[model], out=out, strategy="random", episodes=episodes,
        seed=seed, workers=workers, cluster=address, verify=False, final_epochs=0,
        progress=False,
    )  # fmt: skip
    result = run_search(settings, log=lambda *a: None)
    if not base.is_dir():
        shutil.copytree(out / base.name, base)
    return result


def _two_processes(model: str, episodes: int, seed: int, root: Path, base: Path) -> float:
    """Episodes per minute of two plain ``tvm-cim search`` processes run at once."""
    runs = []
    for copy in (0, 1):
        out = root / model / f"2-processes-{copy}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out / base.name)
        command = [
            sys.executable, "-m", "tvm_cim.cli.main", "search", "--model", model,
            "--dataset", MODELS[model], "--strategy", "random", "--episodes", str(episodes),
            "--seed", str(seed), "--out", str(out), "--final-epochs", "0", "--no-verify",
            "--no-progress",
        ]  # fmt: skip
        runs.append((out, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
    for _, process in runs:
        if process.wait() != 0:
            raise SystemExit(f"a plain search process failed ({process.args})")
    return sum(episodes / _loop_seconds(out, seed) * 60 for out, _ in runs)


def run_once(model: str, episodes: int, seed: int, root: Path) -> dict:
    """One repeat: the four runs of ``model`` with ``seed``."""
    from distributed import Client, get_task_stream

    base = root / model / f"base-{model}-{MODELS[model]}"
    row = {}
    for label, workers in RUNS.items():
        out = root / model / label.replace(" ", "-")
        if workers is None:
            result = _search(model, episodes, seed, out, base, None, None)
            compute = placement = None
        else:
            with local_cluster(workers) as cluster, Client(cluster) as client:
                address = cluster.scheduler_address
                with get_task_stream(client) as stream:
                    result = _search(model, episodes, seed, out, base, workers, address)
                measurements = _measurements(stream.data)[REFERENCES:]
                compute = [seconds for seconds, _ in measurements]
                placement = [worker for _, worker in measurements]
        loop = _loop_seconds(out, seed)
        measured = result.evaluations - REFERENCES
        batches = -(-measured // (workers or 1))
        row[label] = {
            "episodes_per_min": episodes / loop * 60,
            "seconds_per_measurement": loop / measured,
            "compute_s": compute,
            "workers": placement,
            # the wall time of the batches less their slowest measurement
            "coordination_per_batch_s": None
            if compute is None
            else (loop - sum(max(compute[i : i + workers]) for i in range(0, measured, workers)))
            / batches,
        }
    row["2 processes"] = {"episodes_per_min": _two_processes(model, episodes, seed, root, base)}
    return row


def engine_seconds(sizes, rounds: int = 20) -> dict[int, float]:
    """Median wall time of a batch of ``n`` instant measurements on 2 local workers."""
    from tvm_cim.agent.cluster import EvaluationPool
    from tvm_cim.core.precision import Bits

    with EvaluationPool.open(2) as pool:
        pool.bind(len)  # the "accuracy" of a precision: its number of operators, at once
        seconds = {}
        for n in sizes:
            batch = [{"layer": Bits(8, 8)}] * n
            pool.measure(batch)
            times = []
            for _ in range(rounds):
                began = time.perf_counter()
                pool.measure(batch)
                times.append(time.perf_counter() - began)
            seconds[n] = statistics.median(times)
    return seconds


def _serial(repeats: list[dict], engine: dict[int, float]) -> float:
    """The driver's serial work per episode: 1-worker coordination less Dask's own."""
    c1 = statistics.median(r["1 worker"]["coordination_per_batch_s"] for r in repeats)
    return max(c1 - engine[1], 0.0)


def projection(repeats: list[dict], engine: dict[int, float], workers: int) -> float:
    """The rate of ``workers`` workers over that of one, from the measured parts."""
    one = [t for r in repeats for t in r["1 worker"]["compute_s"]]
    c1 = statistics.median(r["1 worker"]["coordination_per_batch_s"] for r in repeats)
    serial = _serial(repeats, engine)
    draws = np.random.default_rng(0).choice(one, size=(10_000, workers))
    slowest = draws.max(axis=1).mean()
    return workers * (statistics.mean(one) + c1) / (slowest + engine[workers] + workers * serial)


def summarize(model: str, episodes: int, repeats: list[dict], engine: dict) -> dict:
    rates = {label: [r[label]["episodes_per_min"] for r in repeats] for label in repeats[0]}

    def ratios(label: str, baseline: str) -> list[float]:
        return [a / b for a, b in zip(rates[label], rates[baseline], strict=True)]

    return {
        "model": model,
        "episodes": episodes,
        "repeats": repeats,
        "episodes_per_min": rates,
        "speedup_2_vs_1": ratios("2 workers", "1 worker"),
        "ceiling_2_vs_1": ratios("2 processes", "in-process"),
        "task_s": statistics.median(t for r in repeats for t in r["1 worker"]["compute_s"]),
        "coordination_per_batch_s": {
            label: [r[label]["coordination_per_batch_s"] for r in repeats]
            for label in ("1 worker", "2 workers")
        },
        "engine_per_batch_s": engine,
        "serial_per_episode_s": _serial(repeats, engine),
        "projected_speedup": {n: projection(repeats, engine, n) for n in PROJECTED},
    }


def _spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scaling"))
    args = parser.parse_args(argv)
    engine = engine_seconds(sorted({1, *PROJECTED}))
    rows = []
    for model in args.models:
        repeats = [run_once(model, args.episodes, seed, args.out) for seed in range(args.repeats)]
        rows.append(summarize(model, args.episodes, repeats, engine))
    print(f"episodes per minute, median [range] of {args.repeats} repeats")
    labels = list(rows[0]["episodes_per_min"])
    print(f"{'model':15s} " + " ".join(f"{label:>19s}" for label in labels)
          + f" {'2 workers / 1':>17s} {'2 processes / 1':>17s}")  # fmt: skip
    for row in rows:
        rate = row["episodes_per_min"]
        print(
            f"{row['model']:15s} "
            + " ".join(f"{_spread(rate[label]):>19s}" for label in labels)
            + f" {_spread(row['speedup_2_vs_1'], 2):>17s} {_spread(row['ceiling_2_vs_1'], 2):>17s}"
        )
    print(f"\n{'model':15s} {'task s':>7s} {'coord ms':>8s} {'serial ms':>9s} "
          + " ".join(f"{f'{n} workers':>10s}" for n in PROJECTED))  # fmt: skip
    for row in rows:
        coordination = row["coordination_per_batch_s"]["1 worker"]
        print(
            f"{row['model']:15s} {row['task_s']:7.2f} {1000 * statistics.median(coordination):8.1f} "
            f"{1000 * row['serial_per_episode_s']:9.1f} "
            + " ".join(f"{row['projected_speedup'][n]:9.1f}x" for n in PROJECTED)
        )
    print(
        "task: a measurement on 1 worker; coord: the rest of a batch's wall time on 1 worker; "
        "serial: the driver's part of it; projected: the rate over 1 worker's. Dask's wall "
        "time of a batch of n instant tasks: "
        + ", ".join(f"{n}: {1000 * seconds:.1f} ms" for n, seconds in engine.items())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-scaling.json").write_text(json.dumps(rows, indent=1))
    met = all(statistics.median(row["speedup_2_vs_1"]) >= GOAL for row in rows)
    print(f"goal (median of 2 workers >= {GOAL}x the rate of 1): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
