"""Peak memory and time of simulating a program with many crossbar images.

    python bench/sim_memory.py [--k 25088] [--n 4096] [--batch 1] [--backend cython]

Lowers one ``[K, N]`` int8 matmul (by default VGG-16's first fully connected layer,
thousands of 256x256 images) for the ``"rram-4b"`` preset, then prepares and runs it
once. Each backend runs in a process of its own: the resident memory after building the
program, the peak while preparing and running it (``ru_maxrss``, reset after the build
where Linux allows), what that adds, and the seconds each step took.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import numpy as np

from tvm_cim import CimArch
from tvm_cim.codegen import lower_matmul
from tvm_cim.sim import Simulator, available_backends


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Restart ``ru_maxrss`` from the current resident size (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(k: int, n: int, batch: int, backend: str) -> None:
    rng = np.random.default_rng(0)
    weight = rng.integers(-128, 128, (k, n), dtype=np.int8)
    x = rng.integers(0, 256, (batch, k))
    start = time.perf_counter()
    program = lower_matmul(weight, w_bits=8, a_bits=8, arch=CimArch.preset("rram-4b"))
    build_s = time.perf_counter() - start
    del weight
    cells_mib = sum(img.cells.nbytes for img in program.images) / 2**20
    built_mib = resident_mib()
    reset_peak()

    sim = Simulator(backend=backend)
    start = time.perf_counter()
    prepared = sim.prepare(program)
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    y = sim.run(prepared, {"x": x}).outputs["y"]
    run_s = time.perf_counter() - start
    assert y.shape == (batch, n)
    print(
        f"{backend:<7} {len(program.images):>6} {cells_mib:>9.0f} {built_mib:>9.0f} "
        f"{peak_mib():>9.0f} {peak_mib() - built_mib:>+9.0f} "
        f"{build_s:>7.1f} {prepare_s:>9.2f} {run_s:>7.2f}",
        flush=True,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=25088)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--backend", choices=available_backends())
    args = parser.parse_args(argv)
    if args.backend:
        measure(args.k, args.n, args.batch, args.backend)
        return
    print(f"[{args.k}, {args.n}] int8 matmul, W8A8, rram-4b, batch {args.batch}")
    print(
        f"{'backend':<7} {'images':>6} {'cells MiB':>9} {'built MiB':>9} {'peak MiB':>9} "
        f"{'run adds':>9} {'build s':>7} {'prepare s':>9} {'run s':>7}"
    )
    for backend in available_backends():
        flags = ["--k", str(args.k), "--n", str(args.n), "--batch", str(args.batch)]
        subprocess.run([sys.executable, __file__, *flags, "--backend", backend], check=True)


if __name__ == "__main__":
    main()
