"""Lowering of a whole region (several dense and convolution operators) to one program.

Each operator reads integer codes from a buffer (convolutions first gather their windows
with ``im2col``, one vector per output pixel, NHWC), drives the crossbars through
``emit_matmul`` and leaves an int64 accumulator. An accumulator feeding another operator
of the region is requantized inside the program (bias, scale, zero point, ReLU) to the
codes that operator reads; one the region returns is stored as it is, and the host turns
it into real values with the affine map recorded in ``Program.attrs``.

``Program.attrs`` tells the runtime how to move between graph tensors and program
tensors: which parameter each program input comes from, how real inputs are quantized,
how convolution tensors are laid out (NCHW in the graph, pixel rows in the program), and
how each output becomes the graph's value.
"""

from __future__ import annotations

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.quant import MAX_SHIFT, Requantize, fixed_point, quant_range, quantize

from ..sim.builder import ProgramBuilder
from ..sim.program import Program, TensorDesc
from .layers import CimOp, Codes, Region
from .mapping import is_placeholder, logical_shape
from .matmul import (
    _smallest_dtype,
    accumulator_bits,
    accumulator_bound,
    emit_matmul,
    emit_requant,
)


def requantization(op: CimOp, target: Codes) -> Requantize:
    """Fixed-point requantization of ``op``'s accumulator to ``target`` codes."""
    if op.weight_scale is None or op.input.scale is None or target.scale is None:
        raise CimError(f"{op.name}: requantizing needs the input, weight and output scales")
    real = (
        np.float64(op.input.scale) * np.asarray(op.weight_scale, np.float64) / float(target.scale)
    )
    bias = op.int_bias_or_zero()
    if op.real_bias is not None:  # on the accumulator's grid, as QAT rounds it
        step = np.float64(op.input.scale) * np.asarray(op.weight_scale, np.float64)
        bias = bias + quantize(op.real_bias, step, 0, 32, True)
    # Keep (acc + bias) * multiplier inside int64.
    bound = accumulator_bound(op.in_features, op.w_bits, op.a_bits, op.input.signed)
    magnitude = bound + int(np.abs(bias).max(initial=0)) + 1
    precision = max(1, min(31, MAX_SHIFT - magnitude.bit_length()))
    multiplier, shift = fixed_point(real, precision)
    return Requantize(
        multiplier=multiplier,
        shift=shift,
        zero_point=int(target.zero_point),
        out_bits=target.bits,
        signed=target.signed,
        relu=op.relu,
        bias=bias,
    )


def _codes_dict(codes: Codes) -> dict:
    return {
        "bits": codes.bits,
        "signed": codes.signed,
        "scale": codes.scale,
        "zero_point": codes.zero_point,
    }


