"""Fixtures the search tests share."""

import pytest


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A W8A8 digits-mlp for the TPE, DQN and DDPG searches: one epoch per stage is
    enough for searches that only need to be repeatable."""
    from tvm_cim.learn import train

    path = tmp_path_factory.mktemp("base") / "w8a8.pt"
    model = None
    for stage in ("fp32", "w8a8"):
        config = train.TrainConfig(epochs=1, lr=3e-3, batch_size=32, seed=0)
        model, result = train.run_stage(stage, "digits-mlp", "synthetic", config, start=model)
    train.save_checkpoint(model, result, path)
    return path
