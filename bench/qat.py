"""QAT cost: seconds per epoch with and without fake quantization, and the search's
"evaluate this policy" step, on digits-cnn and mnist1d-cnn (one run, same machine).

Targets: a QAT epoch costs at most 2x an FP32 epoch; evaluating a policy on digits-cnn
takes at most 5 s.
"""

from __future__ import annotations

import copy
import time

import torch

from tvm_cim.learn import data, qat, zoo
from tvm_cim.learn import train as training


def _epoch_seconds(model, dataset, config) -> float:
    start = time.perf_counter()
    training.fit(model, dataset, config)
    return (time.perf_counter() - start) / config.epochs


def main() -> None:
    torch.set_num_threads(1)
    config = training.TrainConfig(epochs=3, batch_size=64)
    print(f"{'model':<12} {'fp32 s/epoch':>12} {'qat s/epoch':>12} {'ratio':>6}  target <= 2")
    for name, dataset_name in (("digits-cnn", "digits"), ("mnist1d-cnn", "mnist1d")):
        dataset = data.load(dataset_name)
        torch.manual_seed(0)
        fp32 = zoo.build(name)
        quant = qat.prepare(copy.deepcopy(fp32))
        qat.calibrate(quant, training.calibration_batches(dataset, config))
        _epoch_seconds(copy.deepcopy(fp32), dataset, training.TrainConfig(epochs=1))  # warm-up
        t_fp32 = _epoch_seconds(fp32, dataset, config)
        t_qat = _epoch_seconds(quant, dataset, config)
        print(f"{name:<12} {t_fp32:>12.3f} {t_qat:>12.3f} {t_qat / t_fp32:>6.2f}")
    dataset = data.load("digits")
    model = zoo.build("digits-cnn")
    training.fit(model, dataset, training.TrainConfig(epochs=5))
    policy = {"default": {"w_bits": 4, "a_bits": 4}}
    for steps in (0, 20):
        start = time.perf_counter()
        acc = training.evaluate_policy(model, dataset, policy, finetune_steps=steps)
        seconds = time.perf_counter() - start
        print(
            f"evaluate a W4A4 policy on digits-cnn, {steps:>2} finetune steps: {seconds:.2f} s "
            f"(val {acc:.1f} %, target <= 5 s)"
        )


if __name__ == "__main__":
    main()
