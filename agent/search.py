"""The search driver behind ``tvm-cim search``: base model, latency table, strategy,
outputs, and the closing loop on the simulator.

``run_search(settings)``:

0. checks every setting before any work, writing nothing: the numbers, the output
   directory, arch, constraints, dataset, base checkpoint, the episode log a resume
   continues (or one that forbids a new search) and the Optuna storage; then takes the
   output directory's lock;
1. trains the base model (FP32, then W8A8 QAT) or reuses it from the output directory;
2. computes the latency table for the arch (cost-only compiles) or reuses it;
3. scores the uniform points W8A8, W6A6 and W4A4, then runs the strategy for the episode
   budget, logging every episode (``--resume`` replays the log and continues);
4. writes the best policy (YAML and CIM-AQ's ``.npy``), the bit-width chart, the Pareto
   plot of every search in the directory and a summary;
5. confirms on the test split, which the search never saw: the best policy's model
   (recalibrated and finetuned exactly as the search evaluated it) against the W8A8
   model on the same samples, with a 95 % interval of the drop, before and after the
   final finetune (``confirm.py``);
6. closes the loop: both models are compiled for ``cim`` and run on the simulator over
   the validation and test splits, the finetuned ones over the test split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import socket
from dataclasses import dataclass, field
from pathlib import Path

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.files import folder_problem, remove_temporaries
from tvm_cim.core.precision import Bits

from .cluster import EvaluationPool
from .config import AgentConfig
from .confirm import BEST, REFERENCE, confirm
from .env import CimQuantEnv
from .latency import DEFAULT_OBJECTIVE, LatencyTable, check_objective
from .lock import hold_directory
from .log import EpisodeLog
from .scoring import Outcome, PolicyScorer, QatAccuracy
from .space import Reward, SearchSpace
from .strategies import (
    STRATEGIES,
    EpisodeRecorder,
    check_lockstep_budget,
    run_ddpg,
    run_dqn,
    run_random,
)
from .tpe import check_storage, open_study, run_tpe
from .verify import verify

#: Uniform reference points scored in every search.
UNIFORM = {"W8A8": Bits(8, 8), "W6A6": Bits(6, 6), "W4A4": Bits(4, 4)}

#: Epochs and learning rates of the base model's two stages, per model.
BASE_RECIPES = {
    "digits-cnn": {"fp32": (30, 3e-3, 32), "w8a8": (8, 2e-4, 32)},
    "digits-mlp": {"fp32": (30, 3e-3, 32), "w8a8": (8, 2e-4, 32)},
    "mnist1d-cnn": {"fp32": (20, 3e-3, 64), "w8a8": (5, 2e-4, 64)},
    "mnist1d-resnet": {"fp32": (10, 3e-3, 128), "w8a8": (2, 2e-4, 128)},  # 60,000 samples
    "digits-vit": {"fp32": (20, 1e-3, 64), "w8a8": (5, 2e-4, 64)},
}
_DEFAULT_RECIPE = {"fp32": (20, 3e-3, 64), "w8a8": (5, 2e-4, 64)}


@dataclass
class SearchSettings:
    """One search.

    Attributes
    ----------
    model, dataset
        A trainable zoo model and the dataset it is trained and evaluated on.
    out
        Output directory; several searches (strategies, seeds) may share it.
    arch
        Preset name, arch file (tvm-cim or CIM-AQ YAML/JSON) or ``CimArch``.
    objective
        The latency the search minimizes (``latency.OBJECTIVES``): ``makespan``, the
        scheduled latency ``tvm-cim report`` prints for the arch, or ``sequential``, the
        sum of every instruction's latency (the same with one crossbar).
    strategy
        ``dqn``, ``ddpg``, ``tpe`` or ``random``.
    episodes
        Budget: complete policies played.
    max_acc_drop
        Accuracy points a policy may lose against W8A8 (the reward's target).
    seed
        Seed of the strategy (the base model is always trained with seed 0).
    workers
        Accuracy measurements in flight, as Dask tasks (``cluster.py``): the size of the
        local cluster this search starts, or with ``cluster`` the workers it keeps busy.
        None: one at a time, in this process. A search is deterministic for its seed and
        worker count (random search: for its seed alone).
    cluster
        Address of a running Dask scheduler to measure on instead of a local cluster.
    storage
        Optuna storage URL for TPE (default: ``sqlite:///<out>/optuna.db``); processes
        given the same URL (PostgreSQL) share the study and its ``episodes`` budget.
    resume
        Continue the search logged in ``out``.
    space, reward, agents
        Constraints, reward (its ``max_acc_drop`` is replaced by ``max_acc_drop``) and
        agent settings.
    finetune_steps
        Training batches of the "evaluate this policy" step.
    verify
        Compile the best policy and W8A8 for ``cim`` and simulate them.
    final_epochs
        QAT epochs that finetune the best policy (and W8A8) after the search, keeping the
        epoch with the best selection accuracy, before they are confirmed, compiled and
        simulated a second time (0: none).
    progress
        Show a progress bar.
    base_checkpoint
        Start from this W8A8 (or FP32) checkpoint instead of training the base model.
    """

    model: str
    dataset: str
    out: Path
    arch: object = "rram-4b"
    objective: str = DEFAULT_OBJECTIVE
    strategy: str = "dqn"
    episodes: int = 150
    max_acc_drop: float = 0.1
    seed: int = 0
    workers: int | None = None
    cluster: str | None = None
    storage: str | None = None
    resume: bool = False
    space: SearchSpace = field(default_factory=SearchSpace)
    reward: Reward = field(default_factory=Reward)
    agents: AgentConfig = field(default_factory=AgentConfig)
    finetune_steps: int = 20
    verify: bool = True
    final_epochs: int = 5
    progress: bool = True
    base_checkpoint: Path | None = None

    @property
    def tag(self) -> str:
        return f"{self.strategy}-s{self.seed}"


@dataclass
class SearchResult:
    """What a search found, and where it wrote it."""

    settings: SearchSettings
    names: list[str]
    best: Outcome
    references: dict[str, Outcome]
    episodes: list[Outcome]
    evaluations: int  # accuracy measurements made by this run (a resumed one reuses the log)
    seconds: float
    reference_latency_us: float
    confirmation: dict  # the best policy against W8A8 on the test split (``confirm.py``)
    verification: dict | None
    files: dict[str, Path]


def _validate(settings: SearchSettings) -> None:
    from tvm_cim.learn import zoo as models

    if settings.strategy not in STRATEGIES:
        raise CimError(
            f"unknown strategy {settings.strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    if isinstance(settings.episodes, bool) or not isinstance(settings.episodes, int):
        raise CimError(f"episodes must be an integer, got {settings.episodes!r}")
    if settings.episodes < 1:
        raise CimError(f"episodes must be at least 1, got {settings.episodes}")
    if settings.finetune_steps < 0:
        raise CimError(f"finetune steps must be >= 0, got {settings.finetune_steps}")
    if settings.final_epochs < 0:
        raise CimError(f"final epochs must be >= 0, got {settings.final_epochs}")
    if settings.model not in models.names():
        raise CimError(f"unknown model {settings.model!r}; the zoo has {', '.join(models.names())}")
    if settings.storage and settings.strategy != "tpe":
        raise CimError("--storage applies to --strategy tpe only")
    if settings.workers is not None and (
        isinstance(settings.workers, bool) or not isinstance(settings.workers, int)
    ):
        raise CimError(f"workers must be an integer, got {settings.workers!r}")
    if settings.workers is not None and settings.workers < 1:
        raise CimError(f"workers must be at least 1, got {settings.workers}")
    if settings.workers is not None and settings.strategy in ("dqn", "ddpg"):
        check_lockstep_budget(settings.episodes, settings.workers)
    if settings.cluster is not None and settings.workers is None:
        raise CimError(
            "--cluster needs --workers N, the measurements this search keeps in flight "
            "(it fixes the course of the search)"
        )
    check_objective(settings.objective)
    problem = folder_problem(Path(settings.out))
    if problem:
        raise CimError(f"cannot write the output directory: {problem}")


@dataclass
class _Checked:
    """What checking a search's settings loaded on the way: nothing written yet."""

    arch: CimArch
    reward: Reward
    dataset: object
    start: object | None  # the base model of ``--from``
    header: dict  # the log header, less what the latency table adds
    study: tuple[str, str] | None  # TPE: (storage URL, study name)

    @property
    def in_flight(self) -> int:
        return self.header["workers"]


def _check(settings: SearchSettings) -> _Checked:
    """Check every setting before the work it guards (see the module docstring)."""
    from tvm_cim.learn import data, train
    from tvm_cim.learn import zoo as models

    _validate(settings)
    out = Path(settings.out)
    arch = CimArch.load(settings.arch)
    reward = dataclasses.replace(settings.reward, max_acc_drop=settings.max_acc_drop)
    settings.space.weight_choices(arch.cell_bits)  # refuse an empty space before any training
    dataset = data.load(settings.dataset)
    if tuple(dataset.input_shape) != tuple(models.input_shape(settings.model)):
        raise CimError(
            f"{settings.model} takes input shape {models.input_shape(settings.model)}, but "
            f"{settings.dataset} has input shape {tuple(dataset.input_shape)}"
        )
    start = None
    if settings.base_checkpoint is not None:
        start, _ = train.load_checkpoint(settings.base_checkpoint, settings.model)
    header = {
        "model": settings.model,
        "dataset": settings.dataset,
        "arch": arch.to_dict(),
        "objective": settings.objective,
        "strategy": settings.strategy,
        "seed": settings.seed,
        "workers": settings.workers or 1,
        "space": settings.space.to_dict(),
        "reward": reward.to_dict(),
        "evaluation": {"finetune_steps": settings.finetune_steps, "split": "val"},
    }
    EpisodeLog.check(_paths(out, settings.tag)["log"], header, settings.resume)
    study = None
    if settings.strategy == "tpe":
        storage = settings.storage or f"sqlite:///{(out / 'optuna.db').resolve()}"
        name = f"{settings.model}-{settings.dataset}-{arch_tag(arch)}-{settings.tag}"
        check_storage(storage)
        study = (storage, name)
    return _Checked(arch, reward, dataset, start, header, study)


def arch_tag(arch: CimArch) -> str:
    """A short name of an arch for cache files: its preset name, else a digest."""
    for name in CimArch.presets():
        if CimArch.preset(name) == arch:
            return name
    digest = hashlib.blake2b(json.dumps(arch.to_dict(), sort_keys=True).encode(), digest_size=6)
    return f"arch-{digest.hexdigest()}"


def base_model(settings: SearchSettings, dataset, log=print):
    """The W8A8 QAT model the search starts from: trained once, then reused from
    ``<out>/base-<model>-<dataset>/w8a8.pt``."""
    from tvm_cim.learn import train

    if settings.base_checkpoint is not None:
        model, _ = train.load_checkpoint(settings.base_checkpoint, settings.model)
        return model
    folder = _base_folder(settings)
    w8a8_path = folder / "w8a8.pt"
    if w8a8_path.is_file():
        try:
            model, _ = train.load_checkpoint(w8a8_path, settings.model)
        except CimError as exc:  # a cache that does not load is rebuilt, not trusted
            log(f"warning: training the base model again: {exc}")
        else:
            log(f"reusing the base model {w8a8_path}")
            return model
    recipe = BASE_RECIPES.get(settings.model, _DEFAULT_RECIPE)
    model = None
    for stage in ("fp32", "w8a8"):
        epochs, lr, batch = recipe[stage]
        config = train.TrainConfig(epochs=epochs, lr=lr, batch_size=batch, seed=0)
        model, result = train.run_stage(
            stage, settings.model, settings.dataset, config, start=model
        )
        train.save_checkpoint(model, result, folder / f"{stage}.pt")
        train.write_metrics(result, folder / f"{stage}.metrics.json")
        log(
            f"trained the base model, stage {stage}: val {result.val_accuracy:.2f} %, "
            f"test {result.test_accuracy:.2f} % ({result.seconds:.1f} s)"
        )
    return model


def latency_table(settings: SearchSettings, model, example, arch: CimArch, log=print):
    """The model's latency table for ``arch``, computed once per output directory."""
    path = _table_path(settings, arch)
    if path.is_file():
        try:
            table = LatencyTable.load(path)
        except CimError as exc:  # a cache that does not load is rebuilt, not trusted
            log(f"warning: computing the latency table again: {exc}")
        else:
            if table.arch == arch and table.objective == settings.objective:
                log(f"reusing the latency table {path}")
                return table
    table = LatencyTable.for_model(model, example, arch, settings.objective)
    table.save(path)
    return table


def run_search(settings: SearchSettings, log=print) -> SearchResult:
    """Run (or resume) one search and write its outputs; see the module docstring.

    Raises
    ------
    CimError
        Bad settings (found before anything is written), or another search running in
        the same output directory.
    """
    checked = _check(settings)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    with hold_directory(out):
        for path in _written_files(settings, checked.arch):  # the lock: no live writer
            remove_temporaries(path)
        return _search(settings, checked, log)


def _written_files(settings: SearchSettings, arch: CimArch) -> list[Path]:
    """The files a search writes into its output directory."""
    base = _base_folder(settings)
    stages = [
        base / f"{stage}{ext}" for stage in ("fp32", "w8a8") for ext in (".pt", ".metrics.json")
    ]
    return [
        *_paths(Path(settings.out), settings.tag).values(),
        _table_path(settings, arch),
        *stages,
    ]


def _base_folder(settings: SearchSettings) -> Path:
    return Path(settings.out) / f"base-{settings.model}-{settings.dataset}"


def _table_path(settings: SearchSettings, arch: CimArch) -> Path:
    tag = f"{settings.model}-{arch_tag(arch)}-{settings.objective}"
    return Path(settings.out) / f"latency-{tag}.npz"


def _search(settings: SearchSettings, checked: _Checked, log) -> SearchResult:
    """``run_search`` once the settings are checked and the output directory is this
    process's."""
    import time

    import torch

    from tvm_cim.learn import qat

    began = time.perf_counter()
    out = Path(settings.out)
    arch, space, dataset = checked.arch, settings.space, checked.dataset
    paths = _paths(out, settings.tag)
    study = None
    if checked.study is not None:  # before training: a study that forbids this search
        storage, name = checked.study
        owner = f"{socket.gethostname()}:{paths['log'].resolve()}"
        study = open_study(
            storage,
            name,
            settings.seed,
            settings.episodes,
            settings.resume,
            owner,
            settings.agents.tpe,
        )
    model = checked.start if checked.start is not None else base_model(settings, dataset, log)
    example = torch.from_numpy(dataset.test[0][:1])
    table = latency_table(settings, model, example, arch, log)
    if table.names != qat.layer_names(model):
        raise CimError(
            f"the compiler's operators {table.names} are not the model's quantized layers "
            f"{qat.layer_names(model)}"
        )
    space.searched(len(table.operators))
    evaluation = QatAccuracy(model, dataset, settings.finetune_steps)
    with contextlib.ExitStack() as stack:
        pool = None
        if settings.workers is not None:
            pool = stack.enter_context(EvaluationPool.open(settings.workers, settings.cluster))
            pool.bind(evaluation)
        scorer = PolicyScorer(table, evaluation, checked.reward, pool)
        episode_log = _explore(settings, checked, scorer, table, paths, study, log)

    episodes = episode_log.episodes[: settings.episodes]
    if not episodes:
        raise CimError(
            f"the Optuna study {study.study.study_name!r} at {study.url} had no episode of its "
            f"budget of {settings.episodes} left for this search"
        )
    best = max(episodes, key=lambda o: o.reward)
    reference = episode_log.references["W8A8"]
    confirmation = confirm(
        best, reference, evaluation, table.names, settings.max_acc_drop, settings.final_epochs
    )
    verification = None
    if settings.verify:
        verification = verify(
            confirmation,
            {BEST: best, REFERENCE: reference},
            dataset,
            arch,
            example,
            export={BEST: paths["policy_onnx"]},
        )
    result = SearchResult(
        settings=settings,
        names=table.names,
        best=best,
        references=dict(episode_log.references),
        episodes=episodes,
        evaluations=scorer.evaluations,
        seconds=time.perf_counter() - began,
        reference_latency_us=scorer.reference_latency_us,
        confirmation=confirmation.figures,
        verification=verification,
        files=paths,
    )
    from .outputs import write_outputs

    write_outputs(result)
    return result


def _explore(settings, checked: _Checked, scorer, table, paths, study, log) -> EpisodeLog:
    """Score the uniform points, then run the strategy for the budget into the episode
    log (a resumed search replays the log first)."""
    env = CimQuantEnv(scorer, settings.space)
    header = dict(checked.header, operators=table.names, episodes=settings.episodes)
    episode_log = EpisodeLog(paths["log"], header, resume=settings.resume, warn=log)
    if settings.resume and episode_log.episodes:
        log(f"reusing {len(episode_log.episodes)} logged episodes from {paths['log']}")
    for outcome in [*episode_log.references.values(), *episode_log.episodes]:
        scorer.prime(outcome.policy, outcome.accuracy)
    uniform = {name: (bits,) * len(table.operators) for name, bits in UNIFORM.items()}
    scorer.prefetch(list(uniform.values()))
    for name, policy in uniform.items():
        episode_log.add_reference(name, scorer.score(policy))

    progress = _ProgressBar(settings, scorer) if settings.progress else None
    recorder = EpisodeRecorder(episode_log, progress)
    batch, agent = checked.in_flight, paths["agent"]
    with _one_thread():
        if settings.strategy == "random":
            run_random(env, recorder, settings.episodes, settings.seed, batch)
        elif settings.strategy == "dqn":
            config = settings.agents.dqn
            run_dqn(env, recorder, settings.episodes, settings.seed, config, agent, batch)
        elif settings.strategy == "ddpg":
            config = settings.agents.ddpg
            run_ddpg(env, recorder, settings.episodes, settings.seed, config, agent, batch)
        else:
            run_tpe(env, recorder, settings.episodes, study, batch)
    if progress is not None:
        progress.close()
    return episode_log


def _paths(out: Path, tag: str) -> dict[str, Path]:
    return {
        "log": out / f"{tag}.episodes.jsonl",
        "agent": out / f"{tag}.agent.zip",  # DQN and DDPG: the agent checkpoint
        "policy_yaml": out / f"{tag}.best.yaml",
        "policy_npy": out / f"{tag}.best.npy",
        "policy_onnx": out / f"{tag}.best.onnx",
        "bits_png": out / f"{tag}.bits.png",
        "pareto_png": out / "pareto.png",
        "summary_md": out / f"{tag}.summary.md",
        "summary_json": out / f"{tag}.summary.json",
    }


class _one_thread:
    """torch on one thread during the search: the networks and models are small, and on a
    shared CPU extra threads only wait on each other."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)


class _ProgressBar:
    """Per-episode callback: a tqdm bar showing the best reward and speedup so far."""

    def __init__(self, settings: SearchSettings, scorer: PolicyScorer):
        from tqdm.auto import tqdm

        self.scorer = scorer
        self.bar = tqdm(
            total=settings.episodes, desc=f"{settings.strategy} s{settings.seed}", unit="ep"
        )

    def __call__(self, index: int, outcome: Outcome, best: Outcome) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            best_reward=f"{best.reward:.2f}",
            speedup=f"{self.scorer.reference_latency_us / best.latency_us:.2f}x",
            acc=f"{best.accuracy:.2f}",
        )

    def close(self) -> None:
        self.bar.close()
