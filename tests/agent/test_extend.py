"""A DQN or DDPG search resumed with a larger ``--episodes`` extends its agent from the
agent checkpoint: the same extension twice logs the same episodes, killed extensions
(a kill while the checkpoint is written included) resume to the uninterrupted one's log,
and a budget change without a usable checkpoint is refused with one clear line.

The searches are real ``tvm-cim search`` processes (``killed_search.py``), as in
``test_resume.py``.
"""

import json
import shutil
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")
pytest.importorskip("stable_baselines3")

from tvm_cim import CimError  # noqa: E402

from .test_resume import (  # noqa: E402, F401
    _arguments,
    _finish,
    _quick_settings,
    _scored,
    _start,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

#: The first budget and the extended one.
FIRST, EXTENDED = 6, 12


def _args(strategy: str, out: Path, start: Path, episodes: int, resume: bool) -> list:
    args = _arguments(strategy, out, start, resume)
    args[args.index("--episodes") + 1] = str(episodes)
    return args


def _chain(strategy: str, out: Path, start: Path, episodes: int, points: list[str]) -> int:
    """Run the search with ``--resume`` (after ``out`` holds a search), killing it at each
    of ``points`` and resuming until it ends; return the kills made."""
    kills = 0
    for point in [*points, ""]:
        resume = (out / f"{strategy}-s0.episodes.jsonl").exists()
        rc, err = _finish(_start(_args(strategy, out, start, episodes, resume), point))
        if point and rc == -signal.SIGKILL:
            kills += 1
            continue
        assert rc == 0, f"{point or 'the last resume'}: exit {rc}: {err}"
        assert not point, f"{point} was never reached"
        return kills
    raise AssertionError("unreachable")


def _extension(strategy: str, first: Path, out: Path, start: Path, points: list[str]) -> dict:
    """The search of ``first`` (``FIRST`` episodes) copied to ``out`` and extended to
    ``EXTENDED`` with ``--resume``, killed at ``points``."""
    shutil.copytree(first, out)
    kills = _chain(strategy, out, start, EXTENDED, points)
    return {"extended": _scored(out, strategy), "kills": kills}


def _points(strategy: str) -> list[str]:
    """Kills of an extension: right after its second new episode is logged (before the
    checkpoint that follows), while the next checkpoint is written (the previous one
    stays), and in the middle of the first evaluation after that."""
    return ["logged:2", f"write:{strategy}-s0.agent.zip", "eval:1"]


@pytest.fixture(scope="module")
def extensions(tmp_path_factory, base_checkpoint):
    """Per strategy: a search of ``FIRST`` episodes, then an uninterrupted extension of it
    and a killed one, two processes at a time."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("extensions")
    firsts = {strategy: folder / f"{strategy}-first" for strategy in ("dqn", "ddpg")}
    futures = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for started in [
            pool.submit(_chain, s, f, base_checkpoint, FIRST, []) for s, f in firsts.items()
        ]:
            started.result()
        for strategy, first in firsts.items():
            futures[strategy] = {
                name: pool.submit(
                    _extension,
                    strategy,
                    first,
                    folder / f"{strategy}-{name}",
                    base_checkpoint,
                    points,
                )
                for name, points in (("plain", []), ("killed", _points(strategy)))
            }
        yield firsts, futures
        for runs in futures.values():
            for future in runs.values():
                future.cancel()


@pytest.mark.parametrize("strategy", ["dqn", "ddpg"])
def test_an_extended_search_keeps_its_episodes_and_repeats_itself(extensions, strategy):
    firsts, futures = extensions
    plain, killed = futures[strategy]["plain"].result(), futures[strategy]["killed"].result()
    first = _scored(firsts[strategy], strategy)
    episodes = [r for r in plain["extended"] if r["type"] == "episode"]
    assert len(first) == 3 + FIRST and len(episodes) == EXTENDED
    assert plain["extended"][: 3 + FIRST] == first  # the shorter search's episodes
    assert killed["kills"] == len(_points(strategy))
    assert killed["extended"] == plain["extended"]  # same policies, order and scores
    assert len({str(r["policy"]) for r in episodes[FIRST:]}) > 1  # the agent goes on choosing
    for name in ("plain", "killed"):
        out = firsts[strategy].with_name(f"{strategy}-{name}")
        assert not [p.name for p in out.rglob(".*")]  # no temporary file left behind
        with zipfile.ZipFile(out / f"{strategy}-s0.agent.zip") as z:
            meta = json.loads(z.read("meta.json"))
        assert (meta["episodes"], meta["budget"]) == (EXTENDED, EXTENDED)


def _damage(path: Path, how: str) -> str:
    """Damage the agent checkpoint at ``path``; return what the refusal names."""
    if how == "missing":
        path.unlink()
        return "is missing"
    if how == "torn":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return "does not load"
    with zipfile.ZipFile(path) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    meta = json.loads(parts["meta.json"])
    meta["identity"]["seed"] += 1
    parts["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    return r"has other settings \(seed\)"


@pytest.mark.parametrize("how", ["missing", "torn", "foreign"])
def test_a_larger_budget_without_a_usable_checkpoint_is_refused(tmp_path, base_checkpoint, how):
    from tvm_cim.agent.search import run_search

    settings = _quick_settings(tmp_path, "dqn", 3, base_checkpoint)
    run_search(settings, log=lambda *a: None)
    log = tmp_path / "dqn-s0.episodes.jsonl"
    before = log.read_bytes()
    reason = _damage(tmp_path / "dqn-s0.agent.zip", how)
    settings.resume, settings.episodes = True, 5
    message = (
        rf"cannot continue the search of .*dqn-s0.episodes.jsonl with --episodes 5 \(it "
        rf"began with 3\): the agent checkpoint .*dqn-s0.agent.zip {reason}.*; rerun with "
        r"--episodes 3$"
    )
    with pytest.raises(CimError, match=message):
        run_search(settings, log=lambda *a: None)
    assert log.read_bytes() == before  # nothing played


def test_the_grown_replay_buffer_keeps_every_transition():
    from gymnasium import spaces
    from stable_baselines3.common.buffers import ReplayBuffer

    from tvm_cim.agent.checkpoint import _grow

    class Model:
        buffer_size = 4
        replay_buffer = ReplayBuffer(
            4, spaces.Box(0.0, 1.0, (2,), np.float32), spaces.Discrete(3), device="cpu"
        )

    buffer = Model.replay_buffer
    for step in range(4):
        obs = np.full((1, 2), step / 4, np.float32)
        buffer.add(
            obs, obs + 0.1, np.array([step % 3]), np.array([step]), np.array([step == 3]), [{}]
        )
    assert buffer.full and buffer.pos == 0  # a full buffer would overwrite its first transition
    model = Model()
    _grow(model, 10)
    grown = model.replay_buffer
    assert (grown.buffer_size, grown.pos, grown.full, model.buffer_size) == (10, 4, False, 10)
    for name in ("observations", "next_observations", "actions", "rewards", "dones"):
        assert np.array_equal(getattr(grown, name)[:4], getattr(buffer, name))
        assert not getattr(grown, name)[4:].any()
