"""Model import for the ``cim`` target: ONNX files, PyTorch modules and calibration data.

``load_onnx`` (``onnx_model``) reads an ONNX file into a Relax module and names the
operators the crossbars may run by their ONNX nodes; ``load_torch`` (``torch_model``)
imports a PyTorch module, float or quantization-aware, through ``torch.export`` and names
them by module path; ``calibration_from_npz`` (``samples``) reads sample inputs for float
models. TVM, ONNX and PyTorch are imported on first use, not with this package.
"""

from .module import count_anchors, main_inputs
from .onnx_model import ANCHOR_OP_TYPES, graph_inputs, load_onnx, onnx_operator_names
from .samples import calibration_from_npz
from .torch_model import load_torch

__all__ = [
    "ANCHOR_OP_TYPES",
    "calibration_from_npz",
    "count_anchors",
    "graph_inputs",
    "load_onnx",
    "load_torch",
    "main_inputs",
    "onnx_operator_names",
]
