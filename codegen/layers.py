"""The operators a crossbar program computes, from the graph reader to the codegen.

A ``Region`` is one partitioned function: its parameters, its dense and convolution
operators (``CimOp``) in dataflow order, and which operators it returns. Every field is
plain numpy, so the codegen and its tests need no TVM.

One record serves the whole way down. The graph reader fills a ``CimOp`` as the graph
states it: real weights (a float model) or integer codes with their scales, the input's
codes when the graph quantizes them, bias, ReLU and output quantization.
``codegen.quantize`` completes it into integer form: integer weight codes and their
width, the input codes the crossbars receive and the integer bias.

An operator computes ``acc = x_codes @ weight_codes`` (a convolution through im2col) on the
crossbars, then either requantizes ``acc`` inside the program to the codes of its
``output`` spec, or hands ``acc`` to the host, which turns it into real values with
``(acc + int_bias) * scale + real_bias``. An activation-activation matmul (``kind ==
"matmul"``, attention's ``Q @ Kᵀ`` and ``A @ V``) has no weight: its ``stored`` operand is
another activation, written into the crossbars at run time, head by head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tvm_cim.core.cells import signed_width

from ..sim import isa
from ..sim.builder import im2col_params


@dataclass(frozen=True)
class Codes:
    """Integer codes of a tensor: ``real = scale * (code - zero_point)``.

    ``scale`` None means the codes are the values themselves (an integer graph).
    """

    bits: int
    signed: bool
    scale: float | None = None
    zero_point: int = 0


_OH, _OW = isa.IM2COL_PARAMS.index("OH"), isa.IM2COL_PARAMS.index("OW")


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's shapes and window, NCHW data and OIHW weights."""

    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int = 1

    def params(self, channels: int | None = None) -> np.ndarray:
        """The ``im2col`` instruction's ``[1, 15]`` parameter constant, for an image of
        ``channels`` channels (all of them unless told: a group set takes fewer)."""
        return im2col_params(
            self.height,
            self.width,
            self.channels if channels is None else channels,
            self.kernel,
            self.strides,
            self.padding,
            self.dilation,
        )

    @property
    def out_height(self) -> int:
        return int(self.params()[0, _OH])

    @property
    def out_width(self) -> int:
        return int(self.params()[0, _OW])

    @property
    def taps(self) -> int:
        """``KH * KW``: the window positions."""
        return self.kernel[0] * self.kernel[1]


@dataclass(frozen=True)
class StoredOperand:
    """The operand of an activation-activation matmul that the crossbars hold.

    ``source`` is read like ``CimOp.source``; ``codes`` are its integer codes (None for
    real values still to be quantized by the precision's ``w_bits`` and calibration);
    ``shape`` is its graph shape, ``[..., K, N]`` with the driven operand's leading
    dimensions.
    """

    source: tuple[str, int]
    shape: tuple[int, ...]
    codes: Codes | None = None

    @property
    def value_bits(self) -> int:
        """Width of the signed values the crossbars hold."""
        return signed_width(self.codes.bits, self.codes.signed)


