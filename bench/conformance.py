"""Models from other tools, compiled for ``cim``: one row per model of the conformance suite.

Per model: compiles or not, Conv/Gemm/MatMul nodes on the crossbars out of all, argmax
agreement and relative error of the crossbars' output against onnxruntime running the
same file node by node (and TVM's llvm build of the file, the yardstick) and against the
file's float64 evaluation by onnx's reference evaluator, whether every
layer's widths in the compile report equal the producer's, and the compile time. The
quantized models are small CNNs trained on digits here, measured on the whole digits test
split; the zoo's models through ``torch.export`` and the nine model-zoo graphs of the
``onnx`` package compile cost-only at their own sizes (224x224 for the ImageNet ones).

Goals: every model compiles; at least 95 % of all conv/gemm nodes on the crossbars;
agreement at least 99 % and a relative error no larger than llvm's; every width equal to
the producer's; each model-zoo graph in at most 30 s.

Usage: python bench/conformance.py [--samples N] [--skip-zoo]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conformance import suite  # noqa: E402

#: Zoo models compiled cost-only through ``torch.export``, at their own input sizes.
TORCH_MODELS = ["digits-cnn", "mnist1d-cnn", "resnet20", "resnet18", "vgg16", "mobilenetv2"]
#: Relative errors this small are float32 rounding, not a difference of computation.
FLOAT_NOISE = 1e-6

ORT_SETTINGS = [
    suite.OrtSettings(True, False, False),
    suite.OrtSettings(False, True, False),
    suite.OrtSettings(True, True, True),
    suite.OrtSettings(False, False, True),
]


def _cases(folder: Path, samples: int, zoo: bool):
    """``(kind, arguments)`` per row, in table order."""
    x, _ = suite.samples(samples)
    for model in suite.FLOAT_MODELS:
        float_path = suite.export_float(model, folder / f"{model}.onnx")
        for settings in ORT_SETTINGS:
            path = suite.quantize_with_onnxruntime(
                float_path, settings, folder / f"{model}-{settings.tag}.onnx"
            )
            widths = [(8, 8)] * len(suite.crossbar_nodes(path))
            yield suite.measure, (f"{model} {settings.tag}", "onnxruntime QDQ", path, x, widths)
    for name, producer, path, widths, reference in suite.brevitas_files(folder):
        yield suite.measure, (name, producer, path, x, widths, reference)
    for name in TORCH_MODELS:
        yield suite.measure_torch_export, (name,)
    if zoo:
        for path in suite.model_zoo_graphs():
            name = path.stem.removeprefix("light_")
            yield suite.measure_cost_only, (name, "onnx model zoo", path)


def _fmt(value, pattern="{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=360, help="digits test samples")
    parser.add_argument("--skip-zoo", action="store_true", help="leave out the model-zoo graphs")
    args = parser.parse_args()

    rows = []
    header = (
        f"{'model':<26} {'producer':<18} {'ok':<3} {'crossbar':>9} {'agree':>6} "
        f"{'llvm':>6} {'rel err':>8} {'llvm err':>8} {'f64 err':>8} {'llvm f64':>8} "
        f"{'widths':>6} {'compile s':>9}"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for measure, arguments in _cases(Path(tmp), args.samples, not args.skip_zoo):
            r = measure(*arguments)
            rows.append(r)
            widths = "-" if r.widths_equal is None else ("yes" if r.widths_equal else "NO")
            print(
                f"{r.name:<26} {r.producer:<18} {'yes' if r.compiled else 'NO':<3} "
                f"{f'{r.offloaded}/{r.nodes}':>9} {_fmt(r.agreement, '{:.3f}'):>6} "
                f"{_fmt(r.llvm_agreement, '{:.3f}'):>6} {_fmt(r.rel_error):>8} "
                f"{_fmt(r.llvm_rel_error):>8} {_fmt(r.exact_error, '{:.1e}'):>8} "
                f"{_fmt(r.llvm_exact_error, '{:.1e}'):>8} {widths:>6} {r.compile_s:>9.2f}",
                flush=True,
            )
            if r.error:
                print(f"    error: {r.error[:300]}")
            for entry in r.cpu:
                print(f"    on the CPU: {entry['name']}: {entry['reason']}")

    offloaded, nodes = sum(r.offloaded for r in rows), sum(r.nodes for r in rows)
    run = [r for r in rows if r.agreement is not None]
    print()
    print(f"compiled: {sum(r.compiled for r in rows)}/{len(rows)}")
    print(
        f"conv/gemm/matmul on the crossbars: {offloaded}/{nodes} ({100 * offloaded / nodes:.1f} %)"
    )
    if run:
        print(f"lowest argmax agreement with onnxruntime: {min(r.agreement for r in run):.4f}")
        worse = [r.name for r in run if r.rel_error > r.llvm_rel_error + FLOAT_NOISE]
        print(f"relative error above llvm's: {', '.join(worse) or 'none'}")
        print(
            "largest error against the file's float64 evaluation: "
            f"crossbars {max(r.exact_error for r in run):.1e}, "
            f"llvm {max(r.llvm_exact_error for r in run):.1e}"
        )
    checked = [r for r in rows if r.widths_equal is not None]
    print(f"widths equal to the producer's: {sum(r.widths_equal for r in checked)}/{len(checked)}")
    zoo = [r for r in rows if r.producer == "onnx model zoo" and r.compiled]
    if zoo:
        slowest = max(zoo, key=lambda r: r.compile_s)
        print(f"slowest model-zoo compile: {slowest.name} {slowest.compile_s:.1f} s")


if __name__ == "__main__":
    main()
