"""Model import for the ``cim`` target: ONNX files, PyTorch modules and calibration data.

``load_onnx`` reads an ONNX file into a Relax module and returns, beside it, the ONNX node
names of the operators the crossbars may run, in the order the partitioner meets them, so
that reports and precision configs use the model's own names. ``load_torch`` imports a
PyTorch module (float or quantization-aware) through ``torch.export`` and names the
operators by module path. ``calibration_from_npz`` reads sample inputs for
float models from ``.npz``/``.npy`` files.

TVM, ONNX and PyTorch are imported on first use, not with this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from tvm_cim.core.errors import CimError

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

_ANCHOR_OPS = ("relax.matmul", "relax.nn.conv2d")

# Operators a convolution weight passes through on its way from an initializer.
_WEIGHT_PASSTHROUGH = ("DequantizeLinear", "Identity", "Cast")


# --------------------------------------------------------------------------- ONNX


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


def count_anchors(mod) -> int:
    """Number of bindings of ``relax.matmul``/``relax.nn.conv2d`` in ``mod["main"]``."""
    from tvm import relax

    count = 0

    @relax.expr_functor.visitor
    class _Counter(relax.PyExprVisitor):
        def visit_var_binding_(self, binding):
            nonlocal count
            op = getattr(binding.value, "op", None)
            if getattr(op, "name", None) in _ANCHOR_OPS:
                count += 1
            super().visit_var_binding_(binding)

    _Counter().visit_expr(mod["main"])
    return count


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
        ``input_shapes``, a bad ``input_shapes`` entry, or a model the TVM ONNX frontend
        cannot import.
    """
    path = Path(path)
    model = _read_model(path)
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
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
        raise CimError(f"{path}: the TVM ONNX frontend cannot import the model ({detail})") from exc
    if count_anchors(mod) != len(names):
        return mod, None
    return mod, names


# --------------------------------------------------------------------------- PyTorch


