"""PyTorch modules (float or quantization-aware) into Relax modules through ``torch.export``.

Operators are named by module path. PyTorch and TVM are imported on first use.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core.errors import CimError

from .module import count_anchors


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
