"""The files a search leaves: best policy (YAML and CIM-AQ ``.npy``), bit-width chart,
Pareto plot of every search in the directory, and a summary (Markdown and JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from tvm_cim.core.files import atomic_path, write_text

from .log import EpisodeLog
from .scoring import Outcome


def write_policy(names, policy, yaml_path: Path, npy_path: Path) -> None:
    """``{name: {w_bits, a_bits}}`` YAML, and CIM-AQ's ``[L, 2]`` int array in offload
    order; both are accepted wherever a precision config is."""
    mapping = {n: {"w_bits": b.w_bits, "a_bits": b.a_bits} for n, b in zip(names, policy)}
    write_text(yaml_path, yaml.safe_dump(mapping, sort_keys=False))
    with atomic_path(npy_path) as tmp:
        np.save(tmp, np.array([[b.w_bits, b.a_bits] for b in policy], dtype=np.int64))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bits_chart(names, policy, path: Path, title: str) -> None:
    """Grouped bars: weight and activation bits per operator."""
    plt = _pyplot()
    x = np.arange(len(names))
    rotated = len(names) > 6
    # rotated labels take height by their length (ViT paths run to 50 characters)
    height = 2.6 + 0.06 * max(map(len, names), default=0) if rotated else 3.2
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(names) + 2), max(3.2, height)))
    ax.bar(x - 0.2, [b.w_bits for b in policy], 0.4, label="weight bits")
    ax.bar(x + 0.2, [b.a_bits for b in policy], 0.4, label="activation bits")
    ax.set_xticks(x, names, rotation=45 if rotated else 0, ha="right")
    ax.set_yticks(range(0, 9))
    ax.set_ylabel("bits")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front (lower latency, higher accuracy), by increasing latency."""
    front, best = [], -np.inf
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((latency, accuracy))
            best = accuracy
    return front


def pareto_plot(out: Path, path: Path) -> None:
    """Latency against validation accuracy of every episode of every search in ``out``,
    with each strategy's Pareto front and the uniform points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_strategy: dict[str, list[tuple[float, float]]] = {}
    references: dict[str, Outcome] = {}
    for log_path in sorted(out.glob("*.episodes.jsonl")):
        records = EpisodeLog.read_records(log_path)
        strategy = records[0]["strategy"]
        for r in records[1:]:
            if r["type"] == "episode":
                by_strategy.setdefault(strategy, []).append((r["latency_us"], r["accuracy"]))
            elif r["type"] == "reference":
                references[r["name"]] = r
    for i, (strategy, points) in enumerate(sorted(by_strategy.items())):
        color = f"C{i}"
        lat, acc = zip(*points)
        ax.scatter(lat, acc, s=8, alpha=0.35, color=color)
        front = _front(points)
        ax.step(*zip(*front), where="post", color=color, label=f"{strategy} front")
    for name, r in references.items():
        ax.scatter([r["latency_us"]], [r["accuracy"]], marker="x", color="black", zorder=3)
        ax.annotate(name, (r["latency_us"], r["accuracy"]), fontsize="small")
    ax.set_xlabel("latency (us, static cost model)")
    ax.set_ylabel("validation accuracy (%)")
    if by_strategy:
        accuracies = [a for pts in by_strategy.values() for _, a in pts]
        top = max(accuracies + [r["accuracy"] for r in references.values()])
        ax.set_ylim(max(min(accuracies), top - 30), top + 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(result) -> dict:
    """The search's figures as a JSON-ready dict."""
    s = result.settings
    reference = result.reference_latency_us

    def row(outcome: Outcome) -> dict:
        return {
            **outcome.to_dict(),
            "speedup": reference / outcome.latency_us,
            "accuracy_drop": result.references["W8A8"].accuracy - outcome.accuracy,
        }

    return {
        "model": s.model,
        "dataset": s.dataset,
        "strategy": s.strategy,
        "seed": s.seed,
        "episodes": len(result.episodes),
        "evaluations": result.evaluations,
        "seconds": result.seconds,
        "max_acc_drop": s.max_acc_drop,
        "operators": result.names,
        "w8a8_latency_us": reference,
        "best": row(result.best),
        "uniform": {name: row(o) for name, o in result.references.items()},
        "confirmation": result.confirmation,
        "verification": result.verification,
    }


