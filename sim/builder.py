"""Build programs instruction by instruction, by mnemonic and operand name."""

from __future__ import annotations

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import ProgramError

from . import isa
from .program import CrossbarImage, Program, TensorDesc

#: Per mnemonic: opcode, (name, min, max, bits) per field, and the field names.
_LAYOUT = {
    spec.mnemonic: (
        spec.opcode,
        tuple((f.name, f.min_value, f.max_value, f.bits) for f in spec.fields),
        frozenset(f.name for f in spec.fields),
    )
    for spec in isa.INSTRUCTIONS
}


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
        """Add a crossbar image; its index.

        The cells are copied into memory nothing can write (a ``bytes`` object), which
        prepared programs then share instead of copying. Broadcast placeholders (cost-only
        programs) stay views.
        """
        cells = np.asarray(cells, np.uint8)
        if 0 not in cells.strides:
            cells = np.frombuffer(cells.tobytes(), np.uint8).reshape(cells.shape)
        self.images.append(CrossbarImage(cells, differential_rows))
        return len(self.images) - 1

    def constant(self, values: np.ndarray) -> int:
        self.constants.append(np.ascontiguousarray(values, dtype=np.int64))
        return len(self.constants) - 1

    def emit(self, mnemonic: str, **operands: int) -> None:
        opcode, fields, names = _LAYOUT[mnemonic]
        if not names.issuperset(operands):
            unknown = sorted(set(operands) - names)
            raise ProgramError(f"{mnemonic}: unknown operand(s) {unknown}")
        row = [opcode]
        for name, lo, hi, bits in fields:
            value = int(operands.get(name, 0))
            if not lo <= value <= hi:
                raise ProgramError(
                    f"{mnemonic}: {name}={value} does not fit {bits} bits",
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


def progb_params(
    col: int,
    k: int,
    n: int,
    bits: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    transpose: bool = False,
) -> np.ndarray:
    """The ``[1, 9]`` params constant of a ``progb`` (see ``isa.PROGB_PARAMS``).

    Parameters
    ----------
    col
        First buffer column of the operand.
    k, n
        The operand's inputs (contraction length) and outputs.
    bits
        Its width: values are signed ``bits``-wide integers.
    rows, cols
        The tile: inputs ``(r0, r1)`` and logical columns ``(c0, c1)``, ends excluded.
    transpose
        The buffer holds the operand transposed (``n`` rows of ``k`` columns per item).
    """
    values = [col, k, n, int(transpose), bits, *rows, *cols]
    return np.array([values], dtype=np.int64)
