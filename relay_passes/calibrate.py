"""Calibration: run the float model once per sample and record each operator's input range.

Each offloaded call is replaced by a call of a Python function that computes its region in
float (``float_forward``) and records the range of every float operator's input; the rest
of the model runs on llvm as it will in the final build.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import tvm
from tvm import relax

from tvm_cim.core.errors import CimError
from tvm_cim.core.quant import quantize

from ..codegen.layers import CimOp, Region
from ..codegen.quantize import Ranges, stored_range_key
from .partition import call_packed, rewrite_offloaded_calls

_ids = itertools.count()


def conv2d_nchw(x: np.ndarray, weight_matrix: np.ndarray, op: CimOp) -> np.ndarray:
    """Convolution through im2col: ``x`` NCHW, ``weight_matrix`` ``[KH*KW*C, O]``."""
    g = op.conv
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = g.kernel, g.strides, g.padding, g.dilation
    padded = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    oh, ow = g.out_height, g.out_width
    cols = []
    for i in range(kh):
        for j in range(kw):
            patch = padded[
                :,
                :,
                i * dh : i * dh + sh * (oh - 1) + 1 : sh,
                j * dw : j * dw + sw * (ow - 1) + 1 : sw,
            ]
            cols.append(patch.transpose(0, 2, 3, 1))  # N, OH, OW, C
    patches = np.concatenate(cols, axis=-1)  # N, OH, OW, KH*KW*C
    out = patches.reshape(-1, patches.shape[-1]) @ weight_matrix
    return out.reshape(x.shape[0], oh, ow, -1).transpose(0, 3, 1, 2)


def _real_weight(op: CimOp) -> np.ndarray:
    w = op.weight.astype(np.float64)
    return w * op.weight_scale if op.weight_scale is not None else w


def _real(x: np.ndarray, codes, ranges: Ranges, key: str) -> np.ndarray:
    """An operand's real value: its codes dequantized, or real values whose range widens
    ``ranges[key]``."""
    if codes is not None:
        x = x.astype(np.float64) - codes.zero_point
        return x * codes.scale if codes.scale is not None else x
    x = x.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    old = ranges.get(key, (lo, hi))
    ranges[key] = (min(old[0], lo), max(old[1], hi))
    return x


def float_forward(region: Region, args: list[np.ndarray], ranges: Ranges) -> list[np.ndarray]:
    """Outputs of ``region`` computed in float64; widens ``ranges[name]`` for float inputs."""
    values: list[np.ndarray] = []

    def operand(source, codes, key):
        kind, index = source
        return _real(args[index] if kind == "param" else values[index], codes, ranges, key)

    for op in region.ops:
        x = operand(op.source, op.input, op.name)
        if op.stored is not None:  # an activation-activation matmul
            stored = operand(op.stored.source, op.stored.codes, stored_range_key(op.name))
            values.append(np.matmul(x, stored))
            continue
        w = _real_weight(op)
        if op.kind == "conv2d":
            y = conv2d_nchw(x, w, op)
            bias_shape = (1, -1, 1, 1)
        else:
            y = (x.reshape(-1, w.shape[0]) @ w).reshape(op.out_shape)
            bias_shape = (-1,)
        if op.real_bias is not None:
            y = y + op.real_bias.reshape(bias_shape)
        if op.relu:
            y = np.maximum(y, 0)
        if op.output is not None:
            o = op.output
            y = quantize(y.astype(np.float32), o.scale, o.zero_point, o.bits, o.signed)
        values.append(y)
    return [values[j] for j in region.outputs]


def calibrate(
    mod: tvm.IRModule, regions: dict[tvm.ir.GlobalVar, Region], samples: Iterable
) -> Ranges:
    """Input ``(min, max)`` of every float operator of a partitioned module.

    Parameters
    ----------
    mod
        The partitioned module.
    regions
        Its ``cim`` functions as read (``read_region``), by global variable.
    samples
        Yields the ``main`` arguments of one run each: an array, a tuple of arrays, or a
        dict from parameter name to array.

    Raises
    ------
    CimError
        ``samples`` is empty.
    """
    ranges: Ranges = {}
    run_id = next(_ids)

    def rewrite(gv, fn, call):
        region = regions[gv]
        symbol = f"tvm_cim.calibrate.{run_id}.{gv.name_hint}"

        def run(*tensors, _region=region):
            arrays = [t.numpy() for t in tensors[: len(_region.params)]]
            outs = float_forward(_region, arrays, ranges)
            for dst, value in zip(tensors[len(_region.params) :], outs):
                dst.copyfrom(np.ascontiguousarray(value, dtype=str(dst.dtype)))

        tvm.register_global_func(symbol, run, override=True)
        return call_packed(symbol, list(call.args), call)

    ex = tvm.compile(rewrite_offloaded_calls(mod, rewrite), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    params = [p.name for p in mod["main"].params]
    count = 0
    for sample in samples:
        if isinstance(sample, dict):
            sample = [sample[name] for name in params]
        elif not isinstance(sample, (list, tuple)):
            sample = [sample]
        vm["main"](*[tvm.runtime.tensor(np.asarray(a)) for a in sample])
        count += 1
    if count == 0:
        raise CimError("calibration data is empty")
    return ranges
