"""Killed searches resume to the uninterrupted run's log; settings are checked before
any work; one search per output directory.

The kill tests run real ``tvm-cim search`` processes (``killed_search.py``), SIGKILL
each at a point drawn from a seeded generator (mid-evaluation, mid-line, at an episode
boundary, while a cache file, the study or the agent checkpoint is written, or from
outside at a random moment), resume until the search ends, and compare the log with an
uninterrupted run.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")
pytest.importorskip("stable_baselines3")
optuna = pytest.importorskip("optuna")

from tvm_cim import CimError  # noqa: E402
from tvm_cim.agent.log import EpisodeLog  # noqa: E402
from tvm_cim.cli.main import main as cli_main  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

RUNNER = Path(__file__).with_name("killed_search.py")

#: Episode budget of each strategy's kill chain: small, but past TPE's start-up trial
#: and DQN's and DDPG's warm-up episode.
EPISODES = {"random": 8, "tpe": 10, "dqn": 8, "ddpg": 6}


def _arguments(
    strategy: str, out: Path, start: Path | None, resume: bool = False, workers: int | None = None
) -> list:
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic"]
    args += ["--workers", str(workers)] if workers else []
    args += ["--strategy", strategy, "--episodes", str(EPISODES[strategy]), "--max-acc-drop", "1.0"]
    args += ["--finetune-steps", "2", "--no-verify", "--no-progress", "--out", str(out)]
    if start is not None:
        args += ["--from", str(start)]
    return args + (["--resume"] if resume else [])


def _start(args: list, point: str = "") -> subprocess.Popen:
    """A search process; ``point`` is where it kills itself (see ``killed_search.py``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CIM_TEST_KILL=point)
    command = [sys.executable, str(RUNNER)] if point else [sys.executable, "-m", "tvm_cim.cli.main"]
    return subprocess.Popen(
        command + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=600)
    return process.returncode, err


def _episodes_logged(log: Path) -> int:
    try:
        return log.read_bytes().count(b'"type": "episode"')
    except FileNotFoundError:
        return 0


def _kill_from_outside(process: subprocess.Popen, log: Path, more: int) -> None:
    """SIGKILL ``process`` once ``log`` holds ``more`` episodes more than when it began
    (wherever the process is then)."""
    after = _episodes_logged(log) + more
    while process.poll() is None and _episodes_logged(log) < after:
        time.sleep(0.02)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)


def _scored(out: Path, strategy: str) -> list[dict]:
    """The reference and episode records of a finished log, without wall times; the log
    parses strictly and numbers its episodes 0, 1, ... once each."""
    records = EpisodeLog.read_records(out / f"{strategy}-s0.episodes.jsonl")
    assert [r["type"] for r in records[:4]] == ["header", "reference", "reference", "reference"]
    episodes = [r for r in records if r["type"] == "episode"]
    assert [r["index"] for r in episodes] == list(range(len(episodes)))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records[1:]]


def _best(out: Path, strategy: str) -> dict:
    return json.loads((out / f"{strategy}-s0.summary.json").read_text())["best"]


def _plan(strategy: str) -> list[str]:
    """Kill points of a chain, from a generator seeded by the strategy's name."""
    rng = random.Random(f"kill points of {strategy}")
    if strategy == "random":  # the only chain that trains its base model
        return [
            "write:w8a8.pt",
            "write:latency-*.npz",
            "write:random-s0.episodes.jsonl",
            f"eval:{rng.randint(1, 6)}",
            f"line:{rng.randint(1, 3)}",
            f"outside:{rng.randint(1, 2)}",
        ]
    if strategy == "tpe":
        return [
            f"commit:{rng.randint(3, 15)}",
            f"eval:{rng.randint(4, 6)}",
            f"line:{rng.randint(1, 3)}",
            f"logged:{rng.randint(1, 2)}",
            f"commit:{rng.randint(5, 25)}",
            f"eval:{rng.randint(1, 2)}",
        ]
    if strategy == "dqn":  # the resumed process is killed writing its agent checkpoint
        return [
            f"eval:{rng.randint(4, 7)}",
            "write:dqn-s0.agent.zip",
            f"line:{rng.randint(1, 3)}",
            "outside:1",
        ]
    return [f"eval:{rng.randint(1, 4)}", f"logged:{rng.randint(1, 3)}", "write:ddpg-s0.agent.zip"]


