"""Search strategies under one episode budget: DQN, DDPG, Optuna TPE and random search.

Each strategy plays ``episodes`` complete policies and hands every one to an
``EpisodeRecorder``, which logs it (or, in a resumed search, checks it against the log).
DQN, DDPG and random search play ``CimQuantEnv``; TPE suggests the same widths directly
from an Optuna study.

Resume: a resumed random search reruns from the start with the same seed, and the
recorder hands back the logged outcome of every episode the log holds (the accuracy is
not measured again, and measuring or skipping it leaves every global random state as it
was), so it draws the same numbers as an uninterrupted run. DQN and DDPG continue from
their agent checkpoint (``checkpoint.py``), written at every episode boundary: the
episodes after it are replayed the same way, and a larger budget extends the agent.
Without a usable checkpoint they replay from the start, as random search does, which
holds for the budget the log began with.

TPE (``tpe.py``) keeps its record in the Optuna study.

Several evaluations in flight (``--workers``, ``cluster.py``): random search draws a batch
of policies and measures them together, which logs what one at a time logs; DQN and DDPG
play ``envs`` environments in lockstep (an SB3 vectorized environment), whose episodes
end at the same step and are measured together, and learn from each finished round.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
from stable_baselines3 import DDPG, DQN
from stable_baselines3.common.noise import ActionNoise, VectorizedActionNoise
from stable_baselines3.common.vec_env import DummyVecEnv

from tvm_cim.core.errors import CimError

from . import checkpoint
from .config import DDPGConfig, DQNConfig
from .env import CimQuantEnv, ContinuousActions
from .log import EpisodeLog
from .scoring import Outcome

STRATEGIES = ("dqn", "ddpg", "tpe", "random")


class EpisodeRecorder:
    """Receives each finished episode: logs new ones, checks replayed ones against the log.

    ``on_episode(index, outcome, best)`` is called for every episode (progress display).
    """

    def __init__(self, log: EpisodeLog, on_episode: Callable | None = None):
        self.log = log
        self.on_episode = on_episode
        self.count = 0
        self.best: Outcome | None = None
        self._clock = time.perf_counter()

    def record(self, outcome: Outcome) -> None:
        index = self.count
        if index < len(self.log.episodes):
            logged = self.log.episodes[index]
            if logged.policy != outcome.policy:
                raise CimError(
                    f"{self.log.path}: the resumed search diverges from its log at episode "
                    f"{index}; the log was written by a different version or setting"
                )
            outcome = logged
        else:
            self.log.add_episode(outcome, time.perf_counter() - self._clock)
        self._clock = time.perf_counter()
        self.count += 1
        if self.best is None or outcome.reward > self.best.reward:
            self.best = outcome
        if self.on_episode is not None:
            self.on_episode(index, outcome, self.best)


class _Recording(gym.Wrapper):
    """Hands each finished episode's outcome to the recorder; scales the learning reward."""

    def __init__(self, env, recorder: EpisodeRecorder, reward_scale: float = 1.0):
        super().__init__(env)
        self.recorder = recorder
        self.reward_scale = reward_scale

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated:
            self.recorder.record(info["outcome"])
        return obs, reward * self.reward_scale, terminated, truncated, info


class _LatencyShaping(gym.Wrapper):
    """Potential-based shaping (Ng et al., 1999) for learning, not for the log: each step
    earns the change of ``latency_gain * (W8A8 latency / projected latency - 1)``, and
    the last step gives the accumulated potential back, so every episode's return is the
    CIM-AQ reward while the latency part of the credit arrives at the operator that
    earned it. Optimal policies are unchanged."""

    def __init__(self, env):
        super().__init__(env)
        self._potential = 0.0

    def _potential_now(self) -> float:
        base = self.env.unwrapped
        gain = base.scorer.reward.latency_gain
        return gain * (base.scorer.reference_latency_us / base.projected_latency() - 1.0)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._potential = self._potential_now()
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        potential = 0.0 if terminated else self._potential_now()
        reward += potential - self._potential
        self._potential = potential
        return obs, reward, terminated, truncated, info


def run_random(
    env: CimQuantEnv, recorder: EpisodeRecorder, episodes: int, seed: int, batch: int = 1
) -> None:
    """Uniformly random actions from one generator seeded with ``seed``, ``batch``
    policies measured at a time (the same episodes for every batch size)."""
    rng = np.random.default_rng(seed)
    while recorder.count < episodes:
        count = min(batch, episodes - recorder.count)
        policies = [
            env.policy_of(rng.integers(env.action_space.n, size=env.decisions))
            for _ in range(count)
        ]
        env.scorer.prefetch(policies)
        for policy in policies:
            recorder.record(env.scorer.score(policy))


def _base_action(env: gym.Env, action):
    """``action`` as the innermost environment receives it, through the action wrappers."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, gym.ActionWrapper):
            action = env.action(action)
        env = env.env
    return action


class _MeasuringVecEnv(DummyVecEnv):
    """SB3's ``DummyVecEnv`` (its environments stepped in order), except that the policies
    a step completes are first measured together on the scorer's pool."""

    def step_wait(self):
        scorer = self.envs[0].unwrapped.scorer
        completed = [
            env.unwrapped.completed_policy(_base_action(env, action))
            for env, action in zip(self.envs, self.actions, strict=True)
        ]
        scorer.prefetch([policy for policy in completed if policy is not None])
        return super().step_wait()


def check_lockstep_budget(episodes: int, envs: int) -> None:
    """DQN and DDPG play ``envs`` episodes at a time, so the budget is whole rounds."""
    if episodes % envs:
        raise CimError(
            f"DQN and DDPG play --workers {envs} episodes at a time: --episodes {episodes} "
            f"is not a multiple of {envs}"
        )


