"""Lowering of integer operators to crossbar programs."""

from .mapping import WeightMapping, map_weights, weight_slices
from .matmul import input_steps, lower_matmul

__all__ = ["WeightMapping", "input_steps", "lower_matmul", "map_weights", "weight_slices"]
