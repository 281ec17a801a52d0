"""Training stages (FP32 pretraining, W8A8 QAT, mixed-precision finetuning) and checkpoints.

The stages follow CIM-AQ: a float model is trained first, then quantization-aware
training at W8A8 starts from it, and mixed-precision finetuning starts from the W8A8
model with a per-layer precision. ``evaluate_policy`` is the short "how accurate is this
precision?" step the search calls many times.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tvm_cim.core import files
from tvm_cim.core.errors import CimError
from tvm_cim.core.files import atomic_path
from tvm_cim.learn import data as datasets
from tvm_cim.learn import qat, zoo

STAGES = ("fp32", "w8a8", "mixed")


@dataclass
class TrainConfig:
    """Settings of one training stage.

    Attributes
    ----------
    epochs
        Passes over the training split.
    lr
        Adam learning rate (cosine-annealed to zero over the stage).
    batch_size
        Samples per step.
    seed
        Seeds parameter initialization, shuffling and everything random.
    calibration_batches
        Training batches that set the activation scales before QAT starts.
    """

    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    calibration_batches: int = 4


@dataclass
class StageResult:
    """What a stage produced: accuracies (percent), time, per-epoch history."""

    stage: str
    model: str
    dataset: str
    precision: dict | None
    val_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict] = field(default_factory=list)


def accuracy(model: nn.Module, split, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent of ``model`` (eval mode) on ``(x, y)`` arrays."""
    x, y = split
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(torch.from_numpy(x[i : i + batch_size]))
            correct += int((logits.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(y)


def predictions(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [
                model(torch.from_numpy(x[i : i + batch_size])).numpy()
                for i in range(0, len(x), batch_size)
            ]
        )


def fit(
    model: nn.Module,
    dataset: datasets.Dataset,
    config: TrainConfig,
    progress: bool = False,
    keep_best: bool = False,
) -> list[dict]:
    """Train ``model`` on the training split; returns one record per epoch.

    With ``keep_best`` the model ends with the weights of the epoch, or of the start
    (epoch 0), with the highest validation accuracy (the earliest on a tie), so training
    never returns a model worse on the validation split than the one it was given; the
    kept record says ``"kept": True`` and the history then begins with the start's record.
    """
    history, best_state = [], None
    if keep_best:
        history.append({"epoch": 0, "val_accuracy": accuracy(model, dataset.val)})
        best_state = copy.deepcopy(model.state_dict())
    torch.manual_seed(config.seed)
    train_loader, _, _ = dataset.loaders(config.batch_size, seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = max(1, config.epochs * len(train_loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.CrossEntropyLoss()
    epochs = range(config.epochs)
    if progress:
        from tqdm import tqdm

        epochs = tqdm(epochs, desc="train", unit="epoch")
    for epoch in epochs:
        model.train()
        start, total = time.perf_counter(), 0.0
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(y)
        record = {
            "epoch": epoch + 1,
            "loss": total / len(dataset.train[1]),
            "val_accuracy": accuracy(model, dataset.val),
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if progress:
            epochs.set_postfix(loss=f"{record['loss']:.3f}", val=f"{record['val_accuracy']:.1f}%")
        if keep_best and record["val_accuracy"] > max(r["val_accuracy"] for r in history[:-1]):
            best_state = copy.deepcopy(model.state_dict())
    if keep_best:
        best = max(history, key=lambda r: r["val_accuracy"])  # the earliest of equals
        best["kept"] = True
        model.load_state_dict(best_state)
    return history


def calibration_batches(dataset: datasets.Dataset, config: TrainConfig):
    """The first ``config.calibration_batches`` training batches, in a fixed order."""
    x = torch.from_numpy(dataset.train[0])
    n = config.calibration_batches * config.batch_size
    return [x[i : i + config.batch_size] for i in range(0, min(n, len(x)), config.batch_size)]


def _prepare_and_calibrate(
    model: nn.Module, precision, dataset: datasets.Dataset, config: TrainConfig
) -> None:
    """Set ``precision`` on ``model`` (preparing a float model for QAT; a prepared one
    keeps its layers) and recompute its activation scales on the training split."""
    qat.prepare(model, precision)
    qat.calibrate(model, calibration_batches(dataset, config))


def run_stage(
    stage: str,
    model_name: str,
    dataset_name: str,
    config: TrainConfig,
    *,
    precision=None,
    start: nn.Module | None = None,
    progress: bool = False,
) -> tuple[nn.Module, StageResult]:
    """Train one stage; ``start`` is the previous stage's model (else a fresh one)."""
    if stage not in STAGES:
        raise CimError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if stage == "mixed" and precision is None:
        raise CimError("the mixed stage needs a precision config")
    dataset = datasets.load(dataset_name, seed=config.seed)
    torch.manual_seed(config.seed)
    model = copy.deepcopy(start) if start is not None else zoo.build(model_name)
    began = time.perf_counter()
    if stage != "fp32":
        bits = precision if stage == "mixed" else {"default": {"w_bits": 8, "a_bits": 8}}
        _prepare_and_calibrate(model, bits, dataset, config)
    history = fit(model, dataset, config, progress=progress)
    result = StageResult(
        stage=stage,
        model=model_name,
        dataset=dataset_name,
        precision=qat.precision_of(model) if stage != "fp32" else None,
        val_accuracy=accuracy(model, dataset.val),
        test_accuracy=accuracy(model, dataset.test),
        seconds=time.perf_counter() - began,
        history=history,
    )
    return model, result


#: Temperature that softens the teacher's and the candidate's logits in a distilled
#: policy finetune; 4 ranked policies at least as well as 2 (``bench/predictive.py``).
DISTILL_TEMPERATURE = 4.0


def policy_model(
    model: nn.Module,
    dataset: datasets.Dataset,
    precision,
    *,
    finetune_steps: int = 0,
    config: TrainConfig | None = None,
    teacher: nn.Module | None = None,
    temperature: float = DISTILL_TEMPERATURE,
    distill_weight: float = 1.0,
) -> nn.Module:
    """A prepared copy of ``model`` at ``precision``: recalibrated on the training split,
    then finetuned for ``finetune_steps`` batches (more than an epoch's batches continue
    into the next, reshuffled, epoch). Deterministic for ``config.seed``; ``model`` (float
    or prepared) and ``teacher`` are left untouched.

    With a ``teacher`` (the W8A8 model the policy starts from) the finetune distils it:
    the loss adds to the cross-entropy ``distill_weight * temperature**2`` times the KL
    divergence from the teacher's to the candidate's logits, both softened by
    ``temperature``, so a few steps pull the candidate towards the teacher's outputs
    rather than only towards the few labels they see."""
    config = config or TrainConfig()
    torch.manual_seed(config.seed)
    candidate = copy.deepcopy(model)
    _prepare_and_calibrate(candidate, precision, dataset, config)
    if teacher is not None:
        teacher = copy.deepcopy(teacher).eval()
    if finetune_steps:
        optimizer = torch.optim.Adam(candidate.parameters(), lr=config.lr * 0.1)
        loader, _, _ = dataset.loaders(config.batch_size, seed=config.seed)
        candidate.train()
        step = 0
        while step < finetune_steps:  # past an epoch's batches: the next, reshuffled, epoch
            for x, y in loader:
                optimizer.zero_grad()
                logits = candidate(x)
                loss = nn.functional.cross_entropy(logits, y)
                if teacher is not None:  # temperature**2: a gradient size free of it
                    with torch.no_grad():
                        target = nn.functional.log_softmax(teacher(x) / temperature, dim=1)
                    student = nn.functional.log_softmax(logits / temperature, dim=1)
                    kl = nn.functional.kl_div(
                        student, target, reduction="batchmean", log_target=True
                    )
                    loss = loss + distill_weight * temperature**2 * kl
                loss.backward()
                optimizer.step()
                step += 1
                if step == finetune_steps:
                    break
    return candidate.eval()


def evaluate_policy(model: nn.Module, dataset: datasets.Dataset, precision, **options) -> float:
    """Validation accuracy (percent) of ``policy_model(model, dataset, precision,
    **options)`` (``finetune_steps``, ``config``): the "evaluate this policy" step of the
    precision search."""
    return accuracy(policy_model(model, dataset, precision, **options), dataset.val)


# ------------------------------------------------------------------ checkpoints


def save_checkpoint(model: nn.Module, result: StageResult, path) -> Path:
    """Weights, precision and metrics of a stage, for ``--from`` and for compiling."""
    path = Path(path)
    blob = {
        "model": result.model,
        "dataset": result.dataset,
        "stage": result.stage,
        "precision": result.precision,
        "state_dict": model.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


def load_checkpoint(path, model_name: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint holds; ``model_name`` must match it if given."""
    path = Path(path)
    if not path.is_file():
        raise CimError(f"checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise CimError(f"{path}: not a tvm-cim checkpoint ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or "model" not in blob or "state_dict" not in blob:
        raise CimError(f"{path}: not a tvm-cim checkpoint")
    if model_name is not None and blob["model"] != model_name:
        raise CimError(f"{path} holds a {blob['model']!r} model, not {model_name!r}")
    model = zoo.build(blob["model"])
    if blob.get("precision"):
        qat.prepare(model, blob["precision"])
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise CimError(f"{path}: weights do not fit {blob['model']!r}: {exc}") from None
    model.eval()
    return model, blob


def write_metrics(result: StageResult, path) -> None:
    files.write_text(path, json.dumps(asdict(result), indent=2))
