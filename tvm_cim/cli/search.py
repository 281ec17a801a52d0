"""``tvm-cim search``: per-operator precision search from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from tvm_cim.agent.latency import DEFAULT_OBJECTIVE, OBJECTIVES
from tvm_cim.cli.common import EXIT_OK, SEED, add_arch_argument
from tvm_cim.core.errors import CimError


def search_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tvm-cim search``."""
    p.add_argument("--model", required=True, help="trainable zoo model, e.g. digits-cnn")
    p.add_argument("--dataset", required=True, help="digits, mnist1d or synthetic")
    add_arch_argument(p, "study")
    p.add_argument(
        "--objective",
        choices=list(OBJECTIVES),
        default=DEFAULT_OBJECTIVE,
        help="latency to minimize: makespan (default; the schedule tvm-cim report prints on "
        "the arch) or sequential (the sum of every instruction's latency)",
    )
    p.add_argument("--strategy", default="dqn", help="dqn (default), ddpg, tpe or random")
    p.add_argument("--episodes", type=int, default=150, help="policies to play (default 150)")
    p.add_argument(
        "--max-acc-drop",
        type=float,
        default=0.1,
        metavar="PTS",
        help="accuracy points a policy may lose against W8A8 (default 0.1)",
    )
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="accuracy measurements in flight, on a local Dask cluster of N worker processes "
        "(default: one at a time in this process)",
    )
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="measure on the running Dask scheduler at ADDRESS (tcp://host:8786), keeping "
        "--workers of its workers busy",
    )
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage for tpe (default sqlite:///DIR/optuna.db); searches given one "
        "postgresql:// URL share the study and its --episodes budget",
    )
    p.add_argument("--resume", action="store_true", help="continue the search logged in DIR")
    p.add_argument("--min-bits", type=int, default=2, help="smallest width (default 2)")
    p.add_argument("--max-bits", type=int, default=8, help="largest width (default 8)")
    p.add_argument(
        "--cell-multiple",
        action="store_true",
        help="weight widths only in whole cells (multiples of the arch's cell bits)",
    )
    p.add_argument(
        "--pin-first-last", action="store_true", help="keep the first and last operators W8A8"
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=20,
        help="training batches when evaluating a policy (default 20)",
    )
    p.add_argument(
        "--final-epochs",
        type=int,
        default=5,
        help="QAT epochs finetuning the best policy before the last simulation (default 5)",
    )
    p.add_argument("--from", dest="start", metavar="CKPT", help="base model checkpoint")
    p.add_argument(
        "--no-verify", action="store_true", help="skip compiling and simulating the best policy"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


#: The options that are ``SearchSettings`` fields of the same name, passed as given.
_SETTINGS_AS_GIVEN = (
    "model",
    "dataset",
    "arch",
    "objective",
    "strategy",
    "episodes",
    "max_acc_drop",
    "seed",
    "workers",
    "cluster",
    "storage",
    "resume",
    "finetune_steps",
    "final_epochs",
)


def search(args: argparse.Namespace) -> int:
    """``tvm-cim search``: run the search, print its summary and the files it wrote."""
    from tvm_cim.agent.search import SearchSettings, run_search
    from tvm_cim.agent.space import SearchSpace

    if args.episodes < 1:
        raise CimError(f"--episodes must be at least 1, got {args.episodes}")
    if args.final_epochs < 0:
        raise CimError(f"--final-epochs must be >= 0, got {args.final_epochs}")
    space = SearchSpace(
        min_w_bits=max(args.min_bits, 2),
        max_w_bits=args.max_bits,
        min_a_bits=args.min_bits,
        max_a_bits=args.max_bits,
        weight_multiple_of_cell=args.cell_multiple,
        pin_first_last=args.pin_first_last,
    )
    settings = SearchSettings(
        **{name: getattr(args, name) for name in _SETTINGS_AS_GIVEN},
        out=Path(args.out),
        space=space,
        verify=not args.no_verify,
        progress=not args.no_progress,
        base_checkpoint=Path(args.start) if args.start else None,
    )
    result = run_search(settings)
    print(result.files["summary_md"].read_text())
    for key in ("policy_yaml", "policy_npy", "policy_onnx", "log", "pareto_png", "bits_png"):
        if result.files[key].is_file():
            print(f"wrote {result.files[key]}")
    return EXIT_OK
