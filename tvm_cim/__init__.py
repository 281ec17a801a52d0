"""tvm-cim: mixed-precision compilation and simulation for RRAM Computing-in-Memory.

A model is partitioned with TVM, its crossbar-friendly operators are lowered to
bit-serial crossbar programs, and an instruction-level simulator runs them
bit-exactly and reports their latency.

Importing this package is cheap: it does not import TVM or PyTorch. The
architecture model and the exception hierarchy are available directly.
"""

from .arch import CimArch
from .errors import ArchError, CimError, InputError, ProgramError

__version__ = "0.1.0"

__all__ = ["CimArch", "CimError", "ArchError", "ProgramError", "InputError", "__version__"]
