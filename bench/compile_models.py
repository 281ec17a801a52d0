"""Compile-time benchmark of the cim target on ImageNet-size models (random weights).

Prints, from one run: a plain llvm build of each model, the ``cim`` cost-only report, the
full ``cim`` compile (weight images, programs, TVM build) and, for ResNet-18, a bit-exact
functional simulation of one image; with peak resident memory. Targets (2-core machine):
VGG-16 cost-only <= 30 s, full compile <= 120 s, peak <= 6 GB; ResNet-18 full compile plus
one simulated image <= 60 s.

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
        vm = relax.VirtualMachine(ex, tvm.cpu())
        _, t_run = _timed(partial(vm["main"], tvm.runtime.tensor(x)))
        print(
            f"  simulate one image    {t_run:7.1f} s   (compile + run {t_full + t_run:.1f} s)"
            f"   peak {_peak_gib():.2f} GiB"
        )


if __name__ == "__main__":
    main()