class _RegionLowering:
    def __init__(self, region: Region, arch: CimArch):
        self.region = region
        self.b = ProgramBuilder(arch, region.name)
        self.values: dict[tuple, int] = {}  # (source, codes) -> buffer of codes
        self.accs: dict[int, int] = {}  # op index -> accumulator buffer
        self.ranges: dict[int, list[list[int]]] = {j: [] for j in range(len(region.ops))}
        self.in_attrs: list[dict] = []
        self.out_attrs: list[dict] = []
        self.consumers = {j: [] for j in range(len(region.ops))}
        for k, op in enumerate(region.ops):
            if op.source[0] == "op":
                self.consumers[op.source[1]].append(k)

    def lower(self) -> Program:
        for j, op in enumerate(self.region.ops):
            start = len(self.b.rows)
            xbuf, rows = self._input_buffer(op)
            self.accs[j] = emit_matmul(
                self.b,
                xbuf,
                op.weight,
                w_bits=op.w_bits,
                a_bits=op.a_bits,
                signed_input=op.input.signed,
                rows=rows,
            )
            self.ranges[j].append([start, len(self.b.rows)])
        for j in self.region.outputs:
            start = len(self.b.rows)
            self._store(j)
            self.ranges[j].append([start, len(self.b.rows)])
        self.b.emit("halt")
        program = self.b.build()
        program.attrs = {
            "region": self.region.name,
            "inputs": self.in_attrs,
            "outputs": self.out_attrs,
            "operators": [
                {**_op_summary(op, self.b.arch), "instructions": self.ranges[j]}
                for j, op in enumerate(self.region.ops)
            ],
        }
        return program

    def _input_buffer(self, op: CimOp) -> tuple[int, int]:
        """Buffer of the codes ``op`` multiplies (its im2col for a convolution)."""
        key = (op.source, op.input)
        if key not in self.values:
            if op.source[0] == "param":
                self.values[key] = self._load_param(op)
            else:
                producer = self.region.ops[op.source[1]]
                # The consumer's codes: the producer's quantize may be the wider container.
                rq = requantization(producer, op.input)
                self.values[key] = emit_requant(
                    self.b,
                    self.accs[op.source[1]],
                    producer.out_features,
                    rq,
                    rows=producer.vectors_per_item,
                )
        codes = self.values[key]
        if op.conv is None:
            return codes, 1
        geometry = op.conv
        cols = self.b.buffer(op.in_features, rows=op.vectors_per_item)
        self.b.emit(
            "im2col",
            dst=cols,
            src=codes,
            params=self.b.constant(geometry.params()),
            pad=op.input.zero_point,
        )
        return cols, op.vectors_per_item

    def _load_param(self, op: CimOp) -> int:
        index = op.source[1]
        shape, dtype = self.region.params[index]
        if op.conv is not None:
            width, rows, layout = op.conv.channels, op.conv.height * op.conv.width, "nchw"
        else:
            width, rows, layout = int(shape[-1]), 1, "flat"
        real = dtype.startswith("float")
        tensor = self.b.input(
            TensorDesc(
                f"in{len(self.in_attrs)}",
                width,
                _smallest_dtype(op.input.bits, op.input.signed),
                op.input.bits,
                op.input.signed,
                rows=rows,
            )
        )
        self.in_attrs.append(
            {
                "param": index,
                "layout": layout,
                "quant": _codes_dict(op.input) if real else None,
            }
        )
        buf = self.b.buffer(width, rows=rows)
        self.b.emit("load", dst=buf, dst_col=0, tensor=tensor, src_col=0, ncols=width)
        return buf

    def _store(self, j: int) -> None:
        op = self.region.ops[j]
        rows = op.vectors_per_item
        n = op.out_features
        if op.output is not None:
            src = emit_requant(self.b, self.accs[j], n, requantization(op, op.output), rows=rows)
            desc = TensorDesc(
                f"out{len(self.out_attrs)}",
                n,
                _smallest_dtype(op.output.bits, op.output.signed),
                op.output.bits,
                op.output.signed,
                rows=rows,
            )
            affine = None
        else:
            src = self.accs[j]
            bits = accumulator_bits(op.in_features, op.w_bits, op.a_bits, op.input.signed)
            desc = TensorDesc(f"out{len(self.out_attrs)}", n, f"int{bits}", bits, True, rows=rows)
            scale = None
            if op.weight_scale is not None and op.input.scale is not None:
                scale = (np.float64(op.input.scale) * np.asarray(op.weight_scale)).tolist()
            affine = {
                "int_bias": op.int_bias_or_zero().tolist(),
                "scale": scale,
                "real_bias": None if op.real_bias is None else np.asarray(op.real_bias).tolist(),
                "relu": op.relu,
            }
        tensor = self.b.output(desc)
        self.b.emit("store", tensor=tensor, dst_col=0, src=src, src_col=0, ncols=n)
        self.out_attrs.append(
            {
                "op": j,
                "layout": "nchw" if op.conv is not None else "flat",
                "shape": list(op.out_shape),
                "affine": affine,
            }
        )


def _op_summary(op: CimOp, arch: CimArch) -> dict:
    rows, cols = logical_shape(op.in_features, op.out_features, op.w_bits, arch)
    return {
        "crossbar_rows": rows,
        "crossbar_cols": cols,
        "name": op.name,
        "kind": op.kind,
        "in_shape": list(op.in_shape),
        "out_shape": list(op.out_shape),
        "weight_shape": list(op.weight.shape),
        "w_bits": op.w_bits,
        "a_bits": op.a_bits,
        "vectors_per_item": op.vectors_per_item,
    }


def lower_region(region: Region, arch: CimArch) -> Program:
    """Lower every operator of ``region`` into one crossbar program.

    Raises
    ------
    CimError
        An operator whose weights, bits or scales the crossbars cannot take, naming it.
    """
    for op in region.ops:
        if op.w_bits is None or op.input is None:
            raise CimError(f"{op.name}: not in integer form (see codegen.quantize)")
        if is_placeholder(op.weight):
            continue
        wmin, wmax = quant_range(op.w_bits, True)
        if op.weight.min() < wmin or op.weight.max() > wmax:
            raise CimError(
                f"{op.name}: weight codes {op.weight.min()}..{op.weight.max()} do not fit "
                f"signed {op.w_bits} bits"
            )
    return _RegionLowering(region, arch).lower()
