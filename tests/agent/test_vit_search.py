"""Every search strategy on the zoo's small ViT, whose attention matmuls are layers of the
policy like its linear layers; the found policy compiled and simulated as searched."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tvm")

from tvm_cim.agent.search import SearchSettings, run_search  # noqa: E402
from tvm_cim.agent.strategies import STRATEGIES  # noqa: E402
from tvm_cim.learn import zoo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]


@pytest.fixture(scope="module")
def vit_base(tmp_path_factory):
    """A W8A8 digits-vit, briefly trained (searches only need its layers)."""
    from tvm_cim.learn import train

    path = tmp_path_factory.mktemp("base") / "w8a8.pt"
    model = None
    for stage, epochs in (("fp32", 4), ("w8a8", 1)):
        config = train.TrainConfig(epochs=epochs, lr=3e-3, batch_size=64, seed=0)
        model, result = train.run_stage(stage, "digits-vit", "digits", config, start=model)
    train.save_checkpoint(model, result, path)
    return path


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_searches_the_vit(vit_base, tmp_path, strategy):
    verify = strategy == "dqn"
    settings = SearchSettings(
        model="digits-vit",
        dataset="digits",
        out=tmp_path,
        strategy=strategy,
        episodes=3,
        max_acc_drop=1.0,
        finetune_steps=2,
        verify=verify,
        final_epochs=0,
        progress=False,
        base_checkpoint=vit_base,
    )
    result = run_search(settings, log=lambda *_: None)
    layers = zoo.quantizable_layers(zoo.build("digits-vit"))
    assert result.names == layers and len(result.episodes) == 3
    assert sum(name.endswith((".qk", ".av")) for name in result.names) == 4
    assert result.best.reward == max(o.reward for o in result.episodes)
    if verify:  # the found policy, compiled for cim and simulated, as the search measured it
        v = result.verification["best"]
        assert abs(v["simulated_val_accuracy"] - v["searched_val_accuracy"]) <= 0.1
        assert abs(v["simulated_test_accuracy"] - v["pytorch_test_accuracy"]) <= 0.1
        assert v["compiled_latency_us"] == pytest.approx(v["searched_latency_us"], abs=1e-6)
