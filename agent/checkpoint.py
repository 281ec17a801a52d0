"""The agent checkpoint of a DQN or DDPG search: a resumed search continues its agent
instead of replaying it, and a larger ``--episodes`` extends it.

What it holds. One zip file beside the episode log (``<tag>.agent.zip``), rewritten
whole and atomically (``tvm_cim.core.files.write_bytes``) at every episode boundary, so
a kill mid-write leaves the previous checkpoint usable:

- ``model.zip``: SB3's ``model.save`` (networks, optimizers, step and episode counters,
  ``learning_starts``, the exploration rate);
- ``replay_buffer.pkl``: SB3's ``model.save_replay_buffer``;
- ``random.pkl``: every random state the agent draws from: torch's, numpy's and
  Python's global generators, the model's action space generator and, for DDPG, the
  action noises' scales and generators (one per environment);
- ``meta.json``: the settings the agent was created with (algorithm, seed, agent
  settings, decisions per episode), the budget in force, the logged episodes it has
  seen and a digest of them, which ties it to its log.

When it is written. SB3's off-policy ``learn`` loop alternates ``collect_rollouts``
(one environment step, as ``train_freq`` is 1) and ``train()``; a callback's
``_on_rollout_start`` runs after the previous step's ``train()`` and before the next
action is drawn, so a checkpoint taken there once an episode has ended is a point the
uninterrupted run passes through. One more is taken when ``learn`` ends.

How a resume uses it. The first episodes the checkpoint has seen are handed to the
recorder as logged; the model, its replay buffer and the random states are restored
(after ``learn``'s own setup, which resets the action noise), and ``learn`` continues
for the rest of the budget with ``reset_num_timesteps=False``. Logged episodes after the
checkpoint (a kill between a log line and the next checkpoint) are played again and
the recorder checks them against the log and hands back their logged outcome. A log
that already holds the budget is handed back as it is, without learning.

A larger budget. The checkpoint's budget is the one every logged episode after it was
played under; those are played again under it, and from the end of the log on the new
budget is in force (a checkpoint records it before the next episode): the replay buffer
is copied into a larger SB3 ``ReplayBuffer`` (it was sized to the old budget's
transitions, and a full one would wrap), DQN's epsilon continues from where the run
stands on its schedule under the new total (``exploration_fraction`` of the new total),
DDPG's noise goes on decaying per episode as before, and ``learning_starts`` stays what
it was. The first episodes of an extended search are the shorter search's, and the
same extension played twice logs the same episodes.

Without a usable checkpoint (missing, unreadable, written by other settings or for
another log) a search whose log has episodes replays its agent from the start, which
reproduces the log when the budget is the one the log began with; with another budget
that is a ``CimError`` naming the checkpoint and the budget to rerun with.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback

from tvm_cim.core.errors import CimError
from tvm_cim.core.files import write_bytes

from .log import EpisodeLog

#: Version of the checkpoint layout; a checkpoint of another one is not used.
FORMAT = 2

_MODEL, _BUFFER, _RANDOM, _META = "model.zip", "replay_buffer.pkl", "random.pkl", "meta.json"


def _digest(episodes: list) -> str:
    """A digest of logged episodes, as the log writes them."""
    text = json.dumps([outcome.to_dict() for outcome in episodes], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _noises(noise) -> list:
    """The action noises of a model: none, its one, or one per environment."""
    return [] if noise is None else list(getattr(noise, "noises", [noise]))


def _random_state(model) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "action_space": model.action_space.np_random.bit_generator.state,
        "noise": [(n.sigma, n.rng.bit_generator.state) for n in _noises(model.action_noise)],
    }


def _set_random_state(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    model.action_space.np_random.bit_generator.state = state["action_space"]
    for noise, (sigma, rng) in zip(_noises(model.action_noise), state["noise"], strict=True):
        noise.sigma, noise.rng.bit_generator.state = sigma, rng


def _write(path: Path, model, meta: dict) -> None:
    """The checkpoint of ``model`` now, as one zip written atomically."""
    parts = {}
    for name, save in ((_MODEL, model.save), (_BUFFER, model.save_replay_buffer)):
        buffer = io.BytesIO()
        save(buffer)
        parts[name] = buffer.getvalue()
    parts[_RANDOM] = pickle.dumps(_random_state(model))
    parts[_META] = json.dumps(meta, sort_keys=True, indent=1).encode()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for name, data in parts.items():
            z.writestr(name, data)
    write_bytes(path, archive.getvalue())


@dataclass
class _Saved:
    """A checkpoint that matches its search: the model loaded, its random state and meta."""

    model: object
    state: dict
    meta: dict


def _read(path: Path | None, identity: dict, log: EpisodeLog, load: Callable) -> _Saved | str:
    """The checkpoint at ``path`` if it belongs to this search and its log, else why not."""
    if path is None:
        return "the search keeps no agent checkpoint"
    if not path.is_file():
        return f"the agent checkpoint {path} is missing"
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(_META))
            if meta.get("identity") != identity:
                differ = sorted(
                    k for k in identity if (meta.get("identity") or {}).get(k) != identity[k]
                )
                return f"the agent checkpoint {path} has other settings ({', '.join(differ)})"
            seen = meta["episodes"]
            if seen > len(log.episodes) or meta["log"] != _digest(log.episodes[:seen]):
                return f"the agent checkpoint {path} does not match the log {log.path}"
            model = load(io.BytesIO(z.read(_MODEL)))
            model.load_replay_buffer(io.BytesIO(z.read(_BUFFER)))
            state = pickle.loads(z.read(_RANDOM))
    except Exception as exc:  # a torn or foreign file fails in zipfile, json, pickle or SB3
        return f"the agent checkpoint {path} does not load ({type(exc).__name__}: {exc})"
    return _Saved(model, state, meta)


def _grow(model, size: int) -> None:
    """Give ``model`` a replay buffer of at least ``size`` transitions, holding the same
    transitions in the same places (sampling draws from the filled part only)."""
    old = model.replay_buffer
    if size <= old.buffer_size * old.n_envs:  # SB3 keeps buffer_size // n_envs per env
        return
    new = ReplayBuffer(
        size,
        old.observation_space,
        old.action_space,
        device=old.device,
        n_envs=old.n_envs,
        handle_timeout_termination=old.handle_timeout_termination,
    )
    kept = old.buffer_size if old.full else old.pos
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        getattr(new, name)[:kept] = getattr(old, name)[:kept]
    new.pos = kept
    model.replay_buffer, model.buffer_size = new, size


class _Checkpointing(BaseCallback):
    """Restores a checkpoint's random state once ``learn`` is set up, keeps the schedule
    total of the budget in force, and writes a checkpoint at each episode boundary.

    ``budgets`` is ``(old, new)``: episodes before ``logged`` are played under ``old``
    (the budget they were logged under), the rest under ``new``.
    """

    def __init__(self, path, recorder, meta: dict, budgets, logged: int, decisions: int, state):
        super().__init__()
        self.path, self.recorder, self.meta = path, recorder, meta
        self.budgets, self.logged, self.decisions, self.state = budgets, logged, decisions, state
        self.saved = (meta["episodes"], meta["budget"])

    def _budget(self) -> int:
        return self.budgets[0] if self.recorder.count < self.logged else self.budgets[1]

    def _apply_budget(self) -> None:
        """Schedules follow the budget in force: SB3 reads ``_total_timesteps`` for the
        progress, DQN's epsilon follows the progress."""
        model, total = self.model, self._budget() * self.decisions
        if model._total_timesteps != total:
            model._total_timesteps = total
            model._update_current_progress_remaining(model.num_timesteps, total)
            if hasattr(model, "exploration_schedule"):
                model.exploration_rate = model.exploration_schedule(
                    model._current_progress_remaining
                )

    def _save(self) -> None:
        now = (self.recorder.count, self._budget())
        if self.path is None or now[0] == 0 or now == self.saved:
            return
        seen = self.recorder.log.episodes[: now[0]]
        meta = dict(self.meta, episodes=now[0], budget=now[1], log=_digest(seen))
        _write(self.path, self.model, meta)
        self.saved = now

    def _on_training_start(self) -> None:
        if self.state is not None:
            _set_random_state(self.model, self.state)
        self._apply_budget()

    def _on_rollout_start(self) -> None:
        self._apply_budget()
        self._save()

    def _on_step(self) -> bool:
        return True

    def _on_training_end(self) -> None:
        self._save()


