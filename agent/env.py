"""``CimQuantEnv``: one episode assigns bit widths to every searched operator.

The episode walks the searched operators in offload order and asks two questions per
operator, its weight bits and then its activation bits (HAQ's and CIM-AQ's two actions
per layer). The reward is zero until the last answer, then the ``PolicyScorer``'s reward
of the whole policy.

Observation (all in ``[0, 1]``): the operator's normalized features
(``latency.FEATURES``), the previous action as a fraction of its range, whether the next
choice is an activation width, the latency spent so far (operators already decided,
pinned ones included) against the W8A8 latency of the whole model, and the widths
chosen so far for every operator (undecided ones at their initial width). The last part
makes the state Markov: the accuracy a policy reaches depends on all of its choices.

Action: ``Discrete(n)`` with ``n`` the longer of the two choice lists; action ``i``
picks the choice at the same relative position of the current list, so every action is
an allowed width. ``ContinuousActions`` exposes the same choices as a ``Box`` for DDPG.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from tvm_cim.core.precision import MAX_BITS, Bits

from .latency import FEATURES
from .scoring import Outcome, PolicyScorer
from .space import SearchSpace

_EXTRA = ("previous_action", "choosing_activation", "latency_spent")


class CimQuantEnv(gym.Env):
    """Gymnasium environment of the per-operator precision search.

    Parameters
    ----------
    scorer
        Scores finished policies (latency table, accuracy, reward).
    space
        The constraints; the arch's cell bits come from the scorer's table.
    """

    metadata = {"render_modes": []}

    def __init__(self, scorer: PolicyScorer, space: SearchSpace | None = None):
        super().__init__()
        self.scorer = scorer
        self.space = space or SearchSpace()
        table = scorer.table
        self.w_choices = self.space.weight_choices(table.arch.cell_bits)
        self.a_choices = self.space.activation_choices()
        self.searched = self.space.searched(len(table.operators))
        self._features = table.features()
        self.n_choices = max(len(self.w_choices), len(self.a_choices))
        self.action_space = gym.spaces.Discrete(self.n_choices)
        size = len(FEATURES) + len(_EXTRA) + 2 * len(table.operators)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(size,), dtype=np.float32)
        self.last_outcome: Outcome | None = None
        self._reset_state()

    # ------------------------------------------------------------------ decisions

    @property
    def decisions(self) -> int:
        """Actions per episode."""
        return 2 * len(self.searched)

    def choices(self, step: int) -> list[int]:
        return self.a_choices if step % 2 else self.w_choices

    def bits_of(self, action: int, step: int) -> int:
        """The width action ``action`` picks at decision ``step``."""
        choices = self.choices(step)
        if self.n_choices == 1:
            return choices[0]
        return choices[round(int(action) * (len(choices) - 1) / (self.n_choices - 1))]

    # ------------------------------------------------------------------ gymnasium API

    def bits_template(self) -> list[Bits]:
        """A policy with every operator at the pinned width, before any choice."""
        return [self.space.pinned()] * len(self.scorer.table.operators)

    def _reset_state(self):
        self._bits = self.bits_template()
        self._step = 0
        self._pending_w = None
        self._previous = 0.0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._reset_state()
        return self._observation(), {}

    def step(self, action):
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action!r} outside {self.action_space}")
        if self._step >= self.decisions:
            raise RuntimeError("step() after the episode ended; call reset()")
        bits = self.bits_of(action, self._step)
        choices = self.choices(self._step)
        self._previous = choices.index(bits) / max(len(choices) - 1, 1)
        op = self.searched[self._step // 2]
        if self._step % 2 == 0:
            self._pending_w = bits
        else:
            self._bits[op] = Bits(self._pending_w, bits)
        self._step += 1
        if self._step < self.decisions:
            return self._observation(), 0.0, False, False, {}
        outcome = self.scorer.score(tuple(self._bits))
        self.last_outcome = outcome
        info = {"outcome": outcome}
        return self._observation(), float(outcome.reward), True, False, info

    def completed_policy(self, action) -> tuple[Bits, ...] | None:
        """The policy ``step(action)`` would complete and score; None before the last
        decision (a vectorized search measures the policies a step completes together)."""
        if self._step != self.decisions - 1:
            return None
        bits = list(self._bits)
        bits[self.searched[-1]] = Bits(self._pending_w, self.bits_of(action, self._step))
        return tuple(bits)

    def policy_of(self, actions) -> tuple[Bits, ...]:
        """The policy a whole episode of ``actions`` plays, without scoring it."""
        bits = self.bits_template()
        for i, op in enumerate(self.searched):
            bits[op] = Bits(
                self.bits_of(actions[2 * i], 2 * i), self.bits_of(actions[2 * i + 1], 2 * i + 1)
            )
        return tuple(bits)

    def projected_latency(self) -> float:
        """Latency of the policy so far, with undecided operators still at their initial
        (pinned) widths: the model's latency if the episode stopped choosing now."""
        return self.scorer.table.latency(self._bits)

    def _observation(self) -> np.ndarray:
        index = self.searched[min(self._step, self.decisions - 1) // 2]
        table = self.scorer.table
        decided = [i for i in range(len(table.operators)) if i not in self.searched or i < index]
        if self._step >= self.decisions:
            decided = list(range(len(table.operators)))
        spent = sum(table.operator_latency(i, self._bits[i]) for i in decided)
        extra = [
            self._previous,
            float(self._step % 2),
            min(spent / self.scorer.reference_latency_us, 1.0),
        ]
        chosen = [(b.w_bits - 1) / (MAX_BITS - 1) for b in self._bits]
        chosen += [(b.a_bits - 1) / (MAX_BITS - 1) for b in self._bits]
        return np.concatenate([self._features[index], extra, chosen]).astype(np.float32)


class ContinuousActions(gym.ActionWrapper):
    """The same choices as a ``Box([0, 1])`` action, rounded to the nearest choice (HAQ's
    DDPG action)."""

    def __init__(self, env: CimQuantEnv):
        super().__init__(env)
        self.action_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)

    def action(self, action):
        value = float(np.clip(np.asarray(action).reshape(-1)[0], 0.0, 1.0))
        return int(round(value * (self.env.unwrapped.n_choices - 1)))
