"""Latency, accuracy and reward of a complete policy, with the accuracy cached per policy.

Every strategy (DQN, DDPG, TPE, random) scores policies through one ``PolicyScorer``, so
they share the latency table, the accuracy measurement and the reward, and a policy seen
twice costs one evaluation.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import W8A8, Bits

from .latency import LatencyTable
from .space import Reward

Policy = tuple[Bits, ...]


@dataclass(frozen=True)
class Outcome:
    """One scored policy."""

    policy: Policy
    latency_us: float
    accuracy: float
    reward: float

    def to_dict(self) -> dict:
        return {
            "policy": [[b.w_bits, b.a_bits] for b in self.policy],
            "latency_us": self.latency_us,
            "accuracy": self.accuracy,
            "reward": self.reward,
        }


def policy_from_list(pairs: Sequence[Sequence[int]]) -> Policy:
    return tuple(Bits(int(w), int(a)) for w, a in pairs)


class PolicyScorer:
    """Scores policies for one model, arch and reward.

    Parameters
    ----------
    table
        The model's latency table.
    accuracy
        ``accuracy({operator name: Bits}) -> percent``; called once per distinct policy.
    reward
        The reward; its target is the W8A8 accuracy minus ``reward.max_acc_drop``.
    pool
        Measures several policies at once (``cluster.EvaluationPool``, bound to the same
        evaluation as ``accuracy``); None: one at a time, in this process.
    """

    def __init__(
        self,
        table: LatencyTable,
        accuracy: Callable[[Mapping[str, Bits]], float],
        reward: Reward | None = None,
        pool=None,
    ):
        self.table = table
        self.pool = pool
        self.reward = reward or Reward()
        self._accuracy_fn = accuracy
        self._cache: dict[Policy, float] = {}
        self.evaluations = 0
        self.reference_latency_us = table.uniform_latency(W8A8)
        self._reference_accuracy: float | None = None

    @property
    def reference_accuracy(self) -> float:
        """Accuracy at W8A8, the reward's reference."""
        if self._reference_accuracy is None:
            self._reference_accuracy = self.accuracy((W8A8,) * len(self.table.operators))
        return self._reference_accuracy

    def accuracy(self, policy: Policy) -> float:
        policy = tuple(policy)
        self.prefetch([policy])
        return self._cache[policy]

    def prefetch(self, policies: Sequence[Policy]) -> None:
        """Measure the policies not measured yet, in parallel on the pool, so that their
        scores are then at hand."""
        missing = list(dict.fromkeys(tuple(p) for p in policies if tuple(p) not in self._cache))
        if not missing:
            return
        precisions = [dict(zip(self.table.names, p, strict=True)) for p in missing]
        if self.pool is not None:
            values = self.pool.measure(precisions)
        else:
            values = []
            for precision in precisions:
                with _preserved_random_state():
                    values.append(float(self._accuracy_fn(precision)))
        self.evaluations += len(missing)
        self._cache.update(zip(missing, values))

    def prime(self, policy: Policy, accuracy: float) -> None:
        """Record an accuracy measured earlier (a resumed search's log)."""
        self._cache[tuple(policy)] = float(accuracy)

    def score(self, policy: Policy) -> Outcome:
        policy = tuple(policy)
        if len(policy) != len(self.table.operators):
            raise CimError(
                f"a policy of {len(policy)} layers for {len(self.table.operators)} operators"
            )
        latency = self.table.latency(policy)
        accuracy = self.accuracy(policy)
        reward = self.reward(accuracy, self.reference_accuracy, latency / self.reference_latency_us)
        return Outcome(policy, latency, accuracy, reward)


@contextlib.contextmanager
def _preserved_random_state():
    """Run an accuracy measurement without moving Python's, NumPy's or torch's global
    random state, so an agent draws the same numbers whether an accuracy is measured or
    taken from the cache (a resumed search replays its episodes from the cache)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        import torch
    except ImportError:
        torch = None
    torch_state = torch.random.get_rng_state() if torch is not None else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if torch is not None:
            torch.random.set_rng_state(torch_state)


class QatAccuracy:
    """Evaluate a policy as the training stages do: recalibrate ``model`` at the policy,
    finetune ``finetune_steps`` batches, measure validation accuracy.

    With a ``teacher`` (normally ``model`` itself, the W8A8 base) the finetune distils it
    at ``temperature`` (``tvm_cim.learn.train.policy_model``). Deterministic for
    ``config.seed``.
    """

    def __init__(
        self, model, dataset, finetune_steps: int = 20, config=None, teacher=None, temperature=None
    ):
        from tvm_cim.learn import train

        self.model = model
        self.dataset = dataset
        self.finetune_steps = finetune_steps
        self.config = config or train.TrainConfig()
        self.teacher = teacher
        self.temperature = train.DISTILL_TEMPERATURE if temperature is None else temperature

    def candidate(self, precision: Mapping[str, Bits]):
        """The finetuned model whose accuracy ``__call__`` measures."""
        from tvm_cim.learn import train

        return train.policy_model(
            self.model,
            self.dataset,
            {name: b.to_dict() for name, b in precision.items()},
            finetune_steps=self.finetune_steps,
            config=self.config,
            teacher=self.teacher,
            temperature=self.temperature,
        )

    def __call__(self, precision: Mapping[str, Bits]) -> float:
        from tvm_cim.learn import train

        return train.accuracy(self.candidate(precision), self.dataset.val)


#: QAT recipe of the final finetune a found policy gets before deployment: epochs are a
#: setting (``--final-epochs``), the step size and batch are these.
FINAL_LR, FINAL_BATCH = 2e-4, 32


def final_finetune(candidate, dataset, epochs: int):
    """A copy of ``candidate`` finetuned for ``epochs`` QAT epochs at its widths, kept at
    the epoch (or the start) with the best validation accuracy, so it is never worse on
    the selection split than ``candidate``; returns ``(model, history)``."""
    import copy

    from tvm_cim.learn import train

    tuned = copy.deepcopy(candidate)
    config = train.TrainConfig(epochs=epochs, lr=FINAL_LR, batch_size=FINAL_BATCH, seed=0)
    history = train.fit(tuned, dataset, config, keep_best=True)
    return tuned.eval(), history