def _learn(
    algorithm, wrap: Callable, env: CimQuantEnv, episodes: int, seed: int, config, agent, envs,
    **settings,
):  # fmt: skip
    """Train an SB3 off-policy ``algorithm`` for exactly ``episodes`` episodes, with the
    settings DQN and DDPG share: every transition kept, a random warm-up of
    ``config.warmup_fraction`` of the budget, one update round per step; ``envs``
    environments (``wrap`` of a copy of ``env`` each) in lockstep; checkpointed at
    ``agent`` (``checkpoint.py``: a resume continues it, a larger budget extends it)."""
    check_lockstep_budget(episodes, envs)
    copies = [env] + [CimQuantEnv(env.scorer, env.space) for _ in range(envs - 1)]
    vector = _MeasuringVecEnv([lambda e=e: wrap(e) for e in copies])
    total = episodes * env.decisions
    warmup_episodes = max(1, math.ceil(config.warmup_fraction * episodes))
    noise = settings.get("action_noise")

    def create():
        return algorithm(
            "MlpPolicy",
            vector,
            learning_rate=config.learning_rate,
            buffer_size=max(total, 1),
            learning_starts=warmup_episodes * env.decisions,
            batch_size=config.batch_size,
            gamma=config.gamma,
            train_freq=1,
            policy_kwargs={"net_arch": list(config.net_arch)},
            seed=seed,
            device="cpu",
            **settings,
        )

    def load(file):
        custom = {} if noise is None else {"action_noise": noise}
        return algorithm.load(file, env=vector, device="cpu", custom_objects=custom)

    identity = {
        "algorithm": algorithm.__name__,
        "seed": seed,
        "settings": dataclasses.asdict(config),
        "decisions": env.decisions,
        "envs": envs,
    }
    recorder = vector.envs[0].recorder
    checkpoint.learn(create, load, recorder, episodes, env.decisions, agent, identity)


class _DQNExploringPerEnv(DQN):
    """SB3's ``DQN`` with epsilon-greedy drawn per environment (SB3 draws once per step
    for all of them, so environments in lockstep would explore, or not, together and
    play the same episode). With one environment it draws exactly what SB3 draws."""

    def predict(self, observation, state=None, episode_start=None, deterministic=False):
        if deterministic or not self.policy.is_vectorized_observation(observation):
            return super().predict(observation, state, episode_start, deterministic)
        explore = np.random.rand(observation.shape[0]) < self.exploration_rate
        if explore.all():
            return np.array([self.action_space.sample() for _ in explore]), state
        action, state = self.policy.predict(observation, state, episode_start, deterministic)
        for i in np.flatnonzero(explore):
            action[i] = self.action_space.sample()
        return action, state


def run_dqn(
    env: CimQuantEnv,
    recorder: EpisodeRecorder,
    episodes: int,
    seed: int,
    config: DQNConfig | None = None,
    agent: Path | None = None,
    envs: int = 1,
) -> None:
    """Stable-Baselines3 ``DQN`` for ``episodes`` episodes (deterministic for ``seed`` and
    ``envs``), checkpointed at ``agent`` (None: no checkpoint; a resume replays from the
    start)."""
    config = config or DQNConfig()

    def wrap(base):
        shaped = _LatencyShaping(base) if config.latency_shaping else base
        return _Recording(shaped, recorder, config.reward_scale)

    _learn(
        _DQNExploringPerEnv,
        wrap,
        env,
        episodes,
        seed,
        config,
        agent,
        envs,
        gradient_steps=config.gradient_steps,
        target_update_interval=config.target_update_interval,
        exploration_fraction=config.exploration_fraction,
        exploration_initial_eps=config.exploration_initial_eps,
        exploration_final_eps=config.exploration_final_eps,
    )


class _DecayingNormalNoise(ActionNoise):
    """Gaussian action noise whose scale shrinks by ``decay`` after every episode."""

    def __init__(self, sigma: float, decay: float, rng: np.random.Generator):
        super().__init__()
        self.sigma, self.decay, self.rng = sigma, decay, rng

    def __call__(self) -> np.ndarray:
        return self.rng.normal(0.0, self.sigma, size=1).astype(np.float32)

    def reset(self) -> None:
        self.sigma *= self.decay


def _action_noise(config: DDPGConfig, seed: int, envs: int) -> ActionNoise:
    """DDPG's exploration noise; with several environments one generator each (SB3's own
    vectorization copies one, which would explore alike), decaying per round as much as
    one environment's decays over as many episodes."""
    rng = np.random.default_rng(seed)
    if envs == 1:
        return _DecayingNormalNoise(config.noise_sigma, config.noise_decay, rng)
    decay = config.noise_decay**envs
    noises = [_DecayingNormalNoise(config.noise_sigma, decay, r) for r in rng.spawn(envs)]
    vectorized = VectorizedActionNoise(noises[0], envs)
    vectorized.noises = noises
    return vectorized


def run_ddpg(
    env: CimQuantEnv,
    recorder: EpisodeRecorder,
    episodes: int,
    seed: int,
    config: DDPGConfig | None = None,
    agent: Path | None = None,
    envs: int = 1,
) -> None:
    """Stable-Baselines3 ``DDPG`` on the continuous action, as in HAQ and CIM-AQ,
    checkpointed at ``agent`` (as for ``run_dqn``)."""
    config = config or DDPGConfig()
    _learn(
        DDPG,
        lambda base: _Recording(ContinuousActions(base), recorder, config.reward_scale),
        env,
        episodes,
        seed,
        config,
        agent,
        envs,
        tau=config.tau,
        gradient_steps=1,
        action_noise=_action_noise(config, seed, envs),
    )
