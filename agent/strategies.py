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

TPE keeps its record in the Optuna study, and its sampler's random state is not stored
there, so a resumed TPE search rebuilds it:

- trials a killed run left RUNNING are marked FAIL. Optuna 4's ``TPESampler`` reads
  only COMPLETE (and PRUNED) trials, both to count its ``n_startup_trials`` and to model
  the results, and its search space is the intersection over the same trials (RUNNING
  ones only with ``constant_liar``, which is off), so a FAIL trial changes nothing it
  suggests;
- a sampler with the settings the study was created with (``SAMPLER_ATTR``) is asked
  again for every complete trial, in order, on an in-memory twin of the study that is
  told the stored values; each suggestion must equal the stored parameters (else a
  ``CimError``), and the replayed random state becomes the study's sampler's;
- the next trial then suggests what the killed run was evaluating (checked against the
  FAIL trial's parameters), and every later one what the uninterrupted run suggested.

This is exact for one process per study, which the output directory's lock ensures.
Workers sharing a study (a PostgreSQL storage) suggest in an order no replay can
reproduce; they would each keep their own seed, and fail only stale trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
from stable_baselines3.common.noise import ActionNoise

from tvm_cim.core.errors import CimError
from tvm_cim.core.files import folder_problem
from tvm_cim.core.messages import first_line
from tvm_cim.core.precision import Bits

from . import checkpoint
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


def _learn(
    algorithm, wrapped, env: CimQuantEnv, episodes: int, seed: int, config, agent, **settings
):
    """Train an SB3 off-policy ``algorithm`` for exactly ``episodes`` episodes, with the
    settings DQN and DDPG share: every transition kept, a random warm-up of
    ``config.warmup_fraction`` of the budget, one update round per step; checkpointed at
    ``agent`` (``checkpoint.py``: a resume continues it, a larger budget extends it)."""
    total = episodes * env.decisions
    warmup_episodes = max(1, math.ceil(config.warmup_fraction * episodes))
    noise = settings.get("action_noise")

    def create():
        return algorithm(
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

    def load(file):
        custom = {} if noise is None else {"action_noise": noise}
        return algorithm.load(file, env=wrapped, device="cpu", custom_objects=custom)

    identity = {
        "algorithm": algorithm.__name__,
        "seed": seed,
        "settings": dataclasses.asdict(config),
        "decisions": env.decisions,
    }
    checkpoint.learn(create, load, wrapped.recorder, episodes, env.decisions, agent, identity)


def run_dqn(
    env: CimQuantEnv,
    recorder: EpisodeRecorder,
    episodes: int,
    seed: int,
    config: DQNConfig | None = None,
    agent: Path | None = None,
) -> None:
    """Stable-Baselines3 ``DQN`` for ``episodes`` episodes (deterministic for ``seed``),
    checkpointed at ``agent`` (None: no checkpoint; a resume replays from the start)."""
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
        agent,
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
    agent: Path | None = None,
) -> None:
    """Stable-Baselines3 ``DDPG`` on the continuous action, as in HAQ and CIM-AQ,
    checkpointed at ``agent`` (as for ``run_dqn``)."""
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
        agent,
        tau=config.tau,
        gradient_steps=1,
        action_noise=noise,
    )


# ---------------------------------------------------------------------------- TPE

#: Study user attribute holding the sampler settings the study was created with.
SAMPLER_ATTR = "tvm_cim.sampler"


def _new_sampler(settings: dict):
    """A ``TPESampler`` from the settings a study records (see ``SAMPLER_ATTR``)."""
    import optuna

    with warnings.catch_warnings():  # ``multivariate`` is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings["seed"],
            n_startup_trials=settings["n_startup_trials"],
            multivariate=settings["multivariate"],
        )


def _first_line(exc: Exception) -> str:
    """The driver's own message of a SQLAlchemy error, without SQLAlchemy's footer."""
    return first_line(getattr(exc, "orig", None) or exc) or type(exc).__name__