def learn(
    create: Callable,
    load: Callable,
    recorder,
    episodes: int,
    decisions: int,
    path: Path | None,
    identity: dict,
) -> None:
    """Play ``episodes`` episodes of an SB3 off-policy agent, checkpointed at ``path``.

    ``create()`` makes the agent of a new search and ``load(file)`` one saved by
    ``model.save``; ``identity`` names the agent settings a checkpoint must match. See
    the module docstring for what a resumed or extended search does.

    Raises
    ------
    CimError
        The log has episodes, the budget is not the one it began with and there is no
        usable checkpoint.
    """
    log = recorder.log
    logged = log.episodes
    if len(logged) >= episodes:
        for outcome in logged[:episodes]:
            recorder.record(outcome)
        return
    identity = json.loads(json.dumps(dict(identity, format=FORMAT)))
    meta = {"identity": identity, "episodes": 0, "budget": None}
    saved = _read(path, identity, log, load) if logged else "the log holds no episode"
    if isinstance(saved, str):
        if logged:
            began = EpisodeLog.read_records(log.path)[0].get("episodes")
            if began != episodes:
                raise CimError(
                    f"cannot continue the search of {log.path} with --episodes {episodes} "
                    f"(it began with {began}): {saved}; rerun with --episodes "
                    f"{max(began or 0, len(logged))}"
                )
        model, budgets, state = create(), (episodes, episodes), None
        model.learn(
            total_timesteps=episodes * decisions,
            callback=_Checkpointing(path, recorder, meta, budgets, 0, decisions, state),
        )
        return
    model, meta = saved.model, saved.meta
    _grow(model, episodes * decisions)
    for outcome in logged[: meta["episodes"]]:
        recorder.record(outcome)
    budgets = (meta["budget"], episodes)
    model.learn(
        total_timesteps=episodes * decisions - model.num_timesteps,
        reset_num_timesteps=False,
        callback=_Checkpointing(path, recorder, meta, budgets, len(logged), decisions, saved.state),
    )
