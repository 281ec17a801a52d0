"""Training stages, checkpoints and ``tvm-cim train``, on the fast synthetic dataset."""

import json

import pytest

torch = pytest.importorskip("torch")

from tvm_cim import CimError  # noqa: E402
from tvm_cim.cli.main import main  # noqa: E402
from tvm_cim.learn import train as training  # noqa: E402


def test_stages_chain_through_checkpoints(tmp_path):
    args = ["train", "--model", "digits-cnn", "--dataset", "synthetic", "--no-progress"]
    assert main([*args, "--epochs", "2", "--out", str(tmp_path)]) == 0
    fp32 = json.loads((tmp_path / "fp32.metrics.json").read_text())
    assert fp32["stage"] == "fp32" and len(fp32["history"]) == 2
    assert fp32["test_accuracy"] > 40  # 4 balanced classes: well above chance

    start = str(tmp_path / "fp32.pt")
    assert main([*args, "--epochs", "1", "--from", start, "--out", str(tmp_path)]) == 0
    w8a8 = json.loads((tmp_path / "w8a8.metrics.json").read_text())
    assert all(b == {"w_bits": 8, "a_bits": 8} for b in w8a8["precision"].values())
    assert (tmp_path / "w8a8.onnx").stat().st_size > 0

    policy = tmp_path / "bits.yaml"
    policy.write_text("default: {w_bits: 4, a_bits: 4}\n")
    start = str(tmp_path / "w8a8.pt")
    code = main(
        [
            *args,
            "--epochs",
            "1",
            "--from",
            start,
            "--precision",
            str(policy),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    mixed = json.loads((tmp_path / "mixed.metrics.json").read_text())
    assert all(b == {"w_bits": 4, "a_bits": 4} for b in mixed["precision"].values())
    model, blob = training.load_checkpoint(tmp_path / "mixed.pt", "digits-cnn")
    assert blob["stage"] == "mixed"
    assert (tmp_path / "fp32.onnx").stat().st_size > 0

    # the exported QDQ model compiles with no precision flag, at the trained widths
    report = tmp_path / "report.json"
    onnx = str(tmp_path / "mixed.onnx")
    assert main(["compile", onnx, "-o", str(tmp_path / "m.so"), "--report", str(report)]) == 0
    layers = json.loads(report.read_text())["layers"]
    assert {x["name"]: (x["w_bits"], x["a_bits"]) for x in layers} == {
        name: (4, 4) for name in mixed["precision"]
    }


def test_checkpoint_of_another_model(tmp_path, capsys):
    args = ["train", "--model", "digits-cnn", "--dataset", "synthetic", "--no-progress"]
    assert main([*args, "--epochs", "0", "--out", str(tmp_path)]) == 0
    with pytest.raises(CimError, match="holds a 'digits-cnn' model, not 'digits-mlp'"):
        training.load_checkpoint(tmp_path / "fp32.pt", "digits-mlp")
    status = main(
        [
            "train",
            "--model",
            "digits-mlp",
            "--dataset",
            "synthetic",
            "--from",
            str(tmp_path / "fp32.pt"),
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 2
    assert "not 'digits-mlp'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dataset", "nope"], "nope"),
        (["--dataset", "cifar10"], "download"),
        (["--stage", "mixed"], "needs a precision config"),
    ],
)
def test_bad_input(tmp_path, capsys, args, message):
    base = {"--model": "digits-cnn", "--dataset": "synthetic", "--epochs": "0"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = ["train", *[v for kv in base.items() for v in kv], "--out", str(tmp_path)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_evaluate_policy_leaves_the_model_alone():
    from tvm_cim.learn import data, zoo

    dataset = data.load("synthetic")
    model = zoo.build("digits-cnn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    acc = training.evaluate_policy(model, dataset, {"default": {"w_bits": 4, "a_bits": 4}})
    assert 0 <= acc <= 100
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keep_best_never_returns_a_model_worse_on_validation():
    from tvm_cim.learn import data, zoo

    dataset = data.load("synthetic")
    torch.manual_seed(0)
    model = zoo.build("digits-mlp")
    training.fit(model, dataset, training.TrainConfig(epochs=3, lr=3e-3))
    start = training.accuracy(model, dataset.val)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrecked = training.TrainConfig(epochs=2, lr=5.0)  # a step size that ruins the model

    plain = zoo.build("digits-mlp")
    plain.load_state_dict(before)
    training.fit(plain, dataset, wrecked)
    assert training.accuracy(plain, dataset.val) < start  # without keep_best it ends worse

    history = training.fit(model, dataset, wrecked, keep_best=True)
    assert [r["epoch"] for r in history] == [0, 1, 2]
    assert history[0]["val_accuracy"] == start
    kept = [r for r in history if r.get("kept")]
    assert len(kept) == 1 and kept[0]["val_accuracy"] == max(r["val_accuracy"] for r in history)
    assert training.accuracy(model, dataset.val) == kept[0]["val_accuracy"] >= start
    if kept[0]["epoch"] == 0:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
