"""TPE studies on a real PostgreSQL server, which the tests start themselves: the URL as
users write it, workers opening one fresh database at once, two searches sharing one
study and its budget, a dead search's trial taken over, a server that is not there or
goes away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("psycopg")

from tests.agent.postgres import PostgresServer, available, free_port  # noqa: E402
from tvm_cim.agent import tpe  # noqa: E402
from tvm_cim.agent.search import SearchSettings, run_search  # noqa: E402
from tvm_cim.cli.main import main as cli_main  # noqa: E402
from tvm_cim.core.errors import CimError  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not available(), reason="PostgreSQL binaries are not on the PATH"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def server():
    db = PostgresServer().start()
    yield db
    db.stop()


def test_a_tpe_search_keeps_its_study_on_postgresql_given_a_plain_url(server, tmp_path):
    import optuna

    url = server.create_database("plain")
    assert url.startswith("postgresql://")  # no driver named, as users write it
    settings = SearchSettings(
        model="digits-mlp",
        dataset="synthetic",
        out=tmp_path,
        strategy="tpe",
        episodes=4,
        finetune_steps=1,
        verify=False,
        final_epochs=0,
        progress=False,
        storage=url,
    )
    result = run_search(settings, log=lambda *_: None)
    (name,) = optuna.get_all_study_names(storage=url)
    assert name.endswith(settings.tag)
    study = optuna.load_study(study_name=name, storage=url)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in complete] == [o.reward for o in result.episodes]
    assert len(complete) == 4


_OPEN = """
import sys
from tvm_cim.agent.tpe import open_study
open_study(sys.argv[1], "tpe-s0", 0, 10, False, "worker")
print("opened")
"""


def test_workers_started_together_on_a_fresh_database_all_open_the_study(server):
    for round_ in range(2):
        url = server.create_database(f"fresh{round_}")
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", _OPEN, url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(2)
        ]
        for worker in workers:
            out = worker.communicate(timeout=120)[0]
            assert worker.returncode == 0 and "opened" in out, out[-2000:]


def test_a_worker_losing_the_race_for_the_tables_retries(server, monkeypatch):
    import optuna
    import sqlalchemy.exc

    url = server.create_database("race")
    create = optuna.create_study
    calls = []

    def lose_once(**kwargs):  # what the second of two creators sees
        calls.append(kwargs["study_name"])
        if len(calls) == 1:
            raise sqlalchemy.exc.IntegrityError("INSERT", {}, Exception("unique violation"))
        return create(**kwargs)

    monkeypatch.setattr(optuna, "create_study", lose_once)
    opened = tpe.open_study(url, "tpe-s0", 0, 10, False, "worker")
    assert opened.study.study_name == "tpe-s0" and len(calls) == 2


def test_a_server_that_is_not_there_is_refused_before_any_work(tmp_path, capsys):
    url = f"postgresql://cim@127.0.0.1:{free_port()}/none"
    with pytest.raises(CimError, match="cannot open the Optuna study: .*127.0.0.1"):
        tpe.check_storage(url)
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic", "--strategy", "tpe"]
    assert cli_main([*args, "--storage", url, "--out", str(tmp_path / "s")]) == 2
    assert "cannot open the Optuna study" in capsys.readouterr().err


def test_a_server_that_goes_away_is_a_clear_error(tmp_path):
    alone = PostgresServer().start()  # a server of its own, to stop
    try:
        opened = tpe.open_study(alone.create_database("gone"), "tpe-s0", 0, 10, False, "worker")
    finally:
        alone.stop()
    stopped = pytest.raises(CimError, match="stopped answering: .*--resume continues")
    with stopped, tpe._database_errors(opened.study):
        opened.study.ask()


RUNNER = Path(__file__).with_name("killed_search.py")


def _shared_search(url: str, out: Path, start: Path, episodes: int, kill: str = ""):
    """A TPE search process on the study at ``url`` (``kill``: see ``killed_search.py``)."""
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic", "--strategy", "tpe"]
    args += ["--episodes", str(episodes), "--max-acc-drop", "1.0", "--finetune-steps", "30"]
    args += ["--final-epochs", "0", "--no-verify", "--no-progress", "--from", str(start)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CIM_TEST_KILL=kill, CIM_TEST_GRACE="3")
    return subprocess.Popen(
        [sys.executable, str(RUNNER), *args, "--storage", url, "--out", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _study(url: str):
    import optuna

    (name,) = optuna.get_all_study_names(storage=url)
    return optuna.load_study(study_name=name, storage=url)


def _records(out: Path) -> list[dict]:
    from tvm_cim.agent.log import EpisodeLog

    return EpisodeLog.read_records(out / "tpe-s0.episodes.jsonl")


def _logged(out: Path) -> list[dict]:
    return [r for r in _records(out) if r["type"] == "episode"]


def _policy(trial, operators: list[str]) -> list[list[int]]:
    return [[trial.params[f"{n}.w_bits"], trial.params[f"{n}.a_bits"]] for n in operators]


def test_two_searches_share_one_study_and_its_budget(server, tmp_path, base_checkpoint):
    """Two processes started together on one study: the budget is the study's, every trial
    is in one of the logs, no policy is measured twice, the best is the logs' best."""
    url = server.create_database("shared")
    outs = [tmp_path / "a", tmp_path / "b"]
    processes = [_shared_search(url, out, base_checkpoint, 16) for out in outs]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    trials = _study(url).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 16
    logs = [_logged(out) for out in outs]
    assert all(logs), "each search takes part of the budget"
    operators = _records(outs[0])[0]["operators"]
    policies = [_policy(t, operators) for t in trials]
    logged = sorted((json.dumps(r["policy"]), r["reward"]) for log in logs for r in log)
    assert logged == sorted((json.dumps(p), t.value) for p, t in zip(policies, trials))
    summaries = [json.loads((out / "tpe-s0.summary.json").read_text()) for out in outs]
    uniform = [[[b, b]] * len(operators) for b in (8, 6, 4)]
    distinct = {json.dumps(p) for p in policies if p not in uniform}
    assert sum(s["evaluations"] - len(uniform) for s in summaries) == len(distinct)
    best = max(summaries, key=lambda s: s["best"]["reward"])["best"]
    assert best["reward"] == max(t.value for t in trials)


def test_a_dead_searchs_trial_is_taken_over_by_another(server, tmp_path, base_checkpoint):
    """A search killed mid-measurement leaves a running trial; once its heartbeat is
    silent for the grace period, the next search fails it and plays its episode."""
    url = server.create_database("dead")
    killed = _shared_search(url, tmp_path / "a", base_checkpoint, 8, kill="eval:6")
    _, err = killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    states = [t.state.name for t in _study(url).trials]
    assert states == ["COMPLETE"] * 2 + ["RUNNING"]  # three uniform points, then episodes
    time.sleep(4)
    other = _shared_search(url, tmp_path / "b", base_checkpoint, 8)
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    states = [t.state.name for t in _study(url).trials]
    assert states == ["COMPLETE"] * 2 + ["FAIL"] + ["COMPLETE"] * 6
    assert len(_logged(tmp_path / "b")) == 6
