"""tvm-cim: mixed-precision compilation and simulation for RRAM Computing-in-Memory.

A model is partitioned with TVM, its crossbar-friendly operators are lowered to
bit-serial crossbar programs, and an instruction-level simulator runs them
bit-exactly and reports their latency.

Importing this package is cheap: it does not import TVM or PyTorch. The ``cim`` target
(tag, Relax pipeline, patterns, ``relax.ext.cim`` codegen and the ``tvm_cim.run`` runtime
function) is registered with TVM as soon as TVM is imported, in either order. ``build``
and ``partition_for_cim`` import TVM on first use.
"""

from . import _tvm_hook
from .arch import CimArch
from .errors import ArchError, CimError, InputError, ProgramError

__version__ = "0.1.0"

_LAZY = {
    "build": "compiler",
    "partition_for_cim": "compiler",
    "compile_for_cim": "compiler",
    "cost_report": "compiler",
    "Precision": "precision",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_tvm_hook.install()

__all__ = [
    "CimArch",
    "CimError",
    "ArchError",
    "ProgramError",
    "InputError",
    "build",
    "partition_for_cim",
    "compile_for_cim",
    "cost_report",
    "Precision",
    "__version__",
]