def _sqlite_file(url) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database."""
    database = url.database
    if url.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):  # a URI filename: left to SQLite
        return None
    return Path(database)


#: Seconds a database server may take to accept a connection: a host that went away fails
#: in this time instead of the operating system's minutes.
CONNECT_TIMEOUT_S = 10
#: Attempts at opening a study on a fresh database, where workers started together race to
#: create Optuna's tables (the losers see a unique violation, then find the tables made).
OPEN_ATTEMPTS = 5


def _engine_options(url) -> dict:
    """SQLAlchemy engine options for the study's database: a connect timeout and a
    liveness check of pooled connections on a PostgreSQL server."""
    if url.get_backend_name() != "postgresql":
        return {}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}


def _created_study(storage: str, name: str, sampler):
    """``optuna.create_study`` (or load) on ``storage``, retried while workers started
    together on a fresh database race to create its tables."""
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    options = _engine_options(make_url(storage))
    for attempt in range(OPEN_ATTEMPTS):
        try:
            where = (
                optuna.storages.RDBStorage(storage, engine_kwargs=options) if options else storage
            )
            return optuna.create_study(
                storage=where,
                study_name=name,
                sampler=sampler,
                direction="maximize",
                load_if_exists=True,
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def check_storage(storage: str) -> None:
    """Refuse, before any work and writing nothing, a storage the study cannot live in: an
    unknown dialect or a missing driver, a database that does not answer, a SQLite file
    that is not a database or whose folder cannot be made.

    Raises
    ------
    CimError
        ``cannot open the Optuna study: <reason> (storage <storage>)``.
    """
    import sqlite3

    import sqlalchemy
    from sqlalchemy.engine import make_url

    def refuse(reason: str):
        return CimError(f"cannot open the Optuna study: {reason} (storage {storage})")

    try:
        url = make_url(storage)
        url.get_dialect()
    except Exception as exc:  # SQLAlchemy raises several types for a URL it cannot use
        raise refuse(_first_line(exc)) from None
    if url.get_backend_name() == "sqlite":
        path = _sqlite_file(url)
        if path is None:
            return
        if not path.exists():
            problem = folder_problem(path.parent)
            if problem:
                raise refuse(problem)
            return
        try:  # read-write without create: rolls back what a killed writer left, as Optuna would
            with contextlib.closing(
                sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True)
            ) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise refuse(str(exc)) from None
        return
    try:
        engine = sqlalchemy.create_engine(url, **_engine_options(url))
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as exc:  # a missing driver, a refused connection, bad credentials
        raise refuse(_first_line(exc)) from None


def open_study(storage: str, name: str, seed: int, episodes: int, resume: bool, config=None):
    """The Optuna study of a TPE search, created or (``resume``) loaded from ``storage``.

    A new study records its sampler settings (``SAMPLER_ATTR``); a loaded one keeps those
    it was created with, so a resumed search with a larger budget samples as it began.
    """
    import optuna
    from sqlalchemy.engine import make_url

    config = config or TPEConfig()
    wanted = {
        "seed": seed,
        "n_startup_trials": max(1, math.ceil(config.startup_fraction * episodes)),
        "multivariate": config.multivariate,
    }
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        path = _sqlite_file(make_url(storage))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        study = _created_study(storage, name, _new_sampler(wanted))
        if SAMPLER_ATTR not in study.user_attrs:
            study.set_user_attr(SAMPLER_ATTR, wanted)
        finished = _trials(study, "COMPLETE")
    except Exception as exc:  # SQLAlchemy and Optuna raise many types for a bad storage
        raise CimError(
            f"cannot open the Optuna study {name!r} at {storage}: {_first_line(exc)}"
        ) from None
    if finished and not resume:
        raise CimError(
            f"the Optuna study {name!r} at {storage} already holds {len(finished)} trials; "
            "pass --resume to continue it or choose another --storage"
        )
    return study


def _trials(study, *states: str) -> list:
    """The study's trials in ``states`` (TrialState names), in trial-number order."""
    import optuna

    wanted = tuple(optuna.trial.TrialState[s] for s in states)
    return study.get_trials(deepcopy=False, states=wanted)


def _fail_dead_trials(study) -> dict:
    """Mark FAIL the trials a killed run left RUNNING; return the parameters of the last
    unfinished trial after the last complete one (what the killed run was evaluating), or
    an empty dict.

    The caller holds the search's directory lock, so no live process owns a RUNNING
    trial. Workers sharing one study would instead fail the trials whose heartbeat
    stopped (Optuna's ``heartbeat_interval`` and ``fail_stale_trials``).
    """
    import optuna

    for trial in _trials(study, "RUNNING"):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    pending: dict = {}
    for trial in _trials(study, "COMPLETE", "FAIL"):
        complete = trial.state == optuna.trial.TrialState.COMPLETE
        pending = {} if complete else dict(trial.params)
    return pending


