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

from collections.abc import Mapping

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.quant import MAX_SHIFT, Requantize, fixed_point, quant_range, quantize

from ..sim.builder import ProgramBuilder
from ..sim.program import Program, TensorDesc
from .actmatmul import emit_act_matmul
from .grouped import check_block_diagonal, group_sets
from .layers import CimOp, Codes, Region
from .mapping import is_placeholder, logical_shape
from .matmul import (
    CrossbarSums,
    Lanes,
    TiledMatmul,
    _smallest_dtype,
    accumulator_bits,
    accumulator_bound,
    emit_matmul,
    emit_requant,
    input_steps,
    weight_mapping,
)
from .replicate import output_windows, replication


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
    bound = accumulator_bound(op.reduction_length, op.w_bits, op.a_bits, op.input.signed)
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
    def __init__(self, region: Region, arch: CimArch, copies: Mapping[str, int] | None = None):
        self.region = region
        self.copies = dict(copies or {})  # convolution name -> weight copies, else chosen
        self.b = ProgramBuilder(arch, region.name)
        self.values: dict[tuple, int] = {}  # (source, codes) -> buffer of codes
        self.tensors: dict[tuple, int] = {}  # (source, codes) -> program input tensor
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
            if op.stored is not None:
                self.accs[j] = self._act_matmul(op)
            elif op.groups > 1:
                self.accs[j] = self._grouped(op)
            elif op.conv is not None:
                self.accs[j] = self._conv(op)
            else:
                self.accs[j] = emit_matmul(
                    self.b,
                    self._codes(op),
                    op.weight,
                    w_bits=op.w_bits,
                    a_bits=op.a_bits,
                    signed_input=op.input.signed,
                    rows=op.vectors_per_item,
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

    def _codes(self, op: CimOp) -> int:
        """Buffer of the codes ``op`` reads (a convolution's image, before im2col)."""
        key = (op.source, op.input)
        if key not in self.values:
            if op.source[0] == "param":
                self.values[key] = self._load_param(op)
            else:
                self.values[key] = self._requantize_source(op)
        return self.values[key]

    def _im2col(
        self,
        op: CimOp,
        codes: int,
        channels: int,
        dst: int | None = None,
        window: tuple[int, int] | None = None,
    ) -> int:
        """Unfold the ``channels``-wide image in ``codes`` into ``dst`` (else a new buffer):
        every output row, or the ``(first, rows)`` output rows of ``window``."""
        oh0, rows = window or (0, op.conv.out_height)
        if dst is None:
            dst = self.b.buffer(op.conv.taps * channels, rows=rows * op.conv.out_width)
        self.b.emit(
            "im2col",
            dst=dst,
            src=codes,
            params=self.b.constant(op.conv.params(channels)),
            pad=op.input.zero_point,
            oh0=oh0,
        )
        return dst

    def _conv(self, op: CimOp) -> int:
        """A convolution, its tiles copied on idle crossbars (``codegen.replicate``), each
        copy driving its window of output rows; the accumulator of all of them."""
        b, conv = self.b, op.conv
        tiled = TiledMatmul(
            b, weight_mapping(op.weight, op.w_bits, b.arch), op.w_bits, op.a_bits, op.input.signed
        )
        tiles = len(tiled.tiles)
        steps = input_steps(op.a_bits, b.arch.dac_bits)
        row_vectors = conv.out_width * op.batch  # one output row of every item
        copies = self.copies.get(op.name) or replication(
            tiles, conv.out_height, row_vectors, steps, b.arch
        )
        codes = self._codes(op)
        if copies == 1:
            sums = CrossbarSums(b, op.out_features, op.vectors_per_item, tiles, tiled.tile_width)
            tiled.emit(self._im2col(op, codes, conv.channels), sums)
            return sums.total()
        lanes, copied = Lanes(b), []  # every copy's windows unfolded, then all tiles at once
        for copy, (oh0, rows) in enumerate(output_windows(conv.out_height, copies)):
            unfolded = self._im2col(op, codes, conv.channels, window=(oh0, rows))
            sums = CrossbarSums(
                b,
                op.out_features,
                rows * conv.out_width,
                tiles,
                tiled.tile_width,
                first=copy * tiles,
            )
            tiled.emit(unfolded, sums, lanes=lanes)
            copied.append((oh0, sums))
        lanes.emit()
        whole = b.buffer(op.out_features, rows=op.vectors_per_item)
        for oh0, sums in copied:
            b.emit(
                "acc",
                dst=whole,
                dst_col=0,
                src=sums.total(),
                src_col=0,
                ncols=op.out_features,
                dst_row=oh0 * conv.out_width,
            )
        return whole

    def _requantize_source(self, op: CimOp, columns=None, dst: int | None = None) -> int:
        """The codes ``op`` reads, requantized from its producer's accumulator (only the
        accumulator ``columns`` when given, into ``dst`` when given)."""
        producer = self.region.ops[op.source[1]]
        # The consumer's codes: the producer's quantize may be the wider container.
        return emit_requant(
            self.b,
            self.accs[op.source[1]],
            producer.out_features,
            requantization(producer, op.input),
            rows=producer.vectors_per_item,
            columns=columns,
            dst=dst,
        )

    def _param_tensor(self, op: CimOp, source=None, codes: Codes | None = None) -> int:
        """The program input holding the region parameter ``source`` (default: the one
        ``op`` reads) as ``codes`` (default: ``op``'s input codes), made once."""
        source, codes = source or op.source, codes or op.input
        key = (source, codes)
        if key in self.tensors:
            return self.tensors[key]
        index = source[1]
        shape, dtype = self.region.params[index]
        width, rows, layout = self._param_layout(op, shape)
        real = dtype.startswith("float")
        self.tensors[key] = self.b.input(
            TensorDesc(
                f"in{len(self.in_attrs)}",
                width,
                _smallest_dtype(codes.bits, codes.signed),
                codes.bits,
                codes.signed,
                rows=rows,
            )
        )
        attrs = {"param": index, "layout": layout, "quant": _codes_dict(codes) if real else None}
        if layout == "heads":
            attrs["heads"] = op.heads
        self.in_attrs.append(attrs)
        return self.tensors[key]

    @staticmethod
    def _param_layout(op: CimOp, shape) -> tuple[int, int, str]:
        """``(width, rows per item, layout)`` of a parameter in the program: NCHW images
        as rows of pixels, the ``[..., R, C]`` operands of a matmul as ``R`` rows with every
        head's ``C`` columns side by side, else one row per vector."""
        if op.conv is not None:
            return op.conv.channels, op.conv.height * op.conv.width, "nchw"
        if op.stored is not None:
            return op.heads * int(shape[-1]), int(shape[-2]), "heads"
        return int(shape[-1]), op.vectors_per_item, "flat"

    def _load_param(self, op: CimOp, source=None, codes: Codes | None = None) -> int:
        tensor = self._param_tensor(op, source, codes)
        width, rows, _ = self._param_layout(op, self.region.params[(source or op.source)[1]][0])
        buf = self.b.buffer(width, rows=rows)
        self.b.emit("load", dst=buf, dst_col=0, tensor=tensor, src_col=0, ncols=width)
        return buf

    def _act_matmul(self, op: CimOp) -> int:
        """An activation-activation matmul: every head's stored operand written into
        crossbars at run time, then driven with the other operand (``codegen.actmatmul``)."""
        k, n = op.stored.shape[-2:]
        return emit_act_matmul(
            self.b,
            self._codes(op),
            self._load_param(op, op.stored.source, op.stored.codes),
            heads=op.heads,
            k=k,
            n=n,
            transpose=False,
            s_bits=op.stored.value_bits,
            a_bits=op.a_bits,
            signed_input=op.input.signed,
            rows=op.vectors_per_item,
        )

    def _grouped(self, op: CimOp) -> int:
        """A grouped convolution, set by set (see ``codegen.grouped``); its accumulator."""
        b = self.b
        sets = group_sets(op, b.arch)
        tiled = [
            TiledMatmul(
                b,
                weight_mapping(sets.weight(op.weight, s), op.w_bits, b.arch),
                op.w_bits,
                op.a_bits,
                op.input.signed,
            )
            for s in range(sets.count)
        ]
        sums = CrossbarSums(
            b,
            op.out_features,
            op.vectors_per_item,
            sum(len(t.tiles) for t in tiled),
            max(t.tile_width for t in tiled),
        )
        if sets.count == 1:  # every group in one tile: the whole image, unfolded once
            tiled[0].emit(self._im2col(op, self._codes(op), op.conv.channels), sums)
            return sums.total()
        pool: dict[tuple, int] = {}
        unfolded = [self._set_columns(op, sets, 0, pool)]
        for s, t in enumerate(tiled):
            if s + 1 < sets.count:  # unfold the next set while this one runs
                unfolded.append(self._set_columns(op, sets, s + 1, pool))
            t.emit(unfolded[s], sums, out_col=sets.outputs(s)[0])
        return sums.total()

    def _set_columns(self, op: CimOp, sets, s: int, pool: dict) -> int:
        """Set ``s``'s channels in a buffer of their own, unfolded; returns the unfolded
        buffer. Sets alternate between two pairs of buffers of each width."""
        c0, c1 = sets.channels(s)
        width, slot = c1 - c0, s % 2
        image, cols = pool.get((slot, width), (None, None))
        if image is None:
            image = self.b.buffer(width, rows=op.conv.height * op.conv.width)
            cols = self.b.buffer(op.conv.taps * width, rows=op.vectors_per_item)
            pool[(slot, width)] = image, cols
        if op.source[0] == "param":
            tensor = self._param_tensor(op)
            self.b.emit("load", dst=image, dst_col=0, tensor=tensor, src_col=c0, ncols=width)
        else:
            self._requantize_source(op, columns=(c0, c1), dst=image)
        return self._im2col(op, image, width, dst=cols)

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
        elif op.stored is not None:  # every head's products side by side, one scale
            n *= op.heads
            src = self.accs[j]
            stored = op.stored.codes
            bits = accumulator_bits(
                op.in_features, op.stored.value_bits, op.a_bits, op.input.signed
            )
            desc = TensorDesc(f"out{len(self.out_attrs)}", n, f"int{bits}", bits, True, rows=rows)
            scale = None
            if stored.scale is not None and op.input.scale is not None:
                scale = [float(np.float64(op.input.scale) * np.float64(stored.scale))]
            affine = {"int_bias": [0], "scale": scale, "real_bias": None, "relu": False}
        else:
            src = self.accs[j]
            bits = accumulator_bits(op.reduction_length, op.w_bits, op.a_bits, op.input.signed)
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
        layout = "nchw" if op.conv is not None else "heads" if op.stored is not None else "flat"
        attrs = {"op": j, "layout": layout, "shape": list(op.out_shape), "affine": affine}
        if op.stored is not None:
            attrs["heads"] = op.heads
        self.out_attrs.append(attrs)


def _op_summary(op: CimOp, arch: CimArch) -> dict:
    if op.stored is not None:  # the cells of one head
        rows, cols = logical_shape(op.in_features, op.out_features, op.stored.value_bits, arch)
    elif op.groups > 1:
        rows, cols = group_sets(op, arch).logical_shape(op.w_bits, arch)
    else:
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
        "heads": op.heads,
    }


def lower_region(region: Region, arch: CimArch, copies: Mapping[str, int] | None = None) -> Program:
    """Lower every operator of ``region`` into one crossbar program.

    ``copies`` fixes the weight copies of the convolutions it names (1 to their output
    rows); the others get ``codegen.replicate.replication``'s choice.

    Raises
    ------
    CimError
        An operator whose weights, bits or scales the crossbars cannot take, naming it.
    """
    convs = {op.name: op.conv.out_height for op in region.ops if op.conv is not None}
    for name, count in (copies or {}).items():
        if name in convs and not (isinstance(count, int) and 1 <= count <= convs[name]):
            raise CimError(f"{name}: {count!r} weight copies; expected 1 to {convs[name]}")
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
        check_block_diagonal(op)
    return _RegionLowering(region, arch, copies).lower()
