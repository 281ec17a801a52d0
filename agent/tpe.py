"""Optuna TPE over an episode budget, on a study one or several search processes share.

A trial suggests every searched width; its value is the policy's reward. The study is
the record of a TPE search, and ``--episodes`` is the study's budget: every process on it
(one, or several with ``--storage postgresql://...``, on one machine or many) asks for
trials until the study holds that many complete or running ones.

What makes it repeatable. Every trial is suggested by a fresh ``TPESampler`` seeded from
the search's seed and the trial's episode index (how many complete or running trials the
study held when it was asked), so a suggestion depends only on that index and on the
complete trials it sees. One process asking ``batch`` trials at a time (``--workers``)
asks them all before it tells any, and so runs the same search on every run; one that
was killed and resumes (``--resume``) marks the trials it left running FAIL (TPE reads
only complete ones) and asks their indexes again, seeing the same complete trials: it
suggests what the killed run was evaluating, and the log ends as an uninterrupted run's
would. (A kill between the tells of one batch, a few milliseconds, is the exception: the
rest of that batch is then suggested knowing the told part.)

Sharing. Asking happens under the study's lock (PostgreSQL: an advisory lock; SQLite: a
lock file beside the database), so two processes never overrun the budget or take the
same index. Each trial names the search that owns it (``OWNER_ATTR``: its host and episode
log), holds its accuracy once measured (``ACCURACY_ATTR``), and keeps a heartbeat while
it is evaluated: a process that dies leaves running trials whose heartbeat stops, and
the others mark them FAIL after ``GRACE_S`` and ask their indexes again, so no trial of the
budget is lost. A suggestion some trial of the study has measured (or is measuring) is
not measured again: its accuracy is read from that trial. A resumed process replays its
own complete trials into its log; the best policy of the study is the best of the logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import math
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from tvm_cim.core.errors import CimError
from tvm_cim.core.files import folder_problem
from tvm_cim.core.messages import first_line
from tvm_cim.core.precision import Bits

from .config import TPEConfig
from .env import CimQuantEnv

#: Study user attribute holding the sampler settings the study was created with.
SAMPLER_ATTR = "tvm_cim.sampler"
#: Trial user attributes: the search that asked the trial (host and episode log), and the
#: accuracy its policy measured.
OWNER_ATTR, ACCURACY_ATTR = "tvm_cim.owner", "tvm_cim.accuracy"

#: Seconds a database server may take to accept a connection: a host that went away fails
#: in this time instead of the operating system's minutes.
CONNECT_TIMEOUT_S = 10
#: Attempts at opening a study on a fresh database, where workers started together race to
#: create Optuna's tables (the losers see a unique violation, then find the tables made).
OPEN_ATTEMPTS = 5
#: A running trial's heartbeat period, and the silence after which another process of
#: the study marks it FAIL (its process died) and asks its episode again.
HEARTBEAT_S, GRACE_S = 10, 60
#: Seconds between looks at a trial another process is measuring the same policy in.
POLL_S = 1.0

#: Databases a shared study can lock (see the module docstring).
BACKENDS = ("sqlite", "postgresql")


@dataclasses.dataclass
class TpeStudy:
    """An open study: the Optuna study, its storage and URL, the sampler settings it
    records and the owner name of this process's trials."""

    study: object
    storage: object
    url: str
    settings: dict
    owner: str


def _new_sampler(settings: dict, seed: int):
    """A ``TPESampler`` with the study's settings (``SAMPLER_ATTR``) and ``seed``."""
    import optuna

    with warnings.catch_warnings():  # ``multivariate`` is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=settings["n_startup_trials"],
            multivariate=settings["multivariate"],
        )


def _trial_seed(seed: int, index: int) -> int:
    """The sampler seed of the trial asked at episode ``index`` of a search seeded ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


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


def _engine_options(url) -> dict:
    """SQLAlchemy engine options for the study's database: a connect timeout and a
    liveness check of pooled connections on a PostgreSQL server."""
    if url.get_backend_name() != "postgresql":
        return {}
    return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}, "pool_pre_ping": True}


def _storage(url: str):
    """Optuna's storage for ``url``, with heartbeats where the database outlives a process."""
    import optuna
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    beating = parsed.get_backend_name() == "postgresql" or _sqlite_file(parsed) is not None
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=_engine_options(parsed),
            heartbeat_interval=HEARTBEAT_S if beating else None,
            grace_period=GRACE_S if beating else None,
        )


