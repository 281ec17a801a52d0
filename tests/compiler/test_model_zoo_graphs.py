"""The ONNX model-zoo graphs that ship inside the ``onnx`` package compile cost-only at
224x224 with their Conv/Gemm layers on the crossbars.

Their weights are computed from constants (``ConstantOfShape``), so every layer reaches the
crossbars only through constant folding. The counts are read from each ONNX graph: every
Conv/Gemm/MatMul node is offloaded except, at most, grouped convolutions.
"""

from __future__ import annotations

from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from tvm_cim.compiler.frontend import load_onnx, onnx_operator_names  # noqa: E402
from tvm_cim.compiler.plan import plan_for_cim  # noqa: E402
from tvm_cim.relay_passes.extract import read_region  # noqa: E402
from tvm_cim.relay_passes.partition import offloaded_functions  # noqa: E402

ZOO = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]


def _layers(model) -> tuple[list[str], set[str]]:
    """Names of the Conv/Gemm/MatMul nodes, and those of the grouped convolutions."""
    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    names = onnx_operator_names(model)
    assert len(names) == len(nodes)
    grouped = {
        name
        for name, n in zip(names, nodes)
        if any(a.name == "group" and a.i != 1 for a in n.attribute)
    }
    return names, grouped


def _offloaded_per_call(mod) -> int:
    """Operators ``main`` runs on the crossbars, counted per call: layers alike in shape
    and weights share one partitioned function."""
    ops = {gv: len(read_region(gv.name_hint, fn).ops) for gv, fn in offloaded_functions(mod)}
    return sum(
        ops.get(b.value.op, 0)
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call)
    )


@pytest.mark.parametrize("name", MODELS)
def test_model_zoo_graph_compiles_cost_only_with_its_layers_offloaded(name):
    path = ZOO / f"light_{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not shipped by this onnx package")
    layers, grouped = _layers(onnx.load(str(path)))
    mod, names = load_onnx(path)
    assert names == layers
    assert [int(d) for d in mod["main"].params[0].ty.shape] == [1, 3, 224, 224]
    plan = plan_for_cim(mod, names=names)
    report = plan.cost_report()
    on_cpu = {entry["name"] for entry in plan.cpu}
    assert on_cpu <= grouped, plan.cpu
    assert _offloaded_per_call(plan.module) == len(layers) - len(on_cpu)
    assert report.operators and all(op.latency_us > 0 for op in report.operators)
