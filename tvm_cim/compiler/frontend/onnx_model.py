"""ONNX files into Relax modules, with the node names of the operators the crossbars may run.

``load_onnx`` returns, beside the module, the ONNX node names of the offloadable operators
in the order the partitioner meets them, so that reports and precision configs use the
model's own names. ONNX and TVM are imported on first use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.messages import tvm_message

from .module import count_anchors
from .qonnx_model import from_qonnx

#: ONNX operators whose import emits exactly one ``relax.matmul`` or ``relax.nn.conv2d``
#: (``Conv`` only with a 2-D kernel).
ANCHOR_OP_TYPES = (
    "Conv",
    "ConvInteger",
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "MatMulInteger16",
    "Attention",
)

# Operators a convolution weight passes through on its way from an initializer.
_WEIGHT_PASSTHROUGH = ("DequantizeLinear", "Identity", "Cast")

#: Quantized operators of the operator-oriented format (onnxruntime's
#: ``QuantFormat.QOperator``, standard and ``com.microsoft``), which TVM's ONNX frontend
#: does not import; the same quantization in QDQ format does.
QOPERATOR_TYPES = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "QAttention",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearWhere",
    "QLinearReduceMean",
)


def _refuse_qoperator_nodes(model, path: Path) -> None:
    """Name the first operator-format quantized node, and how to export the model instead."""
    for index, node in enumerate(model.graph.node):
        if node.op_type in QOPERATOR_TYPES:
            name = node.name or f"#{index}"
            raise CimError(
                f"{path}: node {name!r} is a {node.op_type}, a QOperator-format quantized "
                "operator that the TVM ONNX frontend cannot import; quantize the model in QDQ "
                "format instead (onnxruntime: quantize_static(..., quant_format=QuantFormat.QDQ))"
            )


def _read_model(path: Path):
    import onnx
    from google.protobuf.message import DecodeError

    if not path.exists():
        raise CimError(f"model file {path} does not exist")
    if not path.is_file():
        raise CimError(f"model file {path} is not a file")
    try:
        model = onnx.load(str(path))
    except DecodeError as exc:
        raise CimError(
            f"{path} is not a valid ONNX model (truncated or corrupt file: {exc})"
        ) from None
    except OSError as exc:
        raise CimError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise CimError(f"cannot load {path} as an ONNX model: {exc}") from None
    if model.ir_version < 3 or not model.graph.node:
        raise CimError(
            f"{path} is not a usable ONNX model (IR version {model.ir_version}, "
            f"{len(model.graph.node)} nodes); is the file empty or truncated?"
        )
    return model


def graph_inputs(model) -> list:
    """The ONNX graph inputs that are not initializers (the model's real inputs)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _dims(value_info) -> list | None:
    """Dimensions of a graph input: ints, dimension names (str) or None; None if no rank."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def _format_dims(dims: list | None) -> str:
    if dims is None:
        return "unknown rank"
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _shape_dict(model, path: Path, input_shapes: Mapping[str, Sequence[int]] | None) -> dict:
    """Static shapes of every graph input; ``CimError`` for a dynamic one not given."""
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    given = dict(input_shapes or {})
    unknown = [n for n in given if n not in names]
    if unknown:
        raise CimError(
            f"{path}: --input-shape names {unknown[0]!r}, which is not a model input; "
            f"inputs: {', '.join(names) or 'none'}"
        )
    shapes = {}
    for value_info in inputs:
        name = value_info.name
        dims = _dims(value_info)
        if name in given:
            shape = tuple(given[name])
            if not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
                raise CimError(f"input {name!r}: dimensions must be positive integers, got {shape}")
            if dims is not None and len(dims) != len(shape):
                raise CimError(
                    f"input {name!r}: the model gives {len(dims)} dimensions "
                    f"{_format_dims(dims)}, the shape given has {len(shape)} {list(shape)}"
                )
            shapes[name] = [int(d) for d in shape]
            continue
        if dims is None:
            raise CimError(
                f"input {name!r} has no known shape; give one with --input-shape {name}:D0,D1,..."
            )
        if not all(isinstance(d, int) for d in dims):
            example = ",".join(str(d) if isinstance(d, int) else "1" for d in dims)
            raise CimError(
                f"input {name!r} has a dynamic shape {_format_dims(dims)}; give a static one "
                f"with --input-shape, e.g. --input-shape {name}:{example}"
            )
        shapes[name] = dims
    return shapes


def _conv_rank(node, initializers: dict, producers: dict, ranks: dict) -> int | None:
    """Spatial rank of a ``Conv``: from ``kernel_shape``, else from its weight's rank."""
    for attr in node.attribute:
        if attr.name == "kernel_shape":
            return len(attr.ints)
    name = node.input[1] if len(node.input) > 1 else ""
    for _ in range(8):
        if name in initializers:
            return len(initializers[name].dims) - 2
        if name in ranks:
            return ranks[name] - 2
        producer = producers.get(name)
        if producer is None:
            return None
        if producer.op_type == "Constant":
            for attr in producer.attribute:
                if attr.name == "value":
                    return len(attr.t.dims) - 2
            return None
        if producer.op_type not in _WEIGHT_PASSTHROUGH or not producer.input:
            return None
        name = producer.input[0]
    return None


def onnx_operator_names(model) -> list[str]:
    """Names of the nodes that import as one ``matmul``/``conv2d``, in graph order.

    A node's name is ``node.name``, or ``<op_type>_<index>`` (its index in the graph) when
    the name is empty; repeated names get a ``_<n>`` suffix so that every name is unique.
    ``Conv`` nodes with a 1-D or 3-D kernel are left out (they import as ``conv1d`` or
    ``conv3d``); nodes inside subgraphs are not considered.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    ranks = {}
    for value_info in (*graph.input, *graph.value_info):
        dims = _dims(value_info)
        if dims is not None:
            ranks[value_info.name] = len(dims)
    names: list[str] = []
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx", "com.microsoft") or (
            node.op_type not in ANCHOR_OP_TYPES
        ):
            continue
        if node.op_type in ("Conv", "ConvInteger"):
            rank = _conv_rank(node, initializers, producers, ranks)
            if rank is not None and rank != 2:
                continue
        name = node.name or f"{node.op_type}_{index}"
        unique, n = name, 1
        while unique in seen:
            unique = f"{name}_{n}"
            n += 1
        seen.add(unique)
        names.append(unique)
    return names


def _failing_node(exc: BaseException):
    """The ONNX node TVM's frontend was converting when it raised ``exc``, or None: the
    innermost frame of its traceback with a ``node`` that has an ``op_type``."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if hasattr(node, "op_type") and hasattr(node, "name"):
            found = node
        tb = tb.tb_next
    return found


def load_onnx(path: str | Path, input_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple:
    """Import an ONNX model for the ``cim`` target.

    Parameters
    ----------
    path
        The ``.onnx`` file.
    input_shapes
        Static shapes by input name; required for inputs with dynamic or unknown
        dimensions, and overrides the model's shape otherwise (same rank).

    Returns
    -------
    mod : tvm.IRModule
        The Relax module, weights bound as constants, ``main``'s parameters named as the
        ONNX inputs (not sanitized).
    names : list of str or None
        ONNX node names of the ``Conv``/``Gemm``/``MatMul``/``MatMulInteger``/
        ``ConvInteger`` nodes (see ``onnx_operator_names``), in the order of the
        ``matmul``/``conv2d`` calls they import as; pass them as ``names`` to
        ``compile_for_cim``. None when the number of such calls in ``main`` differs from
        the number of nodes (an operator the frontend imports with extra or fewer
        ``matmul`` calls): the partitioner then derives names (``dense_<i>``,
        ``conv2d_<i>``).

    Raises
    ------
    CimError
        A missing, truncated or corrupt file, a dynamic input without a shape in
        ``input_shapes``, a bad ``input_shapes`` entry, an operator-format quantized node
        (``QLinearConv``, ...: export QDQ instead), or a model the TVM ONNX frontend cannot
        import.
    """
    path = Path(path)
    model = _read_model(path)
    model = from_qonnx(model, path)
    _refuse_qoperator_nodes(model, path)
    shape_dict = _shape_dict(model, path, input_shapes)
    names = onnx_operator_names(model)

    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(
            model,
            shape_dict=shape_dict,
            keep_params_in_input=False,
            sanitize_input_names=False,
        )
    except Exception as exc:
        node = _failing_node(exc)
        where = f"node {node.name!r} ({node.op_type})" if node is not None else "the model"
        detail = f"{type(exc).__name__}: {tvm_message(exc)}"
        raise CimError(f"{path}: the TVM ONNX frontend cannot import {where} ({detail})") from exc
    if count_anchors(mod) != len(names):
        return mod, None
    return mod, names