def _created_study(url: str, name: str):
    """``optuna.create_study`` (or load) on ``url``, retried while workers started
    together on a fresh database race to create its tables; returns (study, storage)."""
    import optuna
    import sqlalchemy.exc

    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = _storage(url)
            study = optuna.create_study(
                storage=storage, study_name=name, direction="maximize", load_if_exists=True
            )
            return study, storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == OPEN_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def check_storage(storage: str) -> None:
    """Refuse, before any work and writing nothing, a storage the study cannot live in: a
    dialect other than SQLite and PostgreSQL, a missing driver, a database that does not
    answer, a SQLite file that is not a database or whose folder cannot be made.

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
    if url.get_backend_name() not in BACKENDS:
        raise refuse(f"a study lives in {' or '.join(BACKENDS)}, whose workers it can lock")
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


def open_study(
    url: str, name: str, seed: int, episodes: int, resume: bool, owner: str, config=None
) -> TpeStudy:
    """The Optuna study of a TPE search, created or joined at ``url``.

    A new study records its sampler settings (``SAMPLER_ATTR``); a loaded one keeps those
    it was created with, so every process of a study, and a resumed search with a larger
    budget, samples as it began. A study holding complete trials of ``owner`` (this
    search's log) is continued only with ``resume``; others' trials are shared.
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
        path = _sqlite_file(make_url(url))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        study, storage = _created_study(url, name)
        if SAMPLER_ATTR not in study.user_attrs:
            study.set_user_attr(SAMPLER_ATTR, wanted)
        settings = study.user_attrs[SAMPLER_ATTR]
        finished = _owned(study, owner, "COMPLETE")
    except Exception as exc:  # SQLAlchemy and Optuna raise many types for a bad storage
        raise CimError(
            f"cannot open the Optuna study {name!r} at {url}: {_first_line(exc)}"
        ) from None
    if finished and not resume:
        raise CimError(
            f"the Optuna study {name!r} at {url} already holds {len(finished)} trials of this "
            "search; pass --resume to continue it or choose another --storage"
        )
    return TpeStudy(study, storage, url, settings, owner)


def _trials(study, *states: str) -> list:
    """The study's trials in ``states`` (TrialState names), in trial-number order."""
    import optuna

    wanted = tuple(optuna.trial.TrialState[s] for s in states)
    return study.get_trials(deepcopy=False, states=wanted)


def _owned(study, owner: str, *states: str) -> list:
    return [t for t in _trials(study, *states) if t.user_attrs.get(OWNER_ATTR) == owner]


class _StudyLock:
    """The lock under which a process of the study counts the budget and asks trials:
    a PostgreSQL advisory lock on a connection of its own, a lock file beside a SQLite
    database (none for an in-memory one). Re-entered once per batch."""

    def __init__(self, url: str, name: str):
        import sqlalchemy
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        self._key = int.from_bytes(
            hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
        )
        self._connection = self._file = None
        if parsed.get_backend_name() == "postgresql":
            self._engine = sqlalchemy.create_engine(parsed, **_engine_options(parsed))
            self._connection = self._engine.connect()
        elif _sqlite_file(parsed) is not None:
            path = _sqlite_file(parsed)
            self._file = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115

    def _advisory(self, function: str) -> None:
        import sqlalchemy

        self._connection.execute(sqlalchemy.text(f"SELECT {function}(:key)"), {"key": self._key})
        self._connection.commit()

    def __enter__(self):
        if self._connection is not None:
            self._advisory("pg_advisory_lock")
        elif self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._connection is not None:
            with contextlib.suppress(Exception):  # a lost connection releases it too
                self._advisory("pg_advisory_unlock")
        elif self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._engine.dispose()
        if self._file is not None:
            self._file.close()


class _Heartbeat:
    """Records the heartbeat of this process's running trials every ``HEARTBEAT_S`` (a
    storage without heartbeats: nothing)."""

    def __init__(self, storage):
        self.storage = storage
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = None
        if storage.get_heartbeat_interval() is not None:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for trial_id in list(self.trial_ids):
                with contextlib.suppress(Exception):  # the main thread reports a lost database
                    self.storage.record_heartbeat(trial_id)

    def watch(self, trial_id: int) -> None:
        if self._thread is not None:
            self.storage.record_heartbeat(trial_id)
            self.trial_ids.add(trial_id)

    def forget(self, trial_id: int) -> None:
        self.trial_ids.discard(trial_id)

    def stop(self) -> None:
        self._stop.set()


def _fail_abandoned(tpe: TpeStudy) -> None:
    """Under the study's lock: mark FAIL the trials no live process will finish: this
    search's running ones (the directory lock makes this process their only owner), ones
    without an owner (a process killed while asking, which holds the lock), and others'
    whose heartbeat stopped."""
    import optuna

    for trial in _trials(tpe.study, "RUNNING"):
        if trial.user_attrs.get(OWNER_ATTR, tpe.owner) == tpe.owner:
            tpe.study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    _fail_stale(tpe)


def _fail_stale(tpe: TpeStudy) -> None:
    """Mark FAIL the running trials whose heartbeat stopped (their process died)."""
    import optuna

    if tpe.storage.get_heartbeat_interval() is not None:
        with warnings.catch_warnings():  # marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(tpe.study)


def _key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


def _reuse_measured(tpe: TpeStudy, scorer, asked: list, policies: list) -> None:
    """Hand the scorer the accuracy of every policy another trial of the study measured,
    waiting for those an earlier-asked trial is still measuring (only earlier ones, so
    two searches never wait on each other; a trial whose process dies fails after
    ``GRACE_S``, and the policy is then measured here)."""
    mine = {trial.number for trial in asked}
    wanted: dict = {}  # params -> (policy, the number of this search's first trial of them)
    for trial, policy in zip(asked, policies, strict=True):
        wanted.setdefault(_key(trial.params), (policy, trial.number))
    while True:
        waiting = False
        for trial in _trials(tpe.study, "COMPLETE", "RUNNING"):
            key = _key(trial.params)
            if key not in wanted or trial.number in mine:
                continue
            policy, first = wanted[key]
            if ACCURACY_ATTR in trial.user_attrs:
                scorer.prime(policy, trial.user_attrs[ACCURACY_ATTR])
                del wanted[key]
            elif trial.state.name == "RUNNING" and trial.number < first:
                waiting = True
        if not waiting:
            return
        time.sleep(POLL_S)
        _fail_stale(tpe)


def run_tpe(env: CimQuantEnv, recorder, episodes: int, tpe: TpeStudy, batch: int = 1) -> None:
    """TPE until the study holds ``episodes`` complete or running trials, ``batch`` asked
    at a time and measured together (see the module docstring). This search's complete
    trials are first replayed into its log (a resume; the ones the log lacks are added)."""

    scorer, study = env.scorer, tpe.study
    names = scorer.table.names
    space = [
        (f"{names[op]}.{kind}", choices)
        for op in env.searched
        for kind, choices in (("w_bits", env.w_choices), ("a_bits", env.a_choices))
    ]

    def policy_of(params: dict) -> tuple[Bits, ...]:
        policy = list(env.bits_template())
        for op in env.searched:
            policy[op] = Bits(params[f"{names[op]}.w_bits"], params[f"{names[op]}.a_bits"])
        return tuple(policy)

    lock, heartbeat = None, _Heartbeat(tpe.storage)
    try:
        with _database_errors(study):
            lock = _StudyLock(tpe.url, study.study_name)
            with lock:
                _fail_abandoned(tpe)
            for trial in _owned(study, tpe.owner, "COMPLETE")[:episodes]:
                if ACCURACY_ATTR in trial.user_attrs:
                    scorer.prime(policy_of(trial.params), trial.user_attrs[ACCURACY_ATTR])
                recorder.record(scorer.score(policy_of(trial.params)))
            while True:
                with lock:
                    asked = _ask(tpe, space, episodes, batch, heartbeat)
                if not asked:
                    return
                _measure(tpe, scorer, recorder, asked, policy_of, heartbeat)
    finally:
        heartbeat.stop()
        if lock is not None:
            lock.close()


def _ask(tpe: TpeStudy, space: list, episodes: int, batch: int, heartbeat: _Heartbeat) -> list:
    """Under the study's lock: up to ``batch`` new trials within the budget, each
    suggested by a sampler seeded by its episode index, owned by this search and beating.
    (A sampler draws a trial's relative parameters when it is asked and the others when
    they are suggested: each trial is suggested before the next sampler takes over.)"""
    study = tpe.study
    _fail_stale(tpe)
    used = len(_trials(study, "COMPLETE", "RUNNING", "WAITING"))
    asked = []
    for index in range(used, min(used + batch, episodes)):
        study.sampler = _new_sampler(tpe.settings, _trial_seed(tpe.settings["seed"], index))
        with warnings.catch_warnings():  # ask/tell keeps its own heartbeat (``_Heartbeat``)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        trial.set_user_attr(OWNER_ATTR, tpe.owner)
        heartbeat.watch(trial._trial_id)
        for key, choices in space:
            trial.suggest_categorical(key, choices)
        asked.append(trial)
    return asked


def _measure(tpe: TpeStudy, scorer, recorder, asked: list, policy_of, heartbeat) -> None:
    """Score the asked trials' policies together, then tell and log them in order; an
    interruption marks the unfinished ones FAIL."""
    import optuna

    unfinished = {trial.number for trial in asked}
    try:
        policies = [policy_of(trial.params) for trial in asked]
        _reuse_measured(tpe, scorer, asked, policies)
        scorer.prefetch(policies)
        for trial, policy in zip(asked, policies, strict=True):
            outcome = scorer.score(policy)
            trial.set_user_attr(ACCURACY_ATTR, outcome.accuracy)
            tpe.study.tell(trial, outcome.reward)
            unfinished.discard(trial.number)
            heartbeat.forget(trial._trial_id)
            recorder.record(outcome)
    except BaseException:
        for trial in asked:
            if trial.number in unfinished:
                tpe.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise


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
