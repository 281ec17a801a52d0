"""TPE studies on a real PostgreSQL server, which the tests start themselves: the URL as
users write it, workers opening one fresh database at once, a server that is not there or
goes away."""

from __future__ import annotations

import subprocess
import sys

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
