"""A QAT model exported, compiled for cim and run sample by sample on the simulator."""

import numpy as np
import torch

from tvm_cim.learn import qat


def simulated_logits(model, x: np.ndarray, tmp_path, frontend: str):
    """``(logits, report)`` of the prepared ``model`` on ``x`` through ``frontend`` (the
    QDQ ONNX export, or ``torch.export``), compiled at the widths it was trained for."""
    import tvm
    from tvm import relax

    from tvm_cim import compile_for_cim
    from tvm_cim.compiler.frontend import load_onnx, load_torch

    example = torch.from_numpy(x[:1])
    if frontend == "onnx":
        mod, names = load_onnx(qat.export_onnx(model, tmp_path / "model.onnx", example))
    else:
        mod, names = load_torch(model, example)
    ex, report = compile_for_cim(mod, names=names)
    bits = {op.name: {"w_bits": op.w_bits, "a_bits": op.a_bits} for op in report.operators}
    assert bits == qat.precision_of(model)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    outputs = [vm["main"](tvm.runtime.tensor(s[None])) for s in x]
    if frontend != "onnx":  # torch.export programs return a tuple
        outputs = [out[0] for out in outputs]
    return np.concatenate([out.numpy() for out in outputs]), report
