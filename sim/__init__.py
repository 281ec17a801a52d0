"""Crossbar ISA, program format, verifier and the instruction-level simulator.

Imports neither tvm nor torch: ``cim-sim`` and ``import tvm_cim.sim`` need numpy only.
The modules are layered, each importing only those before it: ``isa`` < ``program`` <
``builder`` < ``asm``, and ``program`` < ``verify`` < ``timing`` < ``reference`` <
``_core`` < ``simulator``.
"""

from .asm import assemble, disassemble
from .builder import ProgramBuilder, im2col_params, progb_params
from .program import CrossbarImage, Program, TensorDesc
from .simulator import PreparedProgram, SimResult, Simulator, available_backends
from .timing import SimStats, estimate, estimate_spans

# Last: the function takes the name of its module as an attribute of the package.
from .verifier import verify

__all__ = [
    "CrossbarImage",
    "PreparedProgram",
    "Program",
    "ProgramBuilder",
    "SimResult",
    "SimStats",
    "Simulator",
    "TensorDesc",
    "assemble",
    "available_backends",
    "disassemble",
    "estimate",
    "estimate_spans",
    "im2col_params",
    "progb_params",
    "verify",
]