def load_torch(model, example_inputs) -> tuple:
    """Import a PyTorch module for the ``cim`` target through ``torch.export``.

    Parameters
    ----------
    model
        A ``torch.nn.Module`` in the mode it should be compiled in (usually ``eval()``), a
        model prepared by ``tvm_cim.learn.qat.prepare`` (exported with its quantization, see
        ``tvm_cim.learn.qat.export_program``), or an ``ExportedProgram``.
    example_inputs
        A tensor or a tuple of tensors; their shapes become ``main``'s static shapes.
        Ignored for an ``ExportedProgram``.

    Returns
    -------
    mod : tvm.IRModule
        The Relax module from ``from_exported_program``, parameters bound as constants;
        ``main`` returns a tuple of outputs. ``fake_quantize_per_tensor_affine`` and
        ``fake_quantize_per_channel_affine`` import as ``quantize``/``dequantize`` pairs
        (after a ``clip`` to the code range when it is narrower than 8 bits), so
        quantization-aware models reach the crossbars with their bit widths.
    names : list of str or None
        The module path of each ``matmul``/``conv2d`` call (``conv1``, ``layer1.0.conv1``),
        in call order, for ``compile_for_cim``; None when they cannot be matched one to
        one (the partitioner then derives ``dense_<i>``/``conv2d_<i>``).
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    from tvm_cim.learn import qat

    if isinstance(model, torch.export.ExportedProgram):
        exported = model
    else:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        if qat.precision_of(model):
            exported = qat.export_program(model, *example_inputs)
        else:
            exported = torch.export.export(model, tuple(example_inputs))
    table = torch.export.default_decompositions()
    for op in (
        torch.ops.aten.fake_quantize_per_tensor_affine,
        torch.ops.aten.fake_quantize_per_channel_affine,
    ):
        table.pop(op.default, None)  # kept whole: each imports as one quantize/dequantize pair
    exported = exported.run_decompositions(table)
    try:
        mod = from_exported_program(
            exported,
            keep_params_as_input=False,
            run_ep_decomposition=False,
            custom_convert_map=_fake_quantize_converters(exported),
        )
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
        raise CimError(f"the TVM PyTorch frontend cannot import the model ({detail})") from exc
    names = _module_paths_of_anchors(exported)
    return mod, names if names is not None and count_anchors(mod) == len(names) else None


#: ATen operators that import as exactly one ``matmul`` or ``conv2d``.
_TORCH_ANCHORS = ("convolution", "addmm", "mm", "linear", "matmul", "bmm")


def _module_paths_of_anchors(exported) -> list[str] | None:
    """The innermost module path of each anchor node, in graph order (unique)."""
    names: list[str] = []
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        if getattr(node.target, "__name__", "").split(".")[0] not in _TORCH_ANCHORS:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        if not path or path in names:
            return None
        names.append(path)
    return names


def _qdq(importer, x, scale, zero_point: int, qmin: int, qmax: int):
    """``dequantize(quantize(clip(x)))`` with codes ``qmin..qmax`` of an 8-bit type."""
    from tvm import relax

    if qmin >= 0 and qmax <= 255:
        dtype = "uint8"
    elif qmin >= -128 and qmax <= 127:
        dtype = "int8"
    else:
        raise CimError(f"fake quantization to codes {qmin}..{qmax} does not fit 8 bits")
    bb = importer.block_builder
    full = (0, 255) if dtype == "uint8" else (-128, 127)
    if (qmin, qmax) != full:  # narrower codes: clip in real units, as the ONNX export does
        lo, hi = ((q - zero_point) * scale for q in (qmin, qmax))
        x = bb.emit(relax.op.clip(x, float(np.float32(lo)), float(np.float32(hi))))
    s = relax.const(np.float32(scale))
    zp = relax.const(np.array(zero_point, dtype=dtype))
    codes = bb.emit(relax.op.quantize(x, s, zp, axis=-1, out_dtype=dtype))
    return bb.emit(relax.op.dequantize(codes, s, zp, axis=-1, out_dtype="float32"))


def _fake_quantize_per_tensor(node, importer):
    x, scale, zero_point, qmin, qmax = importer.retrieve_args(node)
    return _qdq(importer, x, float(scale), int(zero_point), int(qmin), int(qmax))


def _constant_inputs(exported) -> dict:
    """``{graph input name: tensor}`` of the program's parameters, buffers and constants."""
    tensors = {
        **dict(exported.named_parameters()),
        **dict(exported.named_buffers()),
        **exported.constants,
    }
    return {
        spec.arg.name: tensors[spec.target]
        for spec in exported.graph_signature.input_specs
        if spec.target in tensors
    }


def _fake_quantize_converters(exported) -> dict:
    """Converters of the fake-quantize operators for ``from_exported_program``."""
    constants = _constant_inputs(exported)

    def value(expr):
        tensor = constants.get(getattr(expr, "name", None))
        return None if tensor is None else tensor.detach().cpu().numpy()

    def per_channel(node, importer):
        """Constant weights become int8 codes with a per-channel ``dequantize``."""
        from tvm import relax

        from tvm_cim.core.quant import quantize

        x, scale, zero_point, axis, qmin, qmax = importer.retrieve_args(node)
        w, s, zp = (value(v) for v in (x, scale, zero_point))
        if w is None or s is None or zp is None:
            raise CimError(
                "per-channel fake quantization needs constant weights, scales and zero points"
            )
        if np.any(zp != 0) or qmin < -128 or qmax > 127:
            raise CimError("per-channel fake quantization: only symmetric int8 codes are supported")
        shape = [1] * w.ndim
        shape[axis] = -1
        s = s.astype(np.float32)
        codes = quantize(w, s.reshape(shape), 0, 8, True)
        codes = np.clip(codes, qmin, qmax).astype(np.int8)
        return importer.block_builder.emit(
            relax.op.dequantize(
                relax.const(codes),
                relax.const(s),
                relax.const(zp.astype(np.int8)),
                axis=axis,
                out_dtype="float32",
            )
        )

    return {
        "fake_quantize_per_tensor_affine.default": _fake_quantize_per_tensor,
        "fake_quantize_per_channel_affine.default": per_channel,
    }


# --------------------------------------------------------------------------- inputs


