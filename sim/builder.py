"""Build programs instruction by instruction, by mnemonic and operand name."""

from __future__ import annotations

import numpy as np

from tvm_cim.arch import CimArch
from tvm_cim.errors import ProgramError

from . import isa
from .program import CrossbarImage, Program, TensorDesc


class ProgramBuilder:
    """Collects tables and instructions, then makes a ``Program``.

    Operands are checked against their field widths as they are emitted; everything
    else is the verifier's job.
    """

    def __init__(self, arch: CimArch, name: str = "program"):
        self.arch = arch
        self.name = name
        self.inputs: list[TensorDesc] = []
        self.outputs: list[TensorDesc] = []
        self.buffers: list[int] = []
        self.buffer_rows: list[int] = []
        self.images: list[CrossbarImage] = []
        self.constants: list[np.ndarray] = []
        self.attrs: dict = {}
        self.rows: list[list[int]] = []

    def input(self, desc: TensorDesc) -> int:
        self.inputs.append(desc)
        return len(self.inputs) - 1

    def output(self, desc: TensorDesc) -> int:
        self.outputs.append(desc)
        return len(self.outputs) - 1

    def buffer(self, width: int, rows: int = 1) -> int:
        """A buffer of ``rows`` vectors of ``width`` integers per item; its index."""
        self.buffers.append(int(width))
        self.buffer_rows.append(int(rows))
        return len(self.buffers) - 1

    def image(self, cells: np.ndarray, differential_rows: bool = False) -> int:
        self.images.append(CrossbarImage(np.ascontiguousarray(cells, np.uint8), differential_rows))
        return len(self.images) - 1

    def constant(self, values: np.ndarray) -> int:
        self.constants.append(np.ascontiguousarray(values, dtype=np.int64))
        return len(self.constants) - 1

    def emit(self, mnemonic: str, **operands: int) -> None:
        spec = isa.BY_MNEMONIC[mnemonic]
        names = {f.name for f in spec.fields}
        unknown = set(operands) - names
        if unknown:
            raise ProgramError(f"{mnemonic}: unknown operand(s) {sorted(unknown)}")
        row = [spec.opcode]
        for f in spec.fields:
            value = int(operands.get(f.name, 0))
            if not f.min_value <= value <= f.max_value:
                raise ProgramError(
                    f"{mnemonic}: {f.name}={value} does not fit {f.bits} bits",
                    index=len(self.rows),
                )
            row.append(value)
        row += [0] * (1 + isa.MAX_OPERANDS - len(row))
        self.rows.append(row)

    def build(self) -> Program:
        code = np.array(self.rows, dtype=np.int64).reshape(-1, 1 + isa.MAX_OPERANDS)
        return Program(
            arch=self.arch,
            code=code,
            inputs=self.inputs,
            outputs=self.outputs,
            buffers=self.buffers,
            images=self.images,
            constants=self.constants,
            name=self.name,
            buffer_rows=self.buffer_rows,
            attrs=self.attrs,
        )


def im2col_params(
    height: int,
    width: int,
    channels: int,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> np.ndarray:
    """The ``[1, 15]`` params constant of an ``im2col`` (see ``isa.IM2COL_PARAMS``).

    Parameters
    ----------
    height, width, channels
        The NHWC source image of one item.
    kernel
        ``(KH, KW)``.
    stride, dilation
        ``(vertical, horizontal)``.
    padding
        ``(top, left, bottom, right)``.

    The output size ``(OH, OW)`` is computed here; the verifier checks it again.
    """
    kh, kw = kernel
    sh, sw = stride
    pt, pl, pb, pr = padding
    dh, dw = dilation
    oh = (height + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (width + pl + pr - dw * (kw - 1) - 1) // sw + 1
    values = [height, width, channels, kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, oh, ow]
    return np.array([values], dtype=np.int64)