@dataclass
class CimOp:
    """One dense, convolution or activation-activation matmul operator of a region.

    Attributes
    ----------
    name
        The operator's stable name (the ONNX node name, or one derived from its position).
    kind
        ``"dense"``, ``"conv2d"`` or ``"matmul"`` (both operands activations).
    source
        ``("param", i)`` for the region's i-th parameter, ``("op", j)`` for operator j.
    weight
        ``[K, N]`` (for a ``"matmul"``, a placeholder of that shape: see ``stored``); for
        a convolution ``K`` runs over ``(kh, kw, c)``. Real values for a float graph until
        quantized, else integer codes. A grouped convolution's weight
        is block-diagonal: column ``n`` of group ``n // (N / groups)`` is zero outside
        its group's input channels.
    in_shape, out_shape
        The graph's tensor shapes around the operator.
    input
        The codes the crossbars receive (``a_bits`` is ``input.bits``); None for real
        activations still to be quantized (by the precision and calibration).
    w_bits
        Width of the weight codes; None until quantized, unless the graph states it (an
        integer clip of the weight codes), which quantization then keeps.
    weight_scale
        ``[N]`` real scale per output channel, None for integer graphs.
    int_bias
        ``[N]`` integer added to the accumulator (zero-point correction, quantized bias).
    real_bias
        ``[N]`` real bias added after scaling on the host, for region outputs.
    relu
        Clamp at zero (at the output zero point for codes).
    output
        Requantize to these codes inside the program; None hands the accumulator out.
    conv
        Window and shapes of a convolution.
    stored
        The run-time operand of a ``"matmul"``; its codes' width is ``w_bits``.
    images
        Images one run of the graph feeds the operator (the graph's batch), when known:
        a dense operator's leading dimensions may hold several vectors per image
        (tokens); None takes the input's leading dimension.
    """

    name: str
    kind: str
    source: tuple[str, int]
    weight: np.ndarray
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    input: Codes | None = None
    w_bits: int | None = None
    weight_scale: np.ndarray | None = None
    int_bias: np.ndarray | None = None
    real_bias: np.ndarray | None = None
    relu: bool = False
    output: Codes | None = None
    conv: ConvGeometry | None = None
    stored: StoredOperand | None = None
    images: int | None = None

    @property
    def is_float(self) -> bool:
        """The weights are real values (a float graph's operator, not yet quantized)."""
        return bool(np.issubdtype(self.weight.dtype, np.floating))

    @property
    def heads(self) -> int:
        """Independent matmuls per image: the leading dimensions of a ``"matmul"``'s
        operands (attention heads), else 1."""
        if self.stored is None:
            return 1
        return self._per_item(int(np.prod(self.in_shape[:-2], dtype=np.int64)))

    def _per_item(self, count: int) -> int:
        """``count`` things of one graph run, per item (all of them where the batch does
        not divide them)."""
        return count // self.batch if count % self.batch == 0 else count

    @property
    def a_bits(self) -> int:
        return self.input.bits

    @property
    def in_features(self) -> int:
        """``K``: the values one input vector holds (the weight's rows)."""
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        """``N``: the output channels (the weight's columns)."""
        return self.weight.shape[1]

    @property
    def groups(self) -> int:
        """Convolution groups (1 for a dense operator)."""
        return 1 if self.conv is None else self.conv.groups

    @property
    def reduction_length(self) -> int:
        """The products summed into one output: ``K / groups``."""
        return self.in_features // self.groups

    @property
    def batch(self) -> int:
        """Items the graph feeds the operator at once: its images, else its input's
        leading dimension."""
        if self.images is not None:
            return self.images
        return int(self.in_shape[0]) if self.in_shape else 1

    @property
    def vectors_per_item(self) -> int:
        """Input vectors one batch item drives: ``O_h * O_w`` for a convolution, the rows
        of one head for a ``"matmul"``, the vectors of one image for a dense operator (1,
        or its tokens)."""
        if self.conv is not None:
            return self.conv.out_height * self.conv.out_width
        if self.stored is not None:
            return int(self.in_shape[-2])
        if len(self.in_shape) < 2:
            return 1
        return self._per_item(int(np.prod(self.in_shape[:-1], dtype=np.int64)))

    def int_bias_or_zero(self) -> np.ndarray:
        if self.int_bias is None:
            return np.zeros(self.out_features, dtype=np.int64)
        return np.asarray(self.int_bias, dtype=np.int64)


@dataclass
class Region:
    """A partitioned function: parameters, operators in dataflow order, outputs.

    ``params`` are the graph shapes and dtypes of the function's parameters; ``outputs``
    lists the operator indices the function returns, in order.
    """

    name: str
    params: list[tuple[tuple[int, ...], str]]
    ops: list[CimOp] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
