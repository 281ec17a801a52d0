"""Searches measuring on a Dask cluster of two worker processes: the same log twice for a
seed, random search logging what one measurement at a time logs, a worker killed in the
middle of a measurement costing only that measurement."""

import os
import signal
import sys
import threading
import time

import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("distributed")

from tvm_cim.agent.cluster import EvaluationPool, local_cluster  # noqa: E402
from tvm_cim.agent.search import SearchSettings, run_search  # noqa: E402
from tvm_cim.agent.strategies import STRATEGIES  # noqa: E402
from tvm_cim.core.errors import CimError  # noqa: E402
from tvm_cim.core.precision import Bits  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def cluster():
    """The local cluster ``--workers 2`` starts, and a client of the test's."""
    from distributed import Client

    with local_cluster(2) as local, Client(local) as client:
        yield local, client


def _settings(out, start, strategy="random", **overrides) -> SearchSettings:
    values = dict(
        model="digits-mlp", dataset="synthetic", out=out, strategy=strategy, episodes=8,
        max_acc_drop=1.0, finetune_steps=2, verify=False, final_epochs=0, progress=False,
        base_checkpoint=start,
    )  # fmt: skip
    values.update(overrides)
    return SearchSettings(**values)


def _scored(result) -> list[dict]:
    return [o.to_dict() for o in result.episodes]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_logs_the_same_search_twice_on_the_cluster(
    cluster, base_checkpoint, strategy, tmp_path
):
    address = cluster[0].scheduler_address
    runs = [
        run_search(
            _settings(tmp_path / f"run{i}", base_checkpoint, strategy, workers=2, cluster=address),
            log=lambda *a: None,
        )
        for i in range(2)
    ]
    assert _scored(runs[0]) == _scored(runs[1])
    assert len(runs[0].episodes) == 8
    assert runs[0].evaluations > 3  # the uniform points and some of the episodes


def test_random_search_on_a_local_cluster_logs_what_one_at_a_time_logs(base_checkpoint, tmp_path):
    """The embedded default: ``workers`` alone starts a local cluster; the measurements
    on its workers equal this process's, bit for bit."""
    alone = run_search(_settings(tmp_path / "alone", base_checkpoint), log=lambda *a: None)
    local = _settings(tmp_path / "local", base_checkpoint, workers=2)
    assert _scored(run_search(local, log=lambda *a: None)) == _scored(alone)


def test_a_worker_killed_mid_measurement_costs_only_that_measurement(
    cluster, base_checkpoint, tmp_path
):
    local, client = cluster
    # longer measurements, so that one is caught running
    settings = dict(finetune_steps=60, episodes=6)
    reference = run_search(
        _settings(tmp_path / "reference", base_checkpoint, **settings), log=lambda *a: None
    )
    killed = []

    def kill_a_busy_worker():
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            measuring = [w for w, keys in busy.items() if any("_measured" in k for k in keys)]
            if measuring:
                pid = client.run(os.getpid, workers=measuring[:1])[measuring[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    searched = _settings(
        tmp_path / "killed", base_checkpoint, workers=2, cluster=local.scheduler_address, **settings
    )
    result = run_search(searched, log=lambda *a: None)
    killer.join()
    assert killed, "no measurement was caught running"
    assert _scored(result) == _scored(reference)
    client.wait_for_workers(2, timeout=120)  # the nanny restarted the killed worker
    assert killed[0] not in client.run(os.getpid).values()


def test_local_workers_keep_glibcs_allocator_import_torch_and_share_each_batch():
    from distributed import get_task_stream

    with EvaluationPool.open(2) as pool:
        pool.bind(len)  # an evaluation that returns at once: the number of operators
        environment = pool.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
        imported = pool.client.run(lambda: "torch._dynamo" in sys.modules)
        with get_task_stream(pool.client) as stream:
            assert pool.measure([{"a": Bits(8, 8), "b": Bits(4, 4)}] * 4) == [2.0] * 4
    assert list(environment.values()) == [None, None]
    assert list(imported.values()) == [True, True]
    placed = [task["worker"] for task in stream.data if str(task["key"]).startswith("_measured")]
    assert sorted(placed.count(worker) for worker in environment) == [2, 2]


def test_lockstep_agents_need_a_budget_of_whole_rounds(tmp_path, base_checkpoint):
    with pytest.raises(CimError, match="not a multiple of 2"):
        run_search(_settings(tmp_path, base_checkpoint, "dqn", episodes=7, workers=2))


def test_a_cluster_needs_the_measurements_in_flight(tmp_path, base_checkpoint):
    with pytest.raises(CimError, match="--cluster needs --workers"):
        run_search(_settings(tmp_path, base_checkpoint, cluster="tcp://127.0.0.1:8786"))
