"""Crossbar ISA, program format, verifier and the instruction-level simulator.

Imports neither tvm nor torch: ``cim-sim`` and ``import tvm_cim.sim`` need numpy only.
"""

from .builder import ProgramBuilder, im2col_params
from .program import CrossbarImage, Program, TensorDesc
from .simulator import PreparedProgram, SimResult, Simulator, available_backends
from .timing import SimStats

__all__ = [
    "CrossbarImage",
    "PreparedProgram",
    "Program",
    "ProgramBuilder",
    "SimResult",
    "SimStats",
    "Simulator",
    "TensorDesc",
    "available_backends",
    "im2col_params",
]
