"""Closing the loop: the searched models compiled for ``cim`` and run on the simulator.

For each policy the model the search measured (recalibrated and finetuned exactly as in
the search) is compiled and simulated on the validation and test splits, so its simulated
validation accuracy is comparable with the searched one; the model after the final
finetune (``confirm.py``), the one deployed, is compiled and simulated on the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Bits

from .confirm import Confirmation
from .scoring import Outcome


def simulate(model, policy, dataset, arch, example, splits=("val", "test")) -> dict:
    """Compile ``model`` for ``cim`` and run ``splits`` on the simulator; accuracies of
    PyTorch and of the simulator, their argmax agreement, and the compiled latency."""
    import tvm
    from tvm import relax

    from tvm_cim import compile_for_cim
    from tvm_cim.compiler.frontend import load_torch
    from tvm_cim.learn import train

    mod, names = load_torch(model, example)
    executable, report = compile_for_cim(mod, arch=arch, names=names)
    compiled = [Bits(op.w_bits, op.a_bits) for op in report.operators]
    if compiled != list(policy):
        raise CimError(f"compiled widths {compiled} differ from the policy {list(policy)}")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    entry = {
        "compiled_latency_us": report.sequential_latency_us,
        "scheduled_latency_us": report.total_latency_us,
    }
    for split in splits:
        x, y = getattr(dataset, split)
        logits = np.concatenate([vm["main"](tvm.runtime.tensor(s[None]))[0].numpy() for s in x])
        reference = train.predictions(model, x)
        entry[f"pytorch_{split}_accuracy"] = 100.0 * float((reference.argmax(1) == y).mean())
        entry[f"simulated_{split}_accuracy"] = 100.0 * float((logits.argmax(1) == y).mean())
        entry[f"{split}_argmax_agreement"] = float((logits.argmax(1) == reference.argmax(1)).mean())
    return entry


def verify(
    confirmation: Confirmation,
    outcomes: dict[str, Outcome],
    dataset,
    arch,
    example,
    export: dict[str, Path] | None = None,
) -> dict:
    """``{label: figures}`` for each of ``outcomes``, simulating the confirmation's models
    (and its finetuned ones, on the test split); ``export`` names ONNX files to write the
    deployed model of some labels to (the finetuned one if there is one; ``tvm-cim
    compile`` takes them as they are)."""
    from tvm_cim.learn import qat

    results = {}
    for label, outcome in outcomes.items():
        model = confirmation.models[label]
        entry = {
            "searched_val_accuracy": outcome.accuracy,
            "searched_latency_us": outcome.latency_us,
        }
        entry.update(simulate(model, outcome.policy, dataset, arch, example))
        tuned = confirmation.finetuned.get(label)
        if tuned is not None:
            entry["finetuned"] = simulate(tuned, outcome.policy, dataset, arch, example, ("test",))
        if export and label in export:
            qat.export_onnx((tuned if tuned is not None else model).eval(), export[label], example)
        results[label] = entry
    return results
