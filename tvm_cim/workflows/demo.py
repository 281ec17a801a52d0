"""``make demo``: the whole flow on embedded defaults, on the CPU.

Trains ``digits-cnn`` (FP32, then W8A8 QAT), runs a DQN precision search on the
``rram-4b`` crossbars, recalibrates and finetunes the best policy exactly as the search
measured it, compiles it and the W8A8 model with the ``cim`` target, runs the digits
test set on the simulator, finetunes both for a few more QAT epochs and simulates them
again, and prints W8A8 against the found policy: latency, speedup and accuracy (PyTorch
and simulated), the test-split drop with its 95 % interval, and which figures may vary
on another machine. A Markdown report with the plots goes to ``runs/demo/report.md``. A second run reuses the trained models, the latency table and
the logged episodes, and says so.

    python -m tvm_cim.workflows.demo [--out runs/demo] [--episodes 150] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvm_cim.core.errors import CimError
from tvm_cim.core.files import write_text


def result_rows(result) -> list[dict]:
    """The demo table: W8A8 and the found policy, with their verified figures."""
    rows = []
    for label, outcome in (("W8A8", result.references["W8A8"]), ("found", result.best)):
        check = result.verification["best" if label == "found" else "W8A8"]
        rows.append(
            {
                "policy": label,
                "bits": " ".join(f"{b.w_bits}/{b.a_bits}" for b in outcome.policy),
                "latency_us": outcome.latency_us,
                "speedup": result.reference_latency_us / outcome.latency_us,
                "val_accuracy": outcome.accuracy,
                "test_accuracy_pytorch": check["pytorch_test_accuracy"],
                "test_accuracy_simulated": check["simulated_test_accuracy"],
                "finetuned_test_accuracy_pytorch": check["finetuned"]["pytorch_test_accuracy"],
                "finetuned_test_accuracy_simulated": check["finetuned"]["simulated_test_accuracy"],
                "simulated_latency_us": check["compiled_latency_us"],
            }
        )
    return rows


COLUMNS = (
    ("policy", "policy", "{}"),
    ("bits (w/a per layer)", "bits", "{}"),
    ("latency us", "latency_us", "{:.1f}"),
    ("speedup", "speedup", "{:.3f}x"),
    ("val acc %", "val_accuracy", "{:.2f}"),
    ("test acc % (PyTorch)", "test_accuracy_pytorch", "{:.2f}"),
    ("test acc % (simulated)", "test_accuracy_simulated", "{:.2f}"),
    ("finetuned test acc % (PyTorch)", "finetuned_test_accuracy_pytorch", "{:.2f}"),
    ("finetuned test acc % (simulated)", "finetuned_test_accuracy_simulated", "{:.2f}"),
)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |"]
    lines.append("| " + " | ".join("---" for _ in COLUMNS) + " |")
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


#: What differs from machine to machine: torch's CPU kernels may round differently, and
#: a search follows its accuracies, so one machine's run does not reproduce another's.
MAY_VARY = (
    "Figures that may vary on another machine (torch's CPU numerics differ): the found "
    "policy, its speedup and every accuracy. Those that do not: the latency of a given "
    "policy, and the simulator's agreement with PyTorch on the same model. The README "
    "shows their spread over seeds."
)


def confidence_lines(result) -> list[str]:
    """The selection split's resolution and the test-split comparisons, one line each."""
    from tvm_cim.learn.confidence import accuracy_resolution

    confirmation = result.confirmation
    n_val = confirmation["val_samples"]
    resolution = accuracy_resolution(n_val, result.references["W8A8"].accuracy)
    lines = [f"Selection (validation) split: {resolution.describe()}."]
    lines.append(f"Test split, as searched: {confirmation['searched']['describe']}.")
    if "final" in confirmation:
        lines.append(f"Test split, after the final finetune: {confirmation['final']['describe']}.")
    return lines


def write_report(result, rows: list[dict], path: Path) -> Path:
    files = result.files
    s = result.settings
    text = [
        "# tvm-cim demo: digits-cnn on rram-4b",
        "",
        f"DQN search, {len(result.episodes)} episodes (seed {s.seed}), accuracy drop allowed "
        f"{s.max_acc_drop} points, selected on the validation split and confirmed on the "
        "test split, which the search never saw. Latency from the static cost "
        "model; accuracies of the compiled models from the simulator: first of the model "
        f"the search measured, then after {s.final_epochs} more QAT epochs at the same "
        "widths.",
        "",
        markdown_table(rows),
        "",
        *confidence_lines(result),
        "",
        MAY_VARY,
        "",
        f"![Pareto front]({files['pareto_png'].name})",
        "",
        f"![Bit widths of the found policy]({files['bits_png'].name})",
        "",
        f"Policy: `{files['policy_yaml'].name}` (CIM-AQ format: `{files['policy_npy'].name}`); "
        f"every episode: `{files['log'].name}`; search summary: `{files['summary_md'].name}`.",
        "",
    ]
    write_text(path, "\n".join(text))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.add_argument("--episodes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-steps", type=int, default=20)
    parser.add_argument("--final-epochs", type=int, default=5)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tvm_cim.agent.search import SearchSettings, run_search

    settings = SearchSettings(
        model="digits-cnn",
        dataset="digits",
        out=args.out,
        strategy="dqn",
        episodes=args.episodes,
        seed=args.seed,
        resume=True,  # a second run replays the logged episodes instead of measuring again
        finetune_steps=args.finetune_steps,
        final_epochs=args.final_epochs,
        verify=True,
        progress=not args.no_progress,
    )
    try:
        result = run_search(settings)
    except CimError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    rows = result_rows(result)
    report = write_report(result, rows, args.out / "report.md")
    print()
    print(markdown_table(rows))
    print()
    for line in [*confidence_lines(result), MAY_VARY]:
        print(line)
    print()
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
