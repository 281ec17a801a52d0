"""Exceptions for errors a user can cause.

Every error that bad input (an architecture description, a program, run-time
tensors) can trigger derives from :class:`CimError`, so callers can catch one
type. A failure of the compiler itself on input it accepted is an
:class:`InternalCompilerError`, which names the model's operators it was working on
and is deliberately not a ``CimError``: the command lines exit with their internal-error
status for it. Other internal bugs raise the usual built-in exceptions.
"""

from __future__ import annotations

__all__ = [
    "CimError",
    "ArchError",
    "ProgramError",
    "InputError",
    "UnsupportedOperator",
    "InternalCompilerError",
]


class CimError(Exception):
    """Base class of all errors a user of tvm-cim can cause."""


class ArchError(CimError):
    """An architecture description is invalid.

    Parameters
    ----------
    message
        What is wrong, naming the field and the allowed values.
    field
        Name of the offending field (or key path in a file), when known.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ProgramError(CimError):
    """A crossbar program is invalid or malformed.

    Parameters
    ----------
    message
        What is wrong.
    index
        Index of the offending instruction; the message is prefixed with
        ``"instruction {index}: "``.
    offset
        Byte offset in the encoded program; the message is prefixed with
        ``"offset {offset}: "`` (after the instruction prefix when both are given).
    """

    def __init__(self, message: str, *, index: int | None = None, offset: int | None = None):
        if offset is not None:
            message = f"offset {offset}: {message}"
        if index is not None:
            message = f"instruction {index}: {message}"
        super().__init__(message)
        self.index = index
        self.offset = offset


class InputError(CimError):
    """Run-time inputs are wrong: unknown names, shapes, dtypes or out-of-range values."""


class UnsupportedOperator(CimError):
    """Operators the pattern table matched are in a form the codegen cannot take.

    Parameters
    ----------
    message
        Why, naming the operator.
    operators
        Names of the operators (ONNX node names) concerned; they can run on the CPU.
    """

    def __init__(self, message: str, operators=()) -> None:
        super().__init__(message)
        self.operators = list(operators)


class InternalCompilerError(RuntimeError):
    """The compiler failed on operators it had accepted: a bug, not bad input.

    Parameters
    ----------
    cause
        The exception raised inside the compiler.
    stage
        What the compiler was doing ("reading", "lowering", "partitioning").
    operators
        Names of the operators (ONNX node names) it was working on.
    """

    def __init__(self, cause: BaseException, stage: str, operators=()) -> None:
        self.operators = list(operators)
        self.stage = stage
        where = f" {', '.join(self.operators)}" if self.operators else ""
        super().__init__(
            f"internal compiler error while {stage}{where}: {type(cause).__name__}: {cause}"
        )
