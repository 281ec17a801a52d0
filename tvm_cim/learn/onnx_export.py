"""ONNX export of PyTorch models, with each layer's node named by its module path.

``write_onnx`` is the one export path of the learning side: the model zoo writes float
graphs with it (``tvm_cim.learn.zoo.export_onnx``) and QAT writes QDQ graphs
(``tvm_cim.learn.qat.export_onnx``). It traces the model in eval mode with PyTorch's
TorchScript-based exporter at opset 17 (input ``x``, output ``y``), optionally folds
computations on constants, applies the caller's graph rewrite, renames the ``Conv``,
``Gemm`` and ``MatMul`` nodes of the chosen layers to their ``named_modules()`` paths (so
precision configs written against the PyTorch model name the same layers in the ONNX
file) and writes the file.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn

__all__ = ["OPSET", "write_onnx", "fold_constant_nodes", "name_layer_nodes"]

OPSET = 17

#: Node types a crossbar layer becomes, renamed to the layer's module path.
LAYER_OPS = ("Conv", "Gemm", "MatMul")

# Warnings of the TorchScript-based exporter that say nothing about the model at hand (its
# deprecation, and constant folding it leaves to ``fold_constant_nodes``).
_EXPORTER_NOISE = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "Constant folding - Only steps=1",
)
_SUFFIX = re.compile(r"_\d+$")


def write_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    fold_constants: bool,
    layers: Collection[str] | None = None,
    rewrite: Callable[[object], None] | None = None,
) -> Path:
    """Export ``model`` to an ONNX file, naming layer nodes by module path.

    Parameters
    ----------
    model
        The model; the training mode of each of its modules is restored afterwards.
    example_input
        A batch to trace with; its shape becomes the graph input's.
    path
        The ``.onnx`` file to write; missing parent folders are created.
    fold_constants
        Let the exporter fold constants and fold the small computations on ``Constant``
        nodes it leaves behind (``fold_constant_nodes``). QAT keeps weights and their
        scales apart instead, so it passes ``False``.
    layers
        Module paths whose nodes are renamed; all modules when ``None``.
    rewrite
        Called with the ``onnx.ModelProto`` before the nodes are renamed and the file is
        written, to change the graph in place.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import onnx

    proto = onnx.load_from_string(_trace(model, example_input, fold_constants))
    if fold_constants:
        fold_constant_nodes(proto)
    if rewrite is not None:
        rewrite(proto)
    name_layer_nodes(proto, model, layers)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def _trace(model: nn.Module, example_input: torch.Tensor, fold: bool) -> bytes:
    """The serialized ONNX graph of ``model`` in eval mode; the modes are restored after."""
    buffer = io.BytesIO()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with warnings.catch_warnings():
            for message in _EXPORTER_NOISE:
                warnings.filterwarnings("ignore", message=message)
            torch.onnx.export(
                model,
                (example_input,),
                buffer,
                input_names=["x"],
                output_names=["y"],
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=fold,
            )
    finally:
        for module, mode in modes:
            module.training = mode
    return buffer.getvalue()


def _module_path(node_name: str, modules: Collection[str]) -> str | None:
    """Module path behind a legacy-exporter node name, or ``None``.

    The exporter names a node by its module scopes, each scope by the module's path from
    its last non-numeric part on: ``/layer1/layer1.0/conv1/Conv`` is ``layer1.0.conv1`` and
    ``/features/features.1/conv/conv.0/conv.0.0/Conv`` is ``features.1.conv.0.0``.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    path = last = ""
    for part in parts:
        if last and part.startswith(last + "."):
            path = path[: len(path) - len(last)] + part
        else:
            path = f"{path}.{part}" if path else part
        last = part
    if path in modules:
        return path
    path = _SUFFIX.sub("", path)
    return path if path in modules else None


def name_layer_nodes(proto, model: nn.Module, layers: Collection[str] | None = None) -> None:
    """Rename the ``Conv``, ``Gemm`` and ``MatMul`` nodes of layers to their module paths.

    A module that emits several such nodes gets ``_1``, ``_2`` suffixes on the later ones;
    nodes of other modules keep the exporter's names.

    Parameters
    ----------
    proto
        The ``onnx.ModelProto`` exported from ``model``, changed in place.
    model
        The exported model, for its module paths.
    layers
        Module paths to name nodes after; all modules when ``None``.
    """
    modules = set(dict(model.named_modules()) if layers is None else layers)
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        module_path = _module_path(node.name, modules)
        if module_path is None:
            continue
        count = seen.get(module_path, 0)
        seen[module_path] = count + 1
        node.name = module_path if count == 0 else f"{module_path}_{count}"


def fold_constant_nodes(proto, max_elements: int = 4096) -> None:
    """Replace small nodes computed from ``Constant`` nodes alone by ``Constant`` nodes.

    The exporter leaves index arithmetic on constants in the graph (for example the pads of
    a ``Pad``), which importers then see as dynamic. Nodes reading initializers (weights)
    are left alone; unused ``Constant`` nodes are removed afterwards.

    Parameters
    ----------
    proto
        The ``onnx.ModelProto``, changed in place.
    max_elements
        Largest result folded into a constant.
    """
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    opsets = {op.domain: op.version for op in proto.opset_import}
    values: dict = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attrs = {a.name: a for a in node.attribute}
            if set(attrs) == {"value"}:
                values[node.output[0]] = numpy_helper.to_array(attrs["value"].t)
            nodes.append(node)
            continue
        inputs = [i for i in node.input if i]
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type.startswith("Random")
            or node.op_type == "Bernoulli"
            or not inputs
            or not all(i in values for i in inputs)
        ):
            nodes.append(node)
            continue
        try:
            outputs = ReferenceEvaluator(node, opsets=opsets).run(
                None, {i: values[i] for i in inputs}
            )
        except Exception:
            nodes.append(node)
            continue
        if any(getattr(o, "size", max_elements + 1) > max_elements for o in outputs):
            nodes.append(node)
            continue
        for k, (name, value) in enumerate(zip(node.output, outputs)):
            values[name] = value
            nodes.append(
                helper.make_node(
                    "Constant",
                    [],
                    [name],
                    name=f"{node.name}_folded_{k}" if node.name else "",
                    value=numpy_helper.from_array(value, name),
                )
            )
    used = {i for node in nodes for i in node.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
