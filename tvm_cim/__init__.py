"""tvm-cim: mixed-precision compilation and simulation for RRAM Computing-in-Memory.

A model is partitioned with TVM, its crossbar-friendly operators are lowered to
bit-serial crossbar programs, and an instruction-level simulator runs them
bit-exactly and reports their latency.

Importing this package is cheap: it does not import TVM or PyTorch. Everything else loads
on first use (PEP 562): ``tvm_cim.build`` imports TVM, ``tvm_cim.data.load(...)`` the data
module. The ``cim`` target (tag, Relax pipeline, patterns, ``relax.ext.cim`` codegen and the
``tvm_cim.run`` runtime function) is registered with TVM as soon as TVM is imported, in
either order.

The floors, bottom up (``docs/architecture.md``): ``core`` (arch, quantization, precision,
errors), ``sim``, ``codegen``, ``relay_passes`` and ``learn`` (datasets, model zoo, QAT,
training), ``compiler`` (the face: build, partition, reports, frontends, runtime),
``agent`` (precision search), ``workflows`` (latency study, demo) and ``cli``.
"""

import importlib

from .compiler import hook
from .core.arch import CimArch
from .core.errors import ArchError, CimError, InputError, ProgramError

__version__ = "0.1.0"

#: Public names that load on first use, and the module that defines each.
_LAZY_ATTRIBUTES = {
    "build": "compiler.flow",
    "partition_for_cim": "compiler.flow",
    "compile_for_cim": "compiler.flow",
    "cost_report": "compiler.flow",
    "plan_for_cim": "compiler.plan",
    "Precision": "core.precision",
}

#: Modules reachable as attributes (``tvm_cim.qat.prepare``), by their short names.
_LAZY_MODULES = {
    "arch": "core.arch",
    "errors": "core.errors",
    "precision": "core.precision",
    "quant": "core.quant",
    "frontend": "compiler.frontend",
    "report": "compiler.report",
    "runtime": "compiler.runtime",
    "data": "learn.data",
    "models": "learn.zoo",
    "qat": "learn.qat",
    "train": "learn.train",
    "study": "workflows.study",
    "agent": "agent",
    "codegen": "codegen",
    "relay_passes": "relay_passes",
    "sim": "sim",
}


def __getattr__(name):
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(f".{_LAZY_ATTRIBUTES[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_ATTRIBUTES) | set(_LAZY_MODULES))


hook.install()

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
    "plan_for_cim",
    "Precision",
    "__version__",
]
