"""The precision search: environment, latency table, strategies, logs and the driver."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")
pytest.importorskip("gymnasium")
pytest.importorskip("stable_baselines3")
pytest.importorskip("optuna")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from tvm_cim import CimError, compile_for_cim, cost_report, models  # noqa: E402
from tvm_cim.agent import strategies, tpe  # noqa: E402
from tvm_cim.agent.env import CimQuantEnv, ContinuousActions  # noqa: E402
from tvm_cim.agent.latency import FEATURES, LatencyTable  # noqa: E402
from tvm_cim.agent.log import EpisodeLog  # noqa: E402
from tvm_cim.agent.scoring import PolicyScorer, QatAccuracy  # noqa: E402
from tvm_cim.agent.search import SearchSettings, run_search  # noqa: E402
from tvm_cim.agent.space import Reward, SearchSpace  # noqa: E402
from tvm_cim.cli.main import main as cli_main  # noqa: E402
from tvm_cim.compiler.frontend import load_torch  # noqa: E402
from tvm_cim.core.arch import CimArch  # noqa: E402
from tvm_cim.core.precision import Bits, Precision  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def mlp_table():
    model = models.build("digits-mlp").eval()
    return LatencyTable.for_model(model, torch.zeros(1, 1, 8, 8), "rram-4b")


def stand_in_accuracy(precision) -> float:
    """Cheap, deterministic accuracy: each operator loses a point per bit below its need."""
    needs = [(4, 5), (3, 3), (3, 4)]
    loss = sum(
        max(0, w - b.w_bits) + max(0, a - b.a_bits) for (w, a), b in zip(needs, precision.values())
    )
    return 98.0 - loss


def make_env(table, space=None, reward=None):
    return CimQuantEnv(PolicyScorer(table, stand_in_accuracy, reward or Reward()), space)


def play(strategy, env, episodes, seed, tmp_path, tag="x"):
    log = EpisodeLog(tmp_path / f"{strategy}-{tag}.jsonl", {"strategy": strategy, "seed": seed})
    recorder = strategies.EpisodeRecorder(log)
    if strategy == "tpe":
        study = tpe.open_study(
            f"sqlite:///{tmp_path / f'{tag}.db'}", "study", seed, episodes, False, tag
        )
        tpe.run_tpe(env, recorder, episodes, study)
    else:
        getattr(strategies, f"run_{strategy}")(env, recorder, episodes, seed)
    return log.episodes


# ------------------------------------------------------------------------ environment


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
def test_check_env(mlp_table):
    check_env(make_env(mlp_table), skip_render_check=True)
    check_env(ContinuousActions(make_env(mlp_table)), skip_render_check=True)


def test_episode_walks_weight_then_activation_bits(mlp_table):
    env = make_env(mlp_table)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert env.decisions == 6
    rewards = []
    for step in range(env.decisions):
        assert obs[len(FEATURES) + 1] == step % 2  # which choice is next
        obs, reward, terminated, truncated, info = env.step(env.action_space.n - 1 - step % 2)
        rewards.append(reward)
    assert terminated and not truncated
    assert rewards[:-1] == [0.0] * 5  # sparse: only the finished policy is scored
    outcome = info["outcome"]
    assert outcome.policy == (Bits(8, 7),) * 3
    assert outcome.reward == rewards[-1]
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


def test_cim_aq_reward():
    reward = Reward(max_acc_drop=0.5)
    assert reward(96.0, 97.0, 0.5) == pytest.approx(-10 * 0.5)
    assert reward(97.0, 97.0, 0.5) == pytest.approx(100 * (2 - 1) + 0.1 * 0.5)
    with pytest.raises(CimError, match="max_acc_drop"):
        Reward(max_acc_drop=-1)


@pytest.mark.parametrize("strategy", ["random", "dqn", "ddpg", "tpe"])
def test_runs_are_deterministic_for_a_seed(mlp_table, tmp_path, strategy):
    first = play(strategy, make_env(mlp_table), 12, 3, tmp_path, "a")
    second = play(strategy, make_env(mlp_table), 12, 3, tmp_path, "b")
    other = play(strategy, make_env(mlp_table), 12, 4, tmp_path, "c")
    assert len(first) == 12
    assert [o.policy for o in first] == [o.policy for o in second]
    assert [o.policy for o in first] != [o.policy for o in other]


@pytest.mark.parametrize("strategy", ["random", "dqn", "ddpg", "tpe"])
def test_every_action_respects_the_constraints(mlp_table, tmp_path, strategy):
    space = SearchSpace(
        min_w_bits=3, max_w_bits=8, min_a_bits=3, max_a_bits=6,
        weight_multiple_of_cell=True, pin_first_last=True,
    )  # fmt: skip
    env = make_env(mlp_table, space)
    assert env.w_choices == [4, 8] and env.a_choices == [3, 4, 5, 6]
    episodes = play(strategy, env, 15, 0, tmp_path)
    seen = set()
    for outcome in episodes:
        first, middle, last = outcome.policy
        assert first == last == Bits(8, 8)  # pinned
        assert middle.w_bits in (4, 8) and 3 <= middle.a_bits <= 6
        seen.add(middle)
    assert len(seen) > 1


def test_impossible_constraints_are_refused(mlp_table):
    space = SearchSpace(min_w_bits=5, max_w_bits=7, weight_multiple_of_cell=True)
    with pytest.raises(CimError, match="no weight width in 5..7 is a multiple"):
        make_env(mlp_table, space)
    with pytest.raises(CimError, match="min_w_bits must be at least 2"):
        SearchSpace(min_w_bits=1)
    with pytest.raises(CimError, match="min_a_bits 6 > max_a_bits 4"):
        SearchSpace(min_a_bits=6, max_a_bits=4)
    with pytest.raises(CimError, match="leaves none of 2"):
        SearchSpace(pin_first_last=True).searched(2)


# ------------------------------------------------------------------------ latency table


def test_latency_table_equals_the_compiled_report(mlp_table):
    model = models.build("digits-mlp").eval()
    mod, names = load_torch(model, torch.zeros(1, 1, 8, 8))
    assert mlp_table.names == names == ["fc1", "fc2", "fc3"]
    policy = (Bits(3, 5), Bits(8, 2), Bits(5, 7))
    precision = dict(zip(names, [b.to_dict() for b in policy]))
    cost = cost_report(mod, arch="rram-4b", precision=precision, names=names)
    calibration = [np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)]
    _, compiled = compile_for_cim(
        mod, arch="rram-4b", precision=precision, calibration=calibration, names=names
    )
    for report in (cost, compiled):
        assert [op.latency_us for op in report.operators] == [
            mlp_table.operator_latency(i, b) for i, b in enumerate(policy)
        ]
        assert report.sequential_latency_us == pytest.approx(mlp_table.latency(policy), abs=1e-9)


@pytest.mark.parametrize("crossbars", [4, 16])
def test_the_makespan_table_adds_up_to_the_scheduled_latency(crossbars):
    """On many crossbars the search's latency is the schedule the report prints, for mixed
    policies too; the sequential table gives the sum of every instruction's latency."""
    model = models.build("digits-cnn").eval()  # convolutions: copies on idle crossbars
    example = torch.zeros(1, 1, 8, 8)
    arch = CimArch.preset("rram-4b").replace(crossbars=crossbars)
    makespan = LatencyTable.for_model(model, example, arch)
    sequential = LatencyTable.for_model(model, example, arch, objective="sequential")
    assert (makespan.objective, sequential.objective) == ("makespan", "sequential")
    mod, names = load_torch(model, example)
    rng = np.random.default_rng(crossbars)
    for _ in range(4):
        policy = tuple(Bits(int(rng.integers(2, 9)), int(rng.integers(2, 9))) for _ in names)
        precision = dict(zip(names, [b.to_dict() for b in policy]))
        report = cost_report(mod, arch=arch, precision=precision, names=names)
        assert makespan.latency(policy) == pytest.approx(report.total_latency_us, rel=1e-9)
        assert sequential.latency(policy) == pytest.approx(report.sequential_latency_us, rel=1e-9)
        assert makespan.latency(policy) < sequential.latency(policy) / 2