def summary_markdown(data: dict) -> str:
    lines = [
        f"# Precision search: {data['model']} on {data['dataset']}, {data['strategy']} "
        f"(seed {data['seed']})",
        "",
        f"{data['episodes']} episodes, {data['evaluations']} accuracy evaluations, "
        f"{data['seconds']:.1f} s; allowed accuracy drop {data['max_acc_drop']} points.",
        "",
        "| policy | bits (w/a per operator) | latency us | speedup | val acc % | reward |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    rows = [*data["uniform"].items(), ("best found", data["best"])]
    for name, r in rows:
        bits = " ".join(f"{w}/{a}" for w, a in r["policy"])
        lines.append(
            f"| {name} | {bits} | {r['latency_us']:.1f} | {r['speedup']:.3f}x | "
            f"{r['accuracy']:.2f} | {r['reward']:.2f} |"
        )
    if data["verification"]:
        lines += [
            "",
            "Compiled for `cim` and run on the simulator (the model the search measured):",
            "",
            "| policy | searched val % | simulated val % | PyTorch test % | simulated test % | "
            "argmax agreement (test) | searched latency us | compiled latency us |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, v in data["verification"].items():
            lines.append(
                f"| {name} | {v['searched_val_accuracy']:.2f} | "
                f"{v['simulated_val_accuracy']:.2f} | {v['pytorch_test_accuracy']:.2f} | "
                f"{v['simulated_test_accuracy']:.2f} | {100 * v['test_argmax_agreement']:.2f} % | "
                f"{v['searched_latency_us']:.1f} | {v['compiled_latency_us']:.1f} |"
            )
        tuned = {
            name: v["finetuned"] for name, v in data["verification"].items() if "finetuned" in v
        }
        if tuned:
            epochs = data["confirmation"]["final"]["epochs"]
            lines += [
                "",
                f"After {epochs} more QAT epochs at the same widths (the best policy's model is "
                "written as `.best.onnx`):",
                "",
                "| policy | PyTorch test % | simulated test % | argmax agreement (test) |",
                "| --- | ---: | ---: | ---: |",
            ]
            for name, v in tuned.items():
                lines.append(
                    f"| {name} | {v['pytorch_test_accuracy']:.2f} | "
                    f"{v['simulated_test_accuracy']:.2f} | {100 * v['test_argmax_agreement']:.2f} % |"
                )
    lines += confirmation_markdown(data["confirmation"])
    lines += ["", "![Pareto](pareto.png)", ""]
    return "\n".join(lines)


def confirmation_rows(confirmation: dict) -> list[tuple[str, dict]]:
    """``(label, comparison)`` for the searched models and, if any, the finetuned ones."""
    rows = [("as searched", confirmation["searched"])]
    if "final" in confirmation:
        final = confirmation["final"]
        kept = ", ".join(f"{k} {v}" for k, v in final["kept_epoch"].items())
        rows.append((f"after {final['epochs']} QAT epochs (kept epoch: {kept})", final))
    return rows


def confirmation_markdown(confirmation: dict) -> list[str]:
    """The test-split confirmation as Markdown lines."""
    searched = confirmation["searched"]
    level = f"{100 * searched['confidence']:g} %"
    lines = [
        "",
        f"Confirmed on the test split ({searched['n']} samples the search never saw): the best "
        "policy against W8A8 on the same samples. The drop holds when the interval's upper "
        f"end is at most the allowed {searched['max_drop']:g} points.",
        "",
        f"| models | W8A8 test % | best test % | drop (points) | {level} CI | McNemar p | "
        "verdict |",
        "| --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for label, c in confirmation_rows(confirmation):
        lines.append(
            f"| {label} | {c['reference_accuracy']:.2f} | {c['candidate_accuracy']:.2f} | "
            f"{c['drop']:+.2f} | {c['low']:+.2f} .. {c['high']:+.2f} | {c['p_value']:.3g} | "
            f"{c['verdict']} |"
        )
    return lines


def write_outputs(result) -> None:
    files = result.files
    write_policy(result.names, result.best.policy, files["policy_yaml"], files["policy_npy"])
    title = f"{result.settings.model}: best of {result.settings.tag}"
    bits_chart(result.names, result.best.policy, files["bits_png"], title)
    pareto_plot(files["log"].parent, files["pareto_png"])
    data = summary(result)
    write_text(files["summary_json"], json.dumps(data, indent=2))
    write_text(files["summary_md"], summary_markdown(data))
