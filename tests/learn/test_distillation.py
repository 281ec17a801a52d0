"""Distilling the W8A8 model in the "evaluate this policy" finetune, on the synthetic set."""

import copy

import pytest

torch = pytest.importorskip("torch")

from tvm_cim.agent.scoring import QatAccuracy  # noqa: E402
from tvm_cim.core.precision import Bits  # noqa: E402
from tvm_cim.learn import data, qat  # noqa: E402
from tvm_cim.learn import train as training  # noqa: E402

W4A4 = {"default": {"w_bits": 4, "a_bits": 4}}
STEPS = 10


@pytest.fixture(scope="module")
def dataset():
    return data.load("synthetic")


@pytest.fixture(scope="module")
def base():
    """A W8A8 digits-mlp: one FP32 epoch, one QAT epoch."""
    config = training.TrainConfig(epochs=1)
    model, _ = training.run_stage("fp32", "digits-mlp", "synthetic", config)
    model, _ = training.run_stage("w8a8", "digits-mlp", "synthetic", config, start=model)
    return model.eval()


def plain_finetune(model, dataset, precision, steps, config):
    """The finetune as it was before distillation: at most one epoch of cross-entropy."""
    torch.manual_seed(config.seed)
    candidate = qat.prepare(copy.deepcopy(model), precision)
    qat.calibrate(candidate, training.calibration_batches(dataset, config))
    optimizer = torch.optim.Adam(candidate.parameters(), lr=config.lr * 0.1)
    loader, _, _ = dataset.loaders(config.batch_size, seed=config.seed)
    candidate.train()
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(candidate(x), y).backward()
        optimizer.step()
    return candidate.eval()


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def largest_change(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_without_teacher_the_finetune_is_unchanged(base, dataset):
    expected = plain_finetune(base, dataset, W4A4, STEPS, training.TrainConfig())
    got = training.policy_model(base, dataset, W4A4, finetune_steps=STEPS, teacher=None)
    assert same_weights(got, expected)


def test_distillation_changes_the_weights_and_repeats(base, dataset):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    plain = training.policy_model(base, dataset, W4A4, finetune_steps=STEPS)
    first = training.policy_model(base, dataset, W4A4, finetune_steps=STEPS, teacher=base)
    again = training.policy_model(base, dataset, W4A4, finetune_steps=STEPS, teacher=base)
    cooler = training.policy_model(
        base, dataset, W4A4, finetune_steps=STEPS, teacher=base, temperature=2.0
    )
    assert same_weights(first, again)
    assert largest_change(first, plain) > 1e-6
    assert largest_change(cooler, first) > 1e-6
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # teacher kept
    assert not base.training


def test_qat_accuracy_passes_the_teacher_on(base, dataset):
    names = qat.layer_names(base)
    precision = dict.fromkeys(names, Bits(4, 4))
    evaluation = QatAccuracy(base, dataset, STEPS, teacher=base, temperature=3.0)
    expected = training.policy_model(
        base,
        dataset,
        {name: {"w_bits": 4, "a_bits": 4} for name in names},
        finetune_steps=STEPS,
        teacher=base,
        temperature=3.0,
    )
    assert same_weights(evaluation.candidate(precision), expected)
    assert evaluation(precision) == training.accuracy(expected, dataset.val)


def test_steps_past_an_epoch_continue_into_the_next(base, dataset):
    config = training.TrainConfig()
    epoch = len(dataset.loaders(config.batch_size, seed=config.seed)[0])
    one = training.policy_model(base, dataset, W4A4, finetune_steps=epoch)
    assert same_weights(one, plain_finetune(base, dataset, W4A4, epoch + 5, config))
    longer = training.policy_model(base, dataset, W4A4, finetune_steps=epoch + 5)
    assert largest_change(longer, one) > 1e-6