def test_on_one_crossbar_both_objectives_are_the_papers_latency(mlp_table):
    model = models.build("digits-mlp").eval()
    sequential = LatencyTable.for_model(model, torch.zeros(1, 1, 8, 8), "rram-4b", "sequential")
    assert mlp_table.objective == "makespan"
    assert np.array_equal(sequential.latency_us, mlp_table.latency_us)


def test_latency_table_round_trips(mlp_table, tmp_path):
    loaded = LatencyTable.load(mlp_table.save(tmp_path / "table.npz"))
    assert loaded.operators == mlp_table.operators and loaded.arch == mlp_table.arch
    assert np.array_equal(loaded.latency_us, mlp_table.latency_us)
    assert loaded.objective == "makespan"
    with np.load(tmp_path / "table.npz") as blob:  # a table written before objectives
        older = {key: blob[key] for key in blob.files if key != "objective"}
    np.savez(tmp_path / "older.npz", **older)
    assert LatencyTable.load(tmp_path / "older.npz").objective == "sequential"
    with pytest.raises(CimError, match="unknown latency objective 'energy'"):
        LatencyTable(mlp_table.operators, mlp_table.latency_us, mlp_table.arch, "energy")
    (tmp_path / "bad.npz").write_bytes(b"not a table")
    with pytest.raises(CimError, match="not a latency table"):
        LatencyTable.load(tmp_path / "bad.npz")


