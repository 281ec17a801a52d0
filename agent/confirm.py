"""Confirmation on the untouched test split: does the found policy's allowed drop hold on
samples the search never saw?

The search ranks policies by their accuracy on the selection (validation) split only.
Once it has chosen, the chosen policy's model and the W8A8 model, each recalibrated and
finetuned exactly as the search measured them, classify the test split, and
:func:`tvm_cim.learn.confidence.compare_accuracy` compares them on those same samples:
the drop with its paired-bootstrap 95 % interval, McNemar's p-value and the verdict on
the allowed drop. The same comparison is made again after the final finetune (the models
that are deployed), which keeps the epoch with the best selection accuracy, so it never
returns a model worse on the selection split than the one the search measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tvm_cim.core.precision import Bits

from .scoring import Outcome, QatAccuracy, final_finetune

#: Confidence level of every interval a search reports.
CONFIDENCE = 0.95

#: The labels of the two policies a search confirms.
BEST, REFERENCE = "best", "W8A8"


@dataclass
class Confirmation:
    """The two policies' models and their comparisons on the test split.

    Attributes
    ----------
    models
        ``{label: model}`` as the search measured them (``BEST`` and ``REFERENCE``).
    finetuned
        ``{label: model}`` after the final finetune (empty without one).
    figures
        JSON-ready: the selection split's size ``val_samples``; ``searched`` and (with a final finetune) ``final`` comparisons, each
        ``AccuracyComparison.to_dict()`` plus both models' selection accuracy; ``final``
        also has ``epochs`` and the ``kept_epoch`` of each model.
    """

    models: dict
    finetuned: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


def _comparison(models: dict, dataset, max_drop: float) -> dict:
    from tvm_cim.learn import train
    from tvm_cim.learn.confidence import compare_accuracy

    x, y = dataset.test
    comparison = compare_accuracy(
        train.predictions(models[REFERENCE], x),
        train.predictions(models[BEST], x),
        y,
        max_drop=max_drop,
        confidence=CONFIDENCE,
    )
    selection = {label: train.accuracy(m, dataset.val) for label, m in models.items()}
    return {
        **comparison.to_dict(),
        "describe": comparison.describe(REFERENCE),
        "val_accuracy": selection,
    }


def confirm(
    best: Outcome,
    reference: Outcome,
    evaluation: QatAccuracy,
    names: Sequence[str],
    max_drop: float,
    final_epochs: int = 0,
) -> Confirmation:
    """Compare ``best`` with ``reference`` on the test split, before and after a final
    finetune of ``final_epochs`` QAT epochs (none if 0)."""

    def model(outcome: Outcome):
        precision: dict[str, Bits] = dict(zip(names, outcome.policy, strict=True))
        return evaluation.candidate(precision)

    models = {BEST: model(best), REFERENCE: model(reference)}
    result = Confirmation(models, figures={"val_samples": len(evaluation.dataset.val[1])})
    result.figures["searched"] = _comparison(models, evaluation.dataset, max_drop)
    if final_epochs:
        kept = {}
        for label, candidate in models.items():
            tuned, history = final_finetune(candidate, evaluation.dataset, final_epochs)
            result.finetuned[label] = tuned
            kept[label] = next(r["epoch"] for r in history if r.get("kept"))
        final = _comparison(result.finetuned, evaluation.dataset, max_drop)
        result.figures["final"] = {**final, "epochs": final_epochs, "kept_epoch": kept}
    return result
