"""Run every benchmark in turn (``make bench``); each prints ratios measured in one run."""

from __future__ import annotations

import runpy
from pathlib import Path

BENCHMARKS = [
    "sim_throughput.py",
    "compile_models.py",
    "crossbars.py",
    "transformers.py",
    "qat.py",
    "conformance.py",
]

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    for name in BENCHMARKS:
        print(f"== {name} ==")
        runpy.run_path(str(here / name), run_name="__main__")
        print()
