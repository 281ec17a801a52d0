"""Compile-time benchmark of the cim target on ImageNet-size models (random weights).

Prints, from one run: a plain llvm build of each model, the ``cim`` cost-only report, the
full ``cim`` compile (weight images, programs, TVM build) and a bit-exact functional
simulation of one image on the compiled core, with peak resident memory. The first image
also decodes and verifies each region's program; the second is timed on its own, split
into the simulator's core, the runtime's conversions (quantizing inputs, NCHW to rows and
back) and the rest (TVM's host operators), beside numpy's float32 GEMM time for the same
multiply-accumulates (the offloaded layers' M x K x N, on one BLAS thread where
threadpoolctl is installed, as the core runs). Targets (2-core machine): VGG-16 cost-only
<= 30 s, full compile <= 120 s, one simulated image <= 10 s, peak <= 6 GB; ResNet-18 full
compile plus one simulated image <= 60 s.

Usage: python bench/compile_models.py [--models vgg16,resnet18] [--skip-full]
"""

from __future__ import annotations

import argparse
import resource
import time
from functools import partial

import numpy as np
import tvm
from tvm import relax

import tvm_cim
from tvm_cim.compiler import runtime

R = relax.op


def _conv(bb, x, rng, cout, k=3, stride=1, pad=1):
    cin = int(x.ty.shape[1])
    w = (rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype("float32")
    b = (rng.standard_normal((1, cout, 1, 1)) * 0.01).astype("float32")
    y = bb.emit(R.nn.conv2d(x, relax.const(w), strides=stride, padding=pad))
    return bb.emit(R.add(y, relax.const(b)))


def _dense(bb, x, rng, n):
    k = int(x.ty.shape[1])
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype("float32")
    return bb.emit(R.add(bb.emit(R.matmul(x, relax.const(w))), relax.const(np.zeros(n, "float32"))))


def vgg16(rng):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    x = relax.Var("x", relax.TensorType((1, 3, 224, 224), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            h = x
            for v in cfg:
                if v == "M":
                    h = bb.emit(R.nn.max_pool2d(h, pool_size=2, strides=2))
                else:
                    h = bb.emit(R.nn.relu(_conv(bb, h, rng, v)))
            h = bb.emit(R.reshape(h, (1, 512 * 7 * 7)))
            h = bb.emit(R.nn.relu(_dense(bb, h, rng, 4096)))
            h = bb.emit(R.nn.relu(_dense(bb, h, rng, 4096)))
            out = bb.emit_output(_dense(bb, h, rng, 1000))
        bb.emit_func_output(out)
    return bb.get()


def resnet18(rng):
    x = relax.Var("x", relax.TensorType((1, 3, 224, 224), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            h = bb.emit(R.nn.relu(_conv(bb, x, rng, 64, k=7, stride=2, pad=3)))
            h = bb.emit(R.nn.max_pool2d(h, pool_size=3, strides=2, padding=1))
            for stage, ch in enumerate((64, 128, 256, 512)):
                for block in range(2):
                    stride = 2 if stage > 0 and block == 0 else 1
                    y = bb.emit(R.nn.relu(_conv(bb, h, rng, ch, stride=stride)))
                    y = _conv(bb, y, rng, ch)
                    skip = h
                    if stride != 1:
                        skip = _conv(bb, h, rng, ch, k=1, stride=stride, pad=0)
                    h = bb.emit(R.nn.relu(bb.emit(R.add(y, skip))))
            h = bb.emit(R.mean(h, axis=[2, 3]))
            out = bb.emit_output(_dense(bb, h, rng, 1000))
        bb.emit_func_output(out)
    return bb.get()


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class _RegionClock:
    """Seconds spent in the runtime's steps while installed (``with _RegionClock() as c``):
    ``prepare`` (decode and verify, once per program), ``convert`` (graph arrays to the
    program's integers and back), ``simulate`` (the simulator's run)."""

    STEPS = {"prepared_program": "prepare", "program_inputs": "convert", "graph_outputs": "convert"}

    def __init__(self):
        self.seconds = dict.fromkeys(("prepare", "convert", "simulate"), 0.0)
        self._saved = {}

    def _timing(self, step, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[step] += time.perf_counter() - start

        return timed

    def __enter__(self):
        for name, step in self.STEPS.items():
            self._saved[name] = getattr(runtime, name)
            setattr(runtime, name, self._timing(step, self._saved[name]))
        self._saved["run"] = runtime.Simulator.run
        runtime.Simulator.run = self._timing("simulate", self._saved["run"])
        return self

    def __exit__(self, *exc_info):
        runtime.Simulator.run = self._saved.pop("run")
        for name, fn in self._saved.items():
            setattr(runtime, name, fn)


def _gemm_shapes(report) -> list[tuple[int, int, int]]:
    """``(M, K, N)`` per offloaded layer for one image: weights are ``[K, N]``."""
    shapes = []
    for op in report.operators:
        k, n = op.weight_shape
        shapes.append((int(np.prod(op.out_shape)) // n, k, n))
    return shapes


def _gemm_seconds(shapes) -> float:
    """numpy's float32 time for ``[M, K] @ [K, N]`` of each shape (the best of two)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # the ambient thread count
        threadpool_limits = None
    rng = np.random.default_rng(1)
    total = 0.0
    for m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        best = float("inf")
        for _ in range(2):
            if threadpool_limits is None:
                _, seconds = _timed(partial(np.matmul, a, b))
            else:
                with threadpool_limits(1, user_api="blas"):
                    _, seconds = _timed(partial(np.matmul, a, b))
            best = min(best, seconds)
        total += best
    return total


def _simulate(vm, x, report, t_full):
    """Simulate one image twice (the first prepares each program); print the times."""
    with _RegionClock() as first:
        _, t_first = _timed(partial(vm["main"], tvm.runtime.tensor(x)))
    print(
        f"  simulate one image    {t_first:7.1f} s   (compile + run {t_full + t_first:.1f} s;"
        f" prepare {first.seconds['prepare']:.1f} s)   peak {_peak_gib():.2f} GiB"
    )
    with _RegionClock() as clock:
        _, t_run = _timed(partial(vm["main"], tvm.runtime.tensor(x)))
    shapes = _gemm_shapes(report)
    t_gemm = _gemm_seconds(shapes)
    seconds = clock.seconds
    rest = t_run - sum(seconds.values())
    print(
        f"  simulate again        {t_run:7.1f} s   = simulator {seconds['simulate']:.2f} s"
        f" + conversions {seconds['convert']:.2f} s + prepare {seconds['prepare']:.2f} s"
        f" + host {rest:.2f} s   peak {_peak_gib():.2f} GiB"
    )
    macs = sum(m * k * n for m, k, n in shapes)
    print(
        f"  numpy float32 GEMM    {t_gemm:7.2f} s   ({macs / 1e9:.1f} GMAC)"
        f"   simulation / GEMM {t_run / t_gemm:.1f}x"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet18")
    parser.add_argument("--skip-full", action="store_true", help="only llvm and cost-only")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    arch = tvm_cim.CimArch.preset("rram-4b")
    for name in args.models.split(","):
        mod = {"vgg16": vgg16, "resnet18": resnet18}[name](rng)
        x = rng.standard_normal((1, 3, 224, 224)).astype("float32")
        _, t_llvm = _timed(partial(tvm.compile, mod, target="llvm"))
        report, t_cost = _timed(partial(tvm_cim.cost_report, mod, arch=arch))
        print(
            f"{name}: {len(report.operators)} offloaded layers, W8A8 latency "
            f"{report.total_latency_us / 1e3:.1f} ms on {arch.name}"
        )
        print(f"  llvm build            {t_llvm:7.1f} s")
        print(
            f"  cim cost-only         {t_cost:7.1f} s   ({t_cost / t_llvm:.2f}x llvm)"
            f"   peak {_peak_gib():.2f} GiB"
        )
        if args.skip_full:
            continue
        compile_full = partial(tvm_cim.compile_for_cim, mod, arch=arch, calibration=[x])
        (ex, full), t_full = _timed(compile_full)
        print(
            f"  cim full compile      {t_full:7.1f} s   ({t_full / t_llvm:.2f}x llvm)"
            f"   peak {_peak_gib():.2f} GiB"
        )
        assert full.total_latency_us == report.total_latency_us
        _simulate(relax.VirtualMachine(ex, tvm.cpu()), x, report, t_full)


if __name__ == "__main__":
    main()