def _reference(strategy: str, out: Path, start: Path | None, workers: int | None = None) -> Path:
    """An uninterrupted run."""
    rc, err = _finish(_start(_arguments(strategy, out, start, workers=workers)))
    assert rc == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_checkpoint):
    """Every strategy's kill chain and uninterrupted run, two processes at a time; each
    test waits for its own pair."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("runs")
    futures = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for strategy in EPISODES:  # random first: its chain trains the base model twice
            start = None if strategy == "random" else base_checkpoint
            chain, reference = folder / f"{strategy}-killed", folder / f"{strategy}-reference"
            futures[strategy] = (
                pool.submit(_kill_chain, strategy, chain, start),
                pool.submit(_reference, strategy, reference, start),
                chain,
            )
        yield futures
        for killed, reference, _ in futures.values():
            killed.cancel(), reference.cancel()


def _kill_chain(
    strategy: str, out: Path, start: Path | None, plan: list | None = None, workers=None
) -> int:
    """Run the strategy's search, killing it at each point of its plan (default
    ``_plan(strategy)``) and resuming, until it ends; return the kills made."""
    kills = 0
    for number, point in enumerate([*(plan or _plan(strategy)), ""]):
        args = _arguments(strategy, out, start, resume=number > 0, workers=workers)
        if point.startswith("outside:"):
            process = _start(args)
            log = out / f"{strategy}-s0.episodes.jsonl"
            _kill_from_outside(process, log, int(point.partition(":")[2]))
        else:
            process = _start(args, point)
        rc, err = _finish(process)
        if point and rc == -signal.SIGKILL:
            kills += 1
            continue
        assert rc == 0, f"{point or 'the last resume'}: exit {rc}: {err}"
        assert not point or point.startswith("outside:"), f"{point} was never reached"
        break  # done (a kill from outside may come after the search ended)
    return kills


@pytest.mark.parametrize("strategy", list(EPISODES))
def test_a_killed_search_resumes_to_the_uninterrupted_log(runs, strategy):
    killed, reference, out = runs[strategy]
    kills, reference = killed.result(), reference.result()
    resumed = _scored(out, strategy)
    assert len(resumed) == 3 + EPISODES[strategy]
    assert resumed == _scored(reference, strategy)  # same policies, order and scores
    assert _best(out, strategy) == _best(reference, strategy)
    assert not [p.name for p in out.rglob(".*")]  # no temporary file left behind
    assert kills >= len(_plan(strategy)) - 1  # only a kill from outside may come too late
    if strategy == "tpe":
        storage = f"sqlite:///{out / 'optuna.db'}"
        (name,) = optuna.get_all_study_names(storage)
        trials = optuna.load_study(study_name=name, storage=storage).trials
        states = [t.state.name for t in trials]
        assert states.count("COMPLETE") == EPISODES["tpe"] and "RUNNING" not in states
        (ref_name,) = optuna.get_all_study_names(f"sqlite:///{reference / 'optuna.db'}")
        ref = optuna.load_study(study_name=ref_name, storage=f"sqlite:///{reference}/optuna.db")
        complete = [t.params for t in trials if t.state.name == "COMPLETE"]
        assert complete == [t.params for t in ref.trials]
    print(f"{strategy}: {kills} kills survived, resumed log equal to the uninterrupted one")


#: Kill chains of searches measuring two policies at a time on a local cluster: the
#: driver dies with measurements in flight (and DQN's once writing its checkpoint).
PARALLEL_PLANS = {
    "tpe": ["measure:3", "measure:2", "measure:2"],
    "dqn": ["measure:3", "write:dqn-s0.agent.zip", "measure:2"],
}


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, base_checkpoint):
    """Each parallel kill chain beside its uninterrupted run, both with --workers 2."""
    from concurrent.futures import ThreadPoolExecutor

    folder = tmp_path_factory.mktemp("parallel")
    futures = {}
    with ThreadPoolExecutor(max_workers=1) as pool:
        for strategy, plan in PARALLEL_PLANS.items():
            chain, reference = folder / f"{strategy}-killed", folder / f"{strategy}-reference"
            futures[strategy] = (
                pool.submit(_kill_chain, strategy, chain, base_checkpoint, plan, 2),
                pool.submit(_reference, strategy, reference, base_checkpoint, 2),
                chain,
            )
        yield futures
        for killed, reference, _ in futures.values():
            killed.cancel(), reference.cancel()


@pytest.mark.parametrize("strategy", list(PARALLEL_PLANS))
def test_a_driver_killed_with_measurements_in_flight_resumes_to_the_uninterrupted_log(
    parallel_runs, strategy
):
    killed, reference, out = parallel_runs[strategy]
    kills, reference = killed.result(), reference.result()
    assert kills == len(PARALLEL_PLANS[strategy])
    resumed = _scored(out, strategy)
    assert len(resumed) == 3 + EPISODES[strategy]
    assert resumed == _scored(reference, strategy)
    header = EpisodeLog.read_records(out / f"{strategy}-s0.episodes.jsonl")[0]
    assert header["workers"] == 2


def test_two_searches_started_at_once_on_one_out(base_checkpoint, tmp_path):
    """Exactly one runs; the other exits 2 with one line naming the holder's PID; the log
    holds every episode once."""
    args = _arguments("random", tmp_path, base_checkpoint, resume=True)
    args[args.index("--episodes") + 1] = "4"
    first, second = _start(args), _start(args)
    results = {p.pid: _finish(p) for p in (first, second)}
    codes = sorted(rc for rc, _ in results.values())
    assert codes == [0, 2], results
    (winner,) = [pid for pid, (rc, _) in results.items() if rc == 0]
    (loser_err,) = [err for rc, err in results.values() if rc == 2]
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pid {winner}" in lines[0], loser_err
    records = EpisodeLog.read_records(tmp_path / "random-s0.episodes.jsonl")
    assert [r["type"] for r in records].count("header") == 1
    assert [r["index"] for r in records if r["type"] == "episode"] == [0, 1, 2, 3]


# ------------------------------------------------------------------------ torn log lines


def _log_with(tmp_path, tail: bytes) -> Path:
    path = tmp_path / "x.jsonl"
    header = {"type": "header", "strategy": "random", "seed": 0}
    episode = {"type": "episode", "index": 0, "policy": [[8, 8]], "latency_us": 1.0}
    episode.update(accuracy=90.0, reward=1.0)
    path.write_bytes(f"{json.dumps(header)}\n{json.dumps(episode)}\n".encode() + tail)
    return path


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = _log_with(tmp_path, b'{"type": "episode", "index": 1, "pol')
    complete = path.read_bytes().rsplit(b"\n", 1)[0] + b"\n"
    with pytest.raises(CimError, match=r"x.jsonl:3: corrupt search log"):
        EpisodeLog.read_records(path)  # reading alone never repairs
    said = []
    log = EpisodeLog(path, {"strategy": "random", "seed": 0}, resume=True, warn=said.append)
    assert len(said) == 1 and "dropped a torn last line" in said[0]
    assert path.read_bytes() == complete and len(log.episodes) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    record = {"type": "reference", "name": "W8A8", "policy": [[8, 8]], "latency_us": 2.0}
    record.update(accuracy=91.0, reward=0.0)
    path = _log_with(tmp_path, json.dumps(record).encode())
    log = EpisodeLog(path, {"strategy": "random", "seed": 0}, resume=True, warn=print)
    assert set(log.references) == {"W8A8"} and path.read_bytes().endswith(b"}\n")


def test_a_corrupt_line_before_the_last_stays_an_error(tmp_path):
    path = _log_with(tmp_path, b"")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b'{"type": "episode", "ind\n' + lines[1])
    with pytest.raises(CimError, match=r"x.jsonl:2: corrupt search log"):
        EpisodeLog(path, {"strategy": "random", "seed": 0}, resume=True)


# ------------------------------------------------------------------------ settings first


def _cli(tmp_path, capsys, *extra, strategy="tpe", out=None):
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic"]
    args += ["--strategy", strategy, "--no-progress", "--out", str(out or tmp_path / "out")]
    status = cli_main([*args, *extra])
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    "storage, message",
    [
        ("foo://bar", "Can't load plugin"),
        ("not a url", "Could not parse"),
        ("sqlite:///{tmp}/a-file/study.db", "a-file is not a folder"),
        ("sqlite:///{tmp}/junk.db", "file is not a database"),
    ],
    ids=["dialect", "url", "folder", "not-a-database"],
)
def test_a_bad_storage_fails_before_any_work(tmp_path, capsys, storage, message):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    before = sorted(p.name for p in tmp_path.iterdir())
    status, lines = _cli(tmp_path, capsys, "--storage", storage.format(tmp=tmp_path))
    assert status == 2 and len(lines) == 1
    assert "cannot open the Optuna study" in lines[0] and message in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out, no base, no lock


def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    status, lines = _cli(tmp_path, capsys, out=tmp_path / "a-file" / "out", strategy="random")
    assert status == 2 and len(lines) == 1 and "a-file is not a folder" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_missing_base_checkpoint_fails_before_any_work(tmp_path, capsys):
    status, lines = _cli(tmp_path, capsys, "--from", str(tmp_path / "none.pt"), strategy="dqn")
    assert status == 2 and len(lines) == 1 and "none.pt does not exist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_log_that_forbids_the_search_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    log = out / "random-s0.episodes.jsonl"
    log.write_text(json.dumps({"type": "header", "model": "digits-mlp"}) + "\n")
    status, lines = _cli(tmp_path, capsys, strategy="random")
    assert status == 2 and len(lines) == 1 and "pass --resume" in lines[0]
    status, lines = _cli(tmp_path, capsys, "--resume", strategy="random")
    assert status == 2 and len(lines) == 1 and "belongs to another search" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [log.name]  # nothing trained, no lock


def test_a_corrected_storage_is_not_refused(tmp_path, capsys, base_checkpoint):
    """After a refused storage, the corrected command starts the search."""
    out = tmp_path / "out"
    assert _cli(tmp_path, capsys, "--storage", "foo://bar", out=out)[0] == 2
    status, lines = _cli(
        tmp_path, capsys, "--from", str(base_checkpoint), "--episodes", "2", "--no-verify",
        "--finetune-steps", "1", out=out,
    )  # fmt: skip
    assert status == 0, lines
    assert len(EpisodeLog.read_records(out / "tpe-s0.episodes.jsonl")) == 1 + 3 + 2


def _quick_settings(out: Path, strategy: str, episodes: int, start: Path):
    """An in-process search of ``episodes`` quick episodes from the base model ``start``."""
    from tvm_cim.agent.search import SearchSettings

    return SearchSettings(
        model="digits-mlp", dataset="synthetic", out=out, strategy=strategy, episodes=episodes,
        max_acc_drop=1.0, finetune_steps=1, verify=False, progress=False, base_checkpoint=start,
    )  # fmt: skip


# ------------------------------------------------------------------------ a shared study


def test_a_second_search_joins_a_study_and_takes_the_rest_of_its_budget(tmp_path, base_checkpoint):
    """Another output directory on the same storage shares the study and its budget; the
    first search's own trials need --resume."""
    from tvm_cim.agent.search import run_search
    from tvm_cim.agent.tpe import ACCURACY_ATTR, OWNER_ATTR

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    first = _quick_settings(tmp_path / "a", "tpe", 4, base_checkpoint)
    first.storage = storage
    run_search(first, log=lambda *a: None)
    second = _quick_settings(tmp_path / "b", "tpe", 6, base_checkpoint)
    second.storage = storage
    joined = run_search(second, log=lambda *a: None)
    assert len(joined.episodes) == 2
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6
    owners = [t.user_attrs[OWNER_ATTR].rpartition(":")[2] for t in trials]
    assert owners == [str((tmp_path / d / "tpe-s0.episodes.jsonl").resolve()) for d in "aaaabb"]
    assert [t.user_attrs[ACCURACY_ATTR] for t in trials[4:]] == [
        o.accuracy for o in joined.episodes
    ]
    first.episodes = 6
    (tmp_path / "a" / "tpe-s0.episodes.jsonl").unlink()
    with pytest.raises(CimError, match="already holds 4 trials of this search"):
        run_search(first, log=lambda *a: None)
