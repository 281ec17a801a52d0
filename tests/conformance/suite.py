"""The conformance suite: models made by other tools, compiled for ``cim`` and checked.

Each case is an ONNX file written by a producer people use (onnxruntime's quantizer,
Brevitas, a plain float export, the model-zoo graphs that ship with the ``onnx``
package), built here from models trained on the digits data set in a few seconds, so
that argmax agreement means something (a random network's logits are near ties). A case
is measured against onnxruntime running the same file, with TVM's own llvm build of it as
the yardstick, and its compile report's widths against the widths the producer wrote.

The tests run the cases on a few dozen samples; ``bench/conformance.py`` runs all of them
on the whole test split and prints one table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

#: Conv/Gemm/MatMul: the ONNX operators the crossbars can take.
CROSSBAR_OPS = ("Conv", "Gemm", "MatMul")
#: Samples per model call: the exported graphs have this static batch.
BATCH = 8


# ---------------------------------------------------------------- trained torch models


def _digits():
    from tvm_cim.learn import data

    return data.load("digits", seed=0)


def _residual_cnn():
    import torch.nn as nn

    class ResidualCNN(nn.Module):
        """conv -> (conv -> relu -> conv) + skip -> relu -> linear, on 8x8 digits."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.conv_a = nn.Conv2d(16, 16, 3, padding=1)
            self.conv_b = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16 * 8 * 8, 10)

        def forward(self, x):
            import torch

            h = torch.relu(self.stem(x))
            h = torch.relu(self.conv_b(torch.relu(self.conv_a(h))) + h)
            return self.head(torch.flatten(h, 1))

    return ResidualCNN()


def _separable_cnn():
    import torch.nn as nn

    class SeparableCNN(nn.Module):
        """A MobileNet-like stack: depthwise 3x3, pointwise 1x1, a grouped 3x3."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 16, 3, padding=1, groups=16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 1),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=4),
                nn.ReLU(),
                nn.Conv2d(32, 32, 3, padding=1, groups=32),
                nn.ReLU(),
            )
            self.head = nn.Linear(32 * 4 * 4, 10)

        def forward(self, x):
            import torch

            return self.head(torch.flatten(self.features(x), 1))

    return SeparableCNN()


#: ``(weight bits, input bits, input signed)`` per layer of the Brevitas CNN, in graph order.
BREVITAS_WIDTHS = [(4, 8, True), (2, 3, False), (5, 6, True), (3, 5, False), (8, 7, False)]


def brevitas_mixed_cnn(in_channels: int = 1, size: int = 8):
    """Four Brevitas convolutions and a linear layer, each with its own weight and input
    width (``BREVITAS_WIDTHS``): narrow-range signed weights as Brevitas defaults, signed
    (``QuantIdentity``) and unsigned (``QuantReLU``) activations, int32 biases."""
    import brevitas.nn as qnn
    import torch
    from brevitas.quant import Int32Bias

    def conv(cin, cout, w_bits, stride=1):
        return qnn.QuantConv2d(
            cin, cout, 3, stride=stride, padding=1, weight_bit_width=w_bits, bias_quant=Int32Bias
        )

    def act(bits, signed):
        if signed:
            return qnn.QuantIdentity(bit_width=bits, return_quant_tensor=True)
        return qnn.QuantReLU(bit_width=bits, return_quant_tensor=True)

    class MixedCnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            (w1, a1, s1), (w2, a2, s2), (w3, a3, s3), (w4, a4, s4), (w5, a5, s5) = BREVITAS_WIDTHS
            self.q1, self.c1 = act(a1, s1), conv(in_channels, 8, w1)
            self.q2, self.c2 = act(a2, s2), conv(8, 8, w2)
            self.q3, self.c3 = act(a3, s3), conv(8, 8, w3)
            self.q4, self.c4 = act(a4, s4), conv(8, 8, w4, stride=2)
            self.q5 = act(a5, s5)
            self.fc = qnn.QuantLinear(8 * (size // 2) ** 2, 10, bias=True, weight_bit_width=w5)

        def forward(self, x):
            x = self.c1(self.q1(x))
            x = self.c2(self.q2(x))
            x = self.c3(self.q3(x))
            x = self.c4(self.q4(x))
            return self.fc(torch.flatten(self.q5(x), 1))

    return MixedCnn()


def brevitas_files(folder: Path) -> list[tuple[str, str, Path, list, Path]]:
    """The Brevitas CNN trained on digits (quantization-aware), exported both ways:
    ``(name, producer, path, widths in graph order, onnxruntime reference)`` for its QCDQ
    and QONNX files."""
    import torch
    from brevitas.export import export_onnx_qcdq, export_qonnx

    from tvm_cim.learn.train import TrainConfig, fit

    torch.manual_seed(0)
    model = brevitas_mixed_cnn()
    fit(model, _digits(), TrainConfig(epochs=15, lr=3e-3, seed=0))
    model.eval()
    example = torch.zeros((BATCH, 1, 8, 8))
    qcdq, qonnx = folder / "brevitas-qcdq.onnx", folder / "brevitas-qonnx.onnx"
    export_onnx_qcdq(model, example, export_path=str(qcdq), input_names=["x"], dynamo=False)
    export_qonnx(model, example, export_path=str(qonnx), input_names=["x"])
    widths = [(w, a) for w, a, _ in BREVITAS_WIDTHS]
    return [
        ("mixed-cnn QCDQ", "Brevitas", qcdq, widths, qcdq),
        ("mixed-cnn QONNX", "Brevitas", qonnx, widths, qcdq),
    ]


#: Float models the onnxruntime cases quantize.
FLOAT_MODELS: dict[str, Callable] = {"residual": _residual_cnn, "separable": _separable_cnn}


@cache
def trained(name: str, epochs: int = 20):
    """The float model ``name`` trained on digits (seeded: the same weights every run)."""
    import torch

    from tvm_cim.learn.train import TrainConfig, fit

    torch.manual_seed(0)
    model = FLOAT_MODELS[name]()
    with torch.enable_grad():  # callers may be inside no_grad
        fit(model, _digits(), TrainConfig(epochs=epochs, lr=3e-3, seed=0))
    return model.eval()


def export_float(name: str, path: Path) -> Path:
    """The trained model ``name`` as a float ONNX file with a static batch of ``BATCH``."""
    import torch

    torch.onnx.export(
        trained(name),
        torch.zeros((BATCH, 1, 8, 8)),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamo=False,
        opset_version=13,
    )
    return path


def samples(count: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """``count`` digits of ``split`` (rounded down to whole batches) and their labels."""
    x, y = _digits().split(split)
    n = min(count, len(y)) // BATCH * BATCH
    return x[:n].astype(np.float32), y[:n]


# ---------------------------------------------------------------------- producers


@dataclass(frozen=True)
class OrtSettings:
    """The ``quantize_static`` settings of one onnxruntime case."""

    per_channel: bool = True
    dedicated_pairs: bool = False
    activation_symmetric: bool = False

    @property
    def tag(self) -> str:
        return (
            f"pc{int(self.per_channel)}-ded{int(self.dedicated_pairs)}"
            f"-sym{int(self.activation_symmetric)}"
        )


def quantize_with_onnxruntime(float_path: Path, settings: OrtSettings, path: Path) -> Path:
    """onnxruntime's ``quantize_static`` in QDQ format, calibrated on digits."""
    from onnxruntime import quantization as q

    class Calibration(q.CalibrationDataReader):
        def __init__(self):
            x, _ = samples(16 * BATCH, split="train")
            self.batches = iter({"x": b} for b in x.reshape(-1, BATCH, 1, 8, 8))

        def get_next(self):
            return next(self.batches, None)

    activation = q.QuantType.QInt8 if settings.activation_symmetric else q.QuantType.QUInt8
    q.quantize_static(
        str(float_path),
        str(path),
        Calibration(),
        quant_format=q.QuantFormat.QDQ,
        per_channel=settings.per_channel,
        activation_type=activation,
        weight_type=q.QuantType.QInt8,
        extra_options={
            "DedicatedQDQPair": settings.dedicated_pairs,
            "ActivationSymmetric": settings.activation_symmetric,
        },
    )
    return path


