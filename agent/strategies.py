"""Search strategies under one episode budget: DQN, DDPG, Optuna TPE and random search.

Each strategy plays ``episodes`` complete policies and hands every one to an
``EpisodeRecorder``, which logs it (or, in a resumed search, checks it against the log).
DQN, DDPG and random search play ``CimQuantEnv``; TPE suggests the same widths directly
from an Optuna study.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.noise import ActionNoise

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import Bits

from .config import DDPGConfig, DQNConfig, TPEConfig
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


def run_random(env: CimQuantEnv, recorder: EpisodeRecorder, episodes: int, seed: int) -> None:
    """Uniformly random actions, one generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    wrapped = _Recording(env, recorder)
    for _ in range(episodes):
        wrapped.reset(seed=int(rng.integers(2**31)))
        terminated = False
        while not terminated:
            _, _, terminated, _, _ = wrapped.step(int(rng.integers(env.action_space.n)))


def _learn(algorithm, wrapped, env: CimQuantEnv, episodes: int, seed: int, config, **settings):
    """Train an SB3 off-policy ``algorithm`` for exactly ``episodes`` episodes, with the
    settings DQN and DDPG share: every transition kept, a random warm-up of
    ``config.warmup_fraction`` of the budget, one update round per step."""
    total = episodes * env.decisions
    warmup_episodes = max(1, math.ceil(config.warmup_fraction * episodes))
    model = algorithm(
        "MlpPolicy",
        wrapped,
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
    model.learn(total_timesteps=total)


def run_dqn(
    env: CimQuantEnv,
    recorder: EpisodeRecorder,
    episodes: int,
    seed: int,
    config: DQNConfig | None = None,
) -> None:
    """Stable-Baselines3 ``DQN`` for ``episodes`` episodes (deterministic for ``seed``)."""
    from stable_baselines3 import DQN

    config = config or DQNConfig()
    shaped = _LatencyShaping(env) if config.latency_shaping else env
    wrapped = _Recording(shaped, recorder, config.reward_scale)
    _learn(
        DQN,
        wrapped,
        env,
        episodes,
        seed,
        config,
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


def run_ddpg(
    env: CimQuantEnv,
    recorder: EpisodeRecorder,
    episodes: int,
    seed: int,
    config: DDPGConfig | None = None,
) -> None:
    """Stable-Baselines3 ``DDPG`` on the continuous action, as in HAQ and CIM-AQ."""
    from stable_baselines3 import DDPG

    config = config or DDPGConfig()
    noise = _DecayingNormalNoise(
        config.noise_sigma, config.noise_decay, np.random.default_rng(seed)
    )
    wrapped = _Recording(ContinuousActions(env), recorder, config.reward_scale)
    _learn(
        DDPG,
        wrapped,
        env,
        episodes,
        seed,
        config,
        tau=config.tau,
        gradient_steps=1,
        action_noise=noise,
    )


# ---------------------------------------------------------------------------- TPE


def open_study(storage: str, name: str, seed: int, episodes: int, resume: bool, config=None):
    """The Optuna study of a TPE search, created or (``resume``) loaded from ``storage``."""
    import optuna

    config = config or TPEConfig()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # ``multivariate`` is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=max(1, math.ceil(config.startup_fraction * episodes)),
            multivariate=config.multivariate,
        )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler,
            direction="maximize",
            load_if_exists=True,
        )
        finished = _complete_trials(study)
    except Exception as exc:  # SQLAlchemy and Optuna raise many types for a bad storage
        raise CimError(f"cannot open the Optuna study {name!r} at {storage}: {exc}") from None
    if finished and not resume:
        raise CimError(
            f"the Optuna study {name!r} at {storage} already holds {len(finished)} trials; "
            "pass --resume to continue it or choose another --storage"
        )
    return study


def _complete_trials(study):
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def run_tpe(env: CimQuantEnv, recorder: EpisodeRecorder, episodes: int, study) -> None:
    """Optuna TPE: each trial suggests every searched width; the objective is the reward.

    The study is the record of a TPE search: trials it already holds are replayed into
    the log (those the log lacks are added) and only the rest of the budget is run.
    """
    import optuna

    scorer = env.scorer
    names = scorer.table.names

    def outcome_of(params: dict) -> Outcome:
        policy = list(env.bits_template())
        for op in env.searched:
            policy[op] = Bits(params[f"{names[op]}.w_bits"], params[f"{names[op]}.a_bits"])
        return scorer.score(tuple(policy))

    for trial in _complete_trials(study):
        if recorder.count >= episodes:
            break
        recorder.record(outcome_of(trial.params))

    def objective(trial: optuna.Trial) -> float:
        params = {}
        for op in env.searched:
            for kind, choices in (("w_bits", env.w_choices), ("a_bits", env.a_choices)):
                key = f"{names[op]}.{kind}"
                params[key] = trial.suggest_categorical(key, choices)
        return outcome_of(params).reward

    def after_trial(study, trial) -> None:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            recorder.record(outcome_of(trial.params))

    remaining = episodes - recorder.count
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, callbacks=[after_trial])
