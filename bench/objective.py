"""Precision search on a many-crossbar chip: the scheduled makespan against the sequential
sum as the latency the search minimizes.

DQN searches digits-cnn on ``rram-4b`` with ``--crossbars`` crossbars once per objective
and seed, the same budget each. Every found policy is then measured the same way: its
scheduled latency (the total ``tvm-cim report`` prints on that chip) and its speedup
over W8A8's scheduled latency, beside its sum of instruction latencies and its drop
against W8A8 on the test split. The goal is the makespan objective's policies finishing
sooner on the chip at the same allowed drop.

    python bench/objective.py [--crossbars 16] [--episodes 150] [--seeds 0 1 2] \\
        [--out runs/bench-objective]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from tvm_cim.agent.latency import OBJECTIVES, LatencyTable
from tvm_cim.agent.search import SearchSettings, run_search
from tvm_cim.core.arch import CimArch
from tvm_cim.core.precision import W8A8
from tvm_cim.learn import zoo

MODEL, DATASET = "digits-cnn", "digits"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crossbars", type=int, default=16)
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-objective"))
    args = parser.parse_args()

    arch = CimArch.preset("rram-4b").replace(crossbars=args.crossbars)
    example = torch.zeros(1, *zoo.input_shape(MODEL))
    measured = {  # the same yardsticks for every found policy
        objective: LatencyTable.for_model(zoo.build(MODEL).eval(), example, arch, objective)
        for objective in OBJECTIVES
    }
    base = args.out / "makespan" / f"base-{MODEL}-{DATASET}" / "w8a8.pt"
    rows = []
    for objective in OBJECTIVES:
        for seed in args.seeds:
            settings = SearchSettings(
                model=MODEL,
                dataset=DATASET,
                out=args.out / objective,
                arch=arch,
                objective=objective,
                strategy="dqn",
                episodes=args.episodes,
                seed=seed,
                verify=False,
                final_epochs=0,
                progress=False,
                base_checkpoint=base if base.is_file() else None,  # one base model for all
            )
            began = time.perf_counter()
            result = run_search(settings, log=lambda *_: None)
            policy = result.best.policy
            makespan, sequential = measured["makespan"], measured["sequential"]
            row = {
                "objective": objective,
                "seed": seed,
                "scheduled_ms": makespan.latency(policy) / 1e3,
                "speedup": makespan.uniform_latency(W8A8) / makespan.latency(policy),
                "sequential_ms": sequential.latency(policy) / 1e3,
                "test_drop": result.confirmation["searched"]["drop"],
                "minutes": (time.perf_counter() - began) / 60,
            }
            rows.append(row)
            print(
                f"{objective:10s} seed {seed}: scheduled {row['scheduled_ms']:.3f} ms "
                f"({row['speedup']:.3f}x over W8A8), sequential {row['sequential_ms']:.3f} ms, "
                f"test drop {row['test_drop']:+.2f}, {row['minutes']:.1f} min",
                flush=True,
            )
    w8a8 = measured["makespan"].uniform_latency(W8A8) / 1e3
    print()
    print(
        f"{MODEL} on rram-4b with {args.crossbars} crossbars, DQN, {args.episodes} episodes, "
        f"seeds {args.seeds}; W8A8 scheduled {w8a8:.3f} ms. Mean (range) over the seeds:"
    )
    print(f"{'objective':10s} {'scheduled ms':>22s} {'speedup':>22s} {'test drop':>10s}")
    for objective in OBJECTIVES:
        group = [r for r in rows if r["objective"] == objective]
        print(
            f"{objective:10s} {_spread([r['scheduled_ms'] for r in group]):>22s} "
            f"{_spread([r['speedup'] for r in group]):>22s} "
            f"{statistics.mean(r['test_drop'] for r in group):+10.2f}"
        )


def _spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}..{max(values):.3f})"


if __name__ == "__main__":
    main()
