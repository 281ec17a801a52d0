"""``make demo``'s flow with a tiny budget: the printed table is the report's."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("tvm")
pytest.importorskip("stable_baselines3")

from tvm_cim.workflows import demo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_demo_flow_prints_the_report_table(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--episodes", "4", "--finetune-steps", "2"]
    args += ["--final-epochs", "1", "--no-progress"]
    assert demo.main(args) == 0
    printed = _table_rows(capsys.readouterr().out)
    report = (tmp_path / "report.md").read_text()
    assert printed == _table_rows(report)
    assert [row[0] for row in printed] == ["W8A8", "found"]
    summary = json.loads((tmp_path / "dqn-s0.summary.json").read_text())
    found = printed[1]
    assert float(found[2]) == pytest.approx(summary["best"]["latency_us"], abs=0.05)
    assert found[3] == f"{summary['best']['speedup']:.3f}x"
    check = summary["verification"]["best"]
    assert float(found[5]) == pytest.approx(check["pytorch_test_accuracy"], abs=0.005)
    assert float(found[6]) == pytest.approx(check["simulated_test_accuracy"], abs=0.005)
    assert abs(check["simulated_test_accuracy"] - check["pytorch_test_accuracy"]) <= 0.1
    tuned = check["finetuned"]
    assert float(found[7]) == pytest.approx(tuned["pytorch_test_accuracy"], abs=0.005)
    assert float(found[8]) == pytest.approx(tuned["simulated_test_accuracy"], abs=0.005)
    confirmation = summary["confirmation"]
    for key in ("searched", "final"):
        line = f"Test split, {'as searched' if key == 'searched' else 'after the final finetune'}"
        assert f"{line}: {confirmation[key]['describe']}." in report
    assert "Figures that may vary on another machine" in report
    for image in ("pareto.png", "dqn-s0.bits.png"):
        assert f"({image})" in report and (tmp_path / image).is_file()

    # A second run reuses the models, the latency table and the episodes, and says so.
    assert demo.main(args) == 0
    out = capsys.readouterr().out
    assert "reusing the base model" in out and "reusing 4 logged episodes" in out
    assert _table_rows(out) == printed