# ---------------------------------------------------------------------- measuring


def crossbar_nodes(path: Path) -> list[str]:
    """Names of the file's Conv/Gemm/MatMul nodes whose second operand is computed from
    constants alone (a weight, however the producer wrote it)."""
    import onnx

    graph = onnx.load(str(path)).graph
    constant = {i.name for i in graph.initializer}
    for node in graph.node:  # topological order
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return [
        node.name
        for node in graph.node
        if node.op_type in CROSSBAR_OPS and len(node.input) > 1 and node.input[1] in constant
    ]


@dataclass
class Result:
    """What one case measured."""

    name: str
    producer: str
    compiled: bool
    offloaded: int = 0
    nodes: int = 0
    agreement: float | None = None
    llvm_agreement: float | None = None
    rel_error: float | None = None
    llvm_rel_error: float | None = None
    exact_error: float | None = None
    llvm_exact_error: float | None = None
    widths_equal: bool | None = None
    compile_s: float = 0.0
    error: str = ""
    cpu: list = field(default_factory=list)


def _relative_error(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def run_batches(fn, x: np.ndarray) -> np.ndarray:
    """``fn`` over ``x`` in batches of ``BATCH``, outputs concatenated."""
    return np.concatenate([np.asarray(fn(x[i : i + BATCH])) for i in range(0, len(x), BATCH)])


def reference_session(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """onnxruntime running ``path`` node by node, as the file states it.

    Its graph optimizations are off: with them on, onnxruntime fuses QDQ groups into its
    own integer kernels, whose requantization differs from the file's semantics (on the
    digits residual CNN with symmetric int8 activations by 45 % relative, more than from
    the float model); node by node, TVM's llvm build of the file equals it exactly.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"x": batch})[0]


def exact_reference(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The file computed in float64 by onnx's own reference evaluator.

    onnxruntime and TVM's llvm build compute a QDQ graph's float operators in float32,
    and their sums round differently from the exact value; near a rounding boundary of
    the next QuantizeLinear that moves a code. The crossbars accumulate integer codes
    exactly, so this is the reference that tells which side is right. Float tensors
    become float64, and the opset rises to 21, the oldest the evaluator implements
    QuantizeLinear/DequantizeLinear for (their semantics are unchanged since 13).
    """
    import onnx
    from onnx import TensorProto, numpy_helper
    from onnx.reference import ReferenceEvaluator

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(init).astype(np.float64)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    graph = model.graph
    for info in [*graph.input, *graph.output, *graph.value_info]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 21)
    evaluator = ReferenceEvaluator(model)
    name = graph.input[0].name
    return lambda batch: evaluator.run(None, {name: batch.astype(np.float64)})[0]


def measure(
    name: str,
    producer: str,
    path: Path,
    x: np.ndarray,
    widths: list | None = None,
    reference: Path | None = None,
) -> Result:
    """Compile ``path`` for ``cim``, run it, onnxruntime and TVM's llvm build on ``x``.

    onnxruntime runs ``reference`` (default ``path``): a QONNX file's Quant nodes are not
    onnxruntime's, so its reference is the QCDQ export of the same model.

    ``widths`` lists the ``(w_bits, a_bits)`` the producer wrote per layer in graph
    order; the report's widths must equal them.
    """
    import tvm
    from tvm import relax

    import tvm_cim
    from tvm_cim.compiler.frontend import load_onnx

    nodes = crossbar_nodes(path)
    result = Result(name, producer, compiled=False, nodes=len(nodes))
    mod, names = load_onnx(path)
    start = time.perf_counter()
    try:
        ex, report = tvm_cim.compile_for_cim(mod, names=names)
    except Exception as exc:  # the table shows what failed instead of stopping
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.compile_s = time.perf_counter() - start
    result.compiled = True
    result.offloaded = sum(op.name in nodes for op in report.operators)
    result.cpu = report.cpu
    if widths is not None:
        got = [(op.w_bits, op.a_bits) for op in report.operators]
        result.widths_equal = got == [tuple(w) for w in widths]

    def vm_runner(executable):
        vm = relax.VirtualMachine(executable, tvm.cpu())
        return lambda batch: vm["main"](tvm.runtime.tensor(batch)).numpy()

    onnx_rt = run_batches(reference_session(reference or path), x)
    cim = run_batches(vm_runner(ex), x)
    llvm = run_batches(vm_runner(tvm.compile(mod, target="llvm")), x)
    result.agreement, result.llvm_agreement = _agreement(cim, onnx_rt), _agreement(llvm, onnx_rt)
    result.rel_error = _relative_error(cim, onnx_rt)
    result.llvm_rel_error = _relative_error(llvm, onnx_rt)
    exact = run_batches(exact_reference(reference or path), x)
    result.exact_error = _relative_error(cim, exact)
    result.llvm_exact_error = _relative_error(llvm, exact)
    return result


def model_zoo_graphs() -> list[Path]:
    """The model-zoo graphs that ship inside the ``onnx`` package (random weights)."""
    import onnx

    folder = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    return sorted(folder.glob("light_*.onnx"))


def _measure_cost_only(result: Result, load: Callable, layers: list[str]) -> Result:
    """``result`` filled in from loading (``load() -> (mod, names)``), partitioning and a
    cost-only lowering: how many of ``layers`` reach the crossbars, and the time it took."""
    import tvm_cim

    start = time.perf_counter()
    try:
        mod, names = load()
        report = tvm_cim.plan_for_cim(mod, names=names).cost_report()
    except Exception as exc:  # the table shows what failed instead of stopping
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.compile_s = time.perf_counter() - start
    result.compiled = True
    result.offloaded = sum(op.name in layers for op in report.operators)
    result.cpu = report.cpu
    return result


def measure_cost_only(name: str, producer: str, path: Path) -> Result:
    """Partition ``path`` and lower it for cost only; count what reaches the crossbars."""
    from tvm_cim.compiler.frontend import load_onnx

    nodes = crossbar_nodes(path)
    result = Result(name, producer, compiled=False, nodes=len(nodes))
    return _measure_cost_only(result, lambda: load_onnx(path), nodes)


def measure_torch_export(name: str) -> Result:
    """A zoo model through ``torch.export`` (random weights), cost-only: its ``Conv2d`` and
    ``Linear`` layers on the crossbars out of all."""
    import torch

    from tvm_cim.compiler.frontend import load_torch
    from tvm_cim.learn import zoo

    torch.manual_seed(0)
    model = zoo.build(name).eval()
    layers = zoo.quantizable_layers(model)
    result = Result(name, "torch.export", compiled=False, nodes=len(layers))
    example = torch.zeros((1, *zoo.input_shape(name)))
    return _measure_cost_only(result, lambda: load_torch(model, example), layers)
