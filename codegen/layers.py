"""The integer operators a crossbar program computes, as the graph passes describe them.

A ``Region`` is one partitioned function: its parameters, its dense and convolution
operators (``CimOp``) in dataflow order, and which operators it returns. Every field is
plain numpy, so the codegen and its tests need no TVM.

An operator computes ``acc = x_codes @ weight_codes`` (a convolution through im2col) on the
crossbars, then either requantizes ``acc`` inside the program to the codes of its
``output`` spec, or hands ``acc`` to the host, which turns it into real values with
``(acc + int_bias) * scale + real_bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Codes:
    """Integer codes of a tensor: ``real = scale * (code - zero_point)``.

    ``scale`` None means the codes are the values themselves (an integer graph).
    """

    bits: int
    signed: bool
    scale: float | None = None
    zero_point: int = 0


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

    @property
    def out_height(self) -> int:
        (kh, _), (sh, _), (pt, _, pb, _), (dh, _) = (
            self.kernel,
            self.strides,
            self.padding,
            self.dilation,
        )
        return (self.height + pt + pb - dh * (kh - 1) - 1) // sh + 1

    @property
    def out_width(self) -> int:
        (_, kw), (_, sw), (_, pl, _, pr), (_, dw) = (
            self.kernel,
            self.strides,
            self.padding,
            self.dilation,
        )
        return (self.width + pl + pr - dw * (kw - 1) - 1) // sw + 1

    def params(self) -> np.ndarray:
        """The ``im2col`` instruction's ``[1, 15]`` parameter constant."""
        return np.array(
            [
                self.height,
                self.width,
                self.channels,
                *self.kernel,
                *self.strides,
                *self.padding,
                *self.dilation,
                self.out_height,
                self.out_width,
            ],
            dtype=np.int64,
        ).reshape(1, -1)


@dataclass
class CimOp:
    """One dense or convolution operator of a region, in integer form.

    Attributes
    ----------
    name
        The operator's stable name (the ONNX node name, or one derived from its position).
    kind
        ``"dense"`` or ``"conv2d"``.
    source
        ``("param", i)`` for the region's i-th parameter, ``("op", j)`` for operator j.
    weight
        ``[K, N]`` integer codes; for a convolution ``K`` runs over ``(kh, kw, c)``.
    w_bits
        Width of the weight codes.
    input
        The codes the crossbars receive (``a_bits`` is ``input.bits``).
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
    in_shape, out_shape
        The graph's tensor shapes around the operator.
    """

    name: str
    kind: str
    source: tuple[str, int]
    weight: np.ndarray
    w_bits: int
    input: Codes
    weight_scale: np.ndarray | None = None
    int_bias: np.ndarray | None = None
    real_bias: np.ndarray | None = None
    relu: bool = False
    output: Codes | None = None
    conv: ConvGeometry | None = None
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @property
    def a_bits(self) -> int:
        return self.input.bits

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vectors_per_item(self) -> int:
        """Input vectors one batch item drives: ``O_h * O_w`` for a convolution, else 1."""
        if self.conv is not None:
            return self.conv.out_height * self.conv.out_width
        return 1

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