def _random_states(sampler) -> tuple:
    """The generators of a ``TPESampler`` (its own and its start-up random sampler's):
    with the study's trials, everything its next suggestion depends on."""
    try:
        return sampler._rng.rng, sampler._random_sampler._rng.rng
    except AttributeError:
        raise CimError(
            "cannot resume a TPE search with this Optuna version (the sampler's random "
            "state moved); start a new search or install optuna 4"
        ) from None


def _replayed_sampler(study, done: list, suggest: Callable):
    """A sampler in the state the uninterrupted search's was in after the trials ``done``.

    A fresh sampler with the study's settings is asked again, on an in-memory twin of the
    study, for each trial in order, and told the stored value; every suggestion must
    equal the stored parameters. Its random state then moves to a new sampler for
    ``study`` (a sampler caches its search space per study).
    """
    import optuna

    settings = study.user_attrs[SAMPLER_ATTR]
    twin = optuna.create_study(sampler=_new_sampler(settings), direction="maximize")
    for trial in done:
        asked = twin.ask()
        params = suggest(asked)
        for key, value in params.items():
            if trial.params.get(key) != value:
                raise CimError(
                    f"the Optuna study {study.study_name!r} diverges from its sampler at trial "
                    f"{trial.number} ({key} is {trial.params.get(key)!r}, the replay suggests "
                    f"{value!r}); it was written by a different version or setting"
                )
        twin.tell(asked, trial.value)
    sampler = _new_sampler(settings)
    for mine, replayed in zip(_random_states(sampler), _random_states(twin.sampler)):
        mine.set_state(replayed.get_state())
    return sampler


def run_tpe(env: CimQuantEnv, recorder: EpisodeRecorder, episodes: int, study) -> None:
    """Optuna TPE: each trial suggests every searched width; the objective is the reward.

    The study is the record of a TPE search. On resume, trials a killed run left RUNNING
    are marked FAIL, the sampler is replayed over the complete trials (see
    ``_replayed_sampler``), those trials are replayed into the log (the ones the log
    lacks are added), and the rest of the budget is asked for: the first new trial
    suggests what the killed run was evaluating, and the log ends as an uninterrupted
    run's would.
    """
    import optuna

    scorer = env.scorer
    names = scorer.table.names
    space = [
        (f"{names[op]}.{kind}", choices)
        for op in env.searched
        for kind, choices in (("w_bits", env.w_choices), ("a_bits", env.a_choices))
    ]

    def suggest(trial) -> dict:
        return {key: trial.suggest_categorical(key, choices) for key, choices in space}

    def outcome_of(params: dict) -> Outcome:
        policy = list(env.bits_template())
        for op in env.searched:
            policy[op] = Bits(params[f"{names[op]}.w_bits"], params[f"{names[op]}.a_bits"])
        return scorer.score(tuple(policy))

    interrupted = _fail_dead_trials(study)
    done = _trials(study, "COMPLETE")
    if len(done) > episodes:
        done, interrupted = done[:episodes], {}
    study.sampler = _replayed_sampler(study, done, suggest)
    for trial in done:
        recorder.record(outcome_of(trial.params))
    with _database_errors(study):
        while recorder.count < episodes:
            trial = study.ask()
            try:
                params = suggest(trial)
                _check_reasked(study, interrupted, params)
                interrupted = {}
                outcome = outcome_of(params)
            except BaseException:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            study.tell(trial, outcome.reward)
            recorder.record(outcome)


@contextlib.contextmanager
def _database_errors(study):
    """A study whose database stops answering is the user's to fix (a server that went
    away, a network), not a bug: a ``CimError`` that says so and how to go on."""
    import optuna
    import sqlalchemy.exc

    try:
        yield
    except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError) as exc:
        cause = exc  # Optuna wraps the driver's error, which says what happened
        while not isinstance(cause, sqlalchemy.exc.DBAPIError) and (
            cause.__cause__ or cause.__context__
        ):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and str(cause.orig).strip():
            cause = cause.orig
        raise CimError(
            f"the database of the Optuna study {study.study_name!r} stopped answering: "
            f"{_first_line(cause)}; the finished episodes are in the log, and --resume "
            "continues once the database is back"
        ) from None


def _check_reasked(study, interrupted: dict, params: dict) -> None:
    """The trial asked after a killed one must suggest what the killed one held."""
    for key, value in interrupted.items():
        if params.get(key) != value:
            raise CimError(
                f"the Optuna study {study.study_name!r}: the trial re-asked after an "
                f"interrupted one suggests {key}={params.get(key)!r}, not {value!r}"
            )
