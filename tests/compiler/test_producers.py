"""Shared QuantizeLinear/DequantizeLinear pairs, as onnxruntime's quantizer writes them.

onnxruntime shares one QuantizeLinear/DequantizeLinear pair among all readers of a tensor
unless ``DedicatedQDQPair`` is set; on a residual network the pair feeding a convolution
also feeds the residual ``Add``. Partitioning copies such a pair per reader, so the
conformance suite's residual CNN compiles whole in both modes
(``tests/conformance/test_onnxruntime.py``). Without that copy, the pattern check alone
must keep the build whole: a match that would swallow a value the rest of the graph also
reads is refused.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

from tests.conformance import suite  # noqa: E402
from tvm_cim.compiler.frontend import load_onnx  # noqa: E402


def test_a_match_never_swallows_a_value_others_read(tmp_path):
    """Without dedicated pairs, the pattern that would take conv_a together with the pair
    the residual add also reads is refused: the build stays whole and conv_a stays on the
    CPU."""
    from tvm_cim.relay_passes.canonicalize import clips_from_min_max
    from tvm_cim.relay_passes.extract import read_region
    from tvm_cim.relay_passes.partition import name_operators, offloaded_functions
    from tvm_cim.relay_passes.patterns import cim_patterns

    float_path = suite.export_float("residual", tmp_path / "float.onnx")
    shared = suite.OrtSettings(dedicated_pairs=False)
    path = suite.quantize_with_onnxruntime(float_path, shared, tmp_path / "qdq.onnx")
    mod, names = load_onnx(path)
    mod = clips_from_min_max(name_operators(mod, names))
    mod = relax.transform.FuseOpsByPattern(
        cim_patterns(), bind_constants=True, annotate_codegen=False
    )(mod)
    mod = relax.transform.MergeCompositeFunctions()(mod)
    ops = [op.name for gv, fn in offloaded_functions(mod) for op in read_region("r", fn).ops]
    assert ops == ["/stem/Conv", "/conv_b/Conv", "/head/Gemm"]