# ------------------------------------------------------------------------ learning


def test_dqn_improves_its_best_reward(mlp_table, tmp_path):
    episodes = play("dqn", make_env(mlp_table), 150, 0, tmp_path)
    rewards = [o.reward for o in episodes]
    assert max(rewards) > max(rewards[:10])
    assert np.mean(rewards[-30:]) > np.mean(rewards[:30]) + 20  # it learned, not just luck


# ------------------------------------------------------------------------ the driver


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A W8A8 digits-mlp trained on the synthetic set by a first, tiny search."""
    out = tmp_path_factory.mktemp("base")
    run_search(_settings(out, strategy="random", episodes=2, base_checkpoint=None))
    return out / "base-digits-mlp-synthetic" / "w8a8.pt"


def _settings(out, **overrides):
    values = dict(
        model="digits-mlp",
        dataset="synthetic",
        out=out,
        strategy="random",
        episodes=6,
        max_acc_drop=1.0,
        finetune_steps=2,
        verify=False,
        progress=False,
    )
    values.update(overrides)
    return SearchSettings(**values)


def test_search_writes_its_outputs_and_closes_the_loop(base_checkpoint, tmp_path):
    result = run_search(
        _settings(
            tmp_path, base_checkpoint=base_checkpoint, episodes=8, verify=True, final_epochs=1
        )
    )
    files = result.files
    for key in ("log", "policy_yaml", "policy_npy", "bits_png", "pareto_png", "summary_md"):
        assert files[key].is_file() and files[key].stat().st_size > 0
    names = result.names
    for path in (files["policy_yaml"], files["policy_npy"]):
        assert list(Precision.load(path).resolve(names).values()) == list(result.best.policy)
    assert result.best.reward == max(o.reward for o in result.episodes)
    assert set(result.references) == {"W8A8", "W6A6", "W4A4"}
    summary = json.loads(files["summary_json"].read_text())
    assert summary["best"]["policy"] == [[b.w_bits, b.a_bits] for b in result.best.policy]
    for label in ("best", "W8A8"):
        v = result.verification[label]
        assert abs(v["simulated_val_accuracy"] - v["searched_val_accuracy"]) <= 0.1
        assert abs(v["simulated_test_accuracy"] - v["pytorch_test_accuracy"]) <= 0.1
        assert v["compiled_latency_us"] == pytest.approx(v["searched_latency_us"], abs=1e-6)
        tuned = v["finetuned"]
        assert abs(tuned["simulated_test_accuracy"] - tuned["pytorch_test_accuracy"]) <= 0.1
    assert "| best found |" in files["summary_md"].read_text()

    # Confirmed on the test split, the same figures as the verification's PyTorch runs;
    # the final finetune never ends worse on the selection split.
    searched, final = summary["confirmation"]["searched"], summary["confirmation"]["final"]
    assert searched["n"] == final["n"] == 400  # the synthetic test split
    assert searched["val_accuracy"]["best"] == pytest.approx(result.best.accuracy)
    for c, figures in ((searched, result.verification), (final, None)):
        assert c["low"] <= c["drop"] <= c["high"]
        assert c["drop"] == pytest.approx(c["reference_accuracy"] - c["candidate_accuracy"])
        assert c["verdict"] in ("holds", "inconclusive", "exceeded")
        if figures is not None:
            assert c["candidate_accuracy"] == pytest.approx(
                figures["best"]["pytorch_test_accuracy"]
            )
            assert c["reference_accuracy"] == pytest.approx(
                figures["W8A8"]["pytorch_test_accuracy"]
            )
    best_tuned = result.verification["best"]["finetuned"]
    assert final["candidate_accuracy"] == pytest.approx(best_tuned["pytorch_test_accuracy"])
    for label in ("best", "W8A8"):
        assert final["val_accuracy"][label] >= searched["val_accuracy"][label]
        assert final["kept_epoch"][label] in (0, 1)
    assert "Confirmed on the test split (400 samples" in files["summary_md"].read_text()
    from tvm_cim.compiler.frontend import load_onnx  # the finetuned best model compiles as written

    mod, onnx_names = load_onnx(files["policy_onnx"])
    _, report = compile_for_cim(mod, names=onnx_names)
    assert [(op.w_bits, op.a_bits) for op in report.operators] == [
        (b.w_bits, b.a_bits) for b in result.best.policy
    ]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("strategy", ["random", "dqn", "tpe"])
def test_resume_loses_no_finished_episode(base_checkpoint, tmp_path, monkeypatch, strategy):
    settings = _settings(tmp_path, base_checkpoint=base_checkpoint, strategy=strategy, episodes=10)
    original = QatAccuracy.__call__
    calls = {"n": 0}

    def dying(self, precision):
        calls["n"] += 1
        if calls["n"] > 8:  # 3 uniform points, W8A8 reused, then a few episodes
            raise _Interrupt
        return original(self, precision)

    monkeypatch.setattr(QatAccuracy, "__call__", dying)
    with pytest.raises(_Interrupt):
        run_search(settings)
    monkeypatch.setattr(QatAccuracy, "__call__", original)
    before = EpisodeLog.read_records(tmp_path / f"{strategy}-s0.episodes.jsonl")
    done = [r for r in before if r["type"] == "episode"]
    assert 0 < len(done) < 10

    with pytest.raises(CimError, match="pass --resume"):
        run_search(settings)
    settings.resume = True
    result = run_search(settings)
    assert len(result.episodes) == 10
    assert [o.to_dict()["policy"] for o in result.episodes[: len(done)]] == [
        r["policy"] for r in done
    ]
    assert result.evaluations < 10  # finished episodes were not evaluated again


def test_resume_refuses_another_search_or_a_corrupt_log(base_checkpoint, tmp_path):
    settings = _settings(tmp_path, base_checkpoint=base_checkpoint, episodes=3)
    run_search(settings)
    settings.resume = True
    settings.max_acc_drop = 2.0
    with pytest.raises(CimError, match="belongs to another search"):
        run_search(settings)
    settings.max_acc_drop = 1.0
    log = tmp_path / "random-s0.episodes.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1] + ['{"type": "episode", "index": 2, "pol']) + "\n")
    with pytest.raises(CimError, match=rf"episodes.jsonl:{len(lines)}: corrupt search log"):
        run_search(settings)


def test_corrupt_study_is_an_error(base_checkpoint, tmp_path):
    (tmp_path / "optuna.db").write_bytes(b"this is not a database" * 100)
    settings = _settings(tmp_path, base_checkpoint=base_checkpoint, strategy="tpe")
    with pytest.raises(CimError, match="cannot open the Optuna study"):
        run_search(settings)


# ------------------------------------------------------------------------ command line


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "nope", "--dataset", "digits"], "unknown model 'nope'"),
        (["--model", "digits-mlp", "--dataset", "cifar10"], "cifar10"),
        (["--model", "digits-mlp", "--dataset", "digits", "--strategy", "ppo"], "unknown strategy"),
        (["--model", "digits-mlp", "--dataset", "digits", "--episodes", "0"], "at least 1"),
        (
            ["--model", "digits-mlp", "--dataset", "digits", "--cell-multiple"]
            + ["--min-bits", "5", "--max-bits", "7"],
            "no weight width in 5..7",
        ),
        (
            ["--model", "digits-mlp", "--dataset", "digits", "--storage", "sqlite:///x.db"],
            "--storage applies to --strategy tpe only",
        ),
        (["--model", "digits-mlp", "--dataset", "mnist1d"], "input shape"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, args, message):
    assert cli_main(["search", *args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_cli_names_the_objectives(tmp_path, capsys):
    args = ["search", "--model", "digits-mlp", "--dataset", "digits", "--objective", "energy"]
    with pytest.raises(SystemExit) as exit_:
        cli_main([*args, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "invalid choice: 'energy' (choose from 'makespan', 'sequential')" in (
        capsys.readouterr().err
    )


def test_cli_refuses_an_arch_without_rows(tmp_path, capsys):
    arch = tmp_path / "arch.yaml"
    arch.write_text("rows: 0\ncols: 256\n")
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic", "--arch", str(arch)]
    assert cli_main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "rows must be an integer in 1..65535" in capsys.readouterr().err


def test_cli_search_prints_the_summary(base_checkpoint, tmp_path, capsys):
    args = ["search", "--model", "digits-mlp", "--dataset", "synthetic", "--episodes", "3"]
    args += ["--from", str(base_checkpoint), "--finetune-steps", "1", "--no-verify"]
    assert cli_main([*args, "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| best found |" in out and "dqn-s0.best.yaml" in out


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04torn"], ids=["empty", "torn"])
def test_a_latency_table_cache_that_does_not_load_is_rebuilt(mlp_table, tmp_path, content):
    """A search killed while writing its cache must not block the resume."""
    from types import SimpleNamespace

    from tvm_cim.agent.search import arch_tag, latency_table

    arch = mlp_table.arch
    settings = SimpleNamespace(out=str(tmp_path), model="digits-mlp", objective="makespan")
    path = tmp_path / f"latency-digits-mlp-{arch_tag(arch)}-makespan.npz"
    path.write_bytes(content)
    said = []
    model = models.build("digits-mlp").eval()
    table = latency_table(settings, model, torch.zeros(1, 1, 8, 8), arch, said.append)
    assert any("computing the latency table again" in line for line in said)
    assert np.array_equal(table.latency_us, mlp_table.latency_us)
    assert np.array_equal(LatencyTable.load(path).latency_us, mlp_table.latency_us)


def test_one_search_per_output_directory(tmp_path):
    """A second search on a held ``--out`` is refused naming the holder; once the first
    ends (or dies: the kernel drops its lock), the directory is free again."""
    import os

    from tvm_cim.agent.lock import hold_directory

    taken = f"in use by another search \\(pid {os.getpid()}\\)"
    with hold_directory(tmp_path), pytest.raises(CimError, match=taken), hold_directory(tmp_path):
        pass
    with hold_directory(tmp_path):
        pass


def test_a_search_refuses_a_directory_another_one_holds(base_checkpoint, tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from tvm_cim.agent.lock import hold_directory\n"
            f"with hold_directory({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        settings = _settings(tmp_path, base_checkpoint=base_checkpoint)
        with pytest.raises(CimError, match=f"pid {holder.pid}"):
            run_search(settings, log=lambda *a: None)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["search.lock"]  # nothing begun
    finally:
        holder.kill()
        holder.wait()