def main_inputs(mod) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of each parameter of ``mod["main"]``.

    Raises
    ------
    CimError
        A parameter that is not a tensor of static shape.
    """
    out = []
    for param in mod["main"].params:
        shape = getattr(param.ty, "shape", None)
        if shape is None or not all(hasattr(d, "value") for d in shape):
            raise CimError(f"input {param.name!r} has no static shape ({param.ty})")
        out.append((param.name, tuple(int(d.value) for d in shape), str(param.ty.dtype)))
    return out


def _samples(name: str, array: np.ndarray, shape: tuple, dtype: str, source: str) -> np.ndarray:
    """``array`` as ``[samples, *shape]`` of ``dtype``."""
    if array.shape == shape:
        array = array[None]
    if array.ndim != len(shape) + 1 or array.shape[1:] != shape:
        raise CimError(
            f"{source}: calibration data for input {name!r} has shape {list(array.shape)}; "
            f"expected [samples, {', '.join(map(str, shape))}]"
        )
    if array.shape[0] == 0:
        raise CimError(f"{source}: calibration data for input {name!r} has no samples")
    if not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise CimError(
            f"{source}: calibration data for input {name!r} is {array.dtype}, the input is {dtype}"
        )
    return array.astype(dtype, copy=False)


def _load_arrays(path: Path) -> dict[str, np.ndarray] | np.ndarray:
    try:
        with open(path, "rb") as f:
            data = np.load(f, allow_pickle=False)
            if isinstance(data, np.ndarray):
                return data
            with data:
                return {key: data[key] for key in data.files}
    except OSError as exc:
        raise CimError(f"cannot read calibration data {path}: {exc.strerror or exc}") from None
    except (ValueError, EOFError) as exc:
        raise CimError(f"{path}: not a readable .npz/.npy file ({exc})") from None


def _from_file(path: Path, inputs: list) -> list[np.ndarray]:
    """Per input, its ``[samples, *shape]`` array from one file."""
    data = _load_arrays(path)
    names = [name for name, _, _ in inputs]
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise CimError(
                f"{path}: a .npy file calibrates a single-input model; this model has inputs "
                f"{', '.join(names)}: use an .npz with one array per input"
            )
        return [_samples(names[0], data, inputs[0][1], inputs[0][2], str(path))]
    extra = [key for key in data if key not in names]
    if extra:
        raise CimError(
            f"{path}: array {extra[0]!r} is not a model input; inputs: {', '.join(names)}"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise CimError(
            f"{path}: no calibration array for input {missing[0]!r}; inputs: {', '.join(names)}"
        )
    return [_samples(n, data[n], shape, dtype, str(path)) for n, shape, dtype in inputs]


def calibration_from_npz(path_or_dir: str | Path, mod) -> list[tuple[np.ndarray, ...]]:
    """Calibration samples for ``mod`` from ``.npz``/``.npy`` files.

    Parameters
    ----------
    path_or_dir
        An ``.npz`` file with one array per input of ``mod["main"]`` (by parameter name,
        which for ``load_onnx`` modules is the ONNX input name), each ``[samples, *shape]``
        (or exactly ``shape`` for one sample); an ``.npy`` file, the same for a
        single-input model; or a directory, whose ``.npz`` and ``.npy`` files are read in
        name order and their samples concatenated.
    mod
        The module the samples are for.

    Returns
    -------
    list of tuple of numpy.ndarray
        One tuple of ``main``'s arguments per sample, as ``compile_for_cim`` takes.

    Raises
    ------
    CimError
        An unreadable file, a missing or unknown input, a shape or dtype that does not
        match, or inputs with different sample counts.
    """
    path = Path(path_or_dir)
    inputs = main_inputs(mod)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
        if not files:
            raise CimError(f"calibration directory {path} has no .npz or .npy files")
    elif path.exists():
        files = [path]
    else:
        raise CimError(f"calibration file {path} does not exist")
    columns: list[list[np.ndarray]] = [[] for _ in inputs]
    for file in files:
        for column, array in zip(columns, _from_file(file, inputs)):
            column.append(array)
    arrays = [np.concatenate(c) for c in columns]
    counts = {a.shape[0] for a in arrays}
    if len(counts) > 1:
        detail = ", ".join(f"{n}: {a.shape[0]}" for (n, _, _), a in zip(inputs, arrays))
        raise CimError(f"{path}: inputs have different numbers of samples ({detail})")
    count = counts.pop() if counts else 0
    return [tuple(a[i] for a in arrays) for i in range(count)]
