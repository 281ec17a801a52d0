"""Offline datasets: split sizes, shapes, determinism, disjointness, refusals and caching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tvm_cim.core.errors import CimError
from tvm_cim.learn import data


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1)}


def _check_splits(ds: data.Dataset, sizes: tuple[int, int, int]) -> None:
    for (x, y), n in zip((ds.train, ds.val, ds.test), sizes):
        assert x.shape == (n, *ds.input_shape)
        assert y.shape == (n,)
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.flags.c_contiguous
        assert np.isfinite(x).all()
        assert y.min() >= 0 and y.max() < ds.num_classes
        assert set(np.unique(y)) == set(range(ds.num_classes))


def _assert_same(a: data.Dataset, b: data.Dataset) -> None:
    for sa, sb in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        np.testing.assert_array_equal(sa[0], sb[0])
        np.testing.assert_array_equal(sa[1], sb[1])


@pytest.fixture
def sklearn():
    return pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A private cache folder holding the generated MNIST-1D arrays."""
    pytest.importorskip("sklearn")
    pytest.importorskip("mnist1d")
    path = tmp_path_factory.mktemp("cim-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TVM_CIM_CACHE", str(path))
        data.load("mnist1d")
    return path


@pytest.fixture
def use_cache(mnist1d_cache, monkeypatch) -> Path:
    monkeypatch.setenv("TVM_CIM_CACHE", str(mnist1d_cache))
    return mnist1d_cache


# ------------------------------------------------------------------------- digits


def test_digits_splits(sklearn):
    ds = data.load("digits")
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    _check_splits(ds, (1257, 180, 360))
    x = np.concatenate([ds.train[0], ds.val[0], ds.test[0]])
    assert x.min() == 0.0 and x.max() == 1.0


def test_digits_splits_partition_the_dataset(sklearn):
    from sklearn.datasets import load_digits

    ds = data.load("digits", seed=3)
    train, val, test = (_rows(s[0]) for s in (ds.train, ds.val, ds.test))
    assert not train & val and not train & test and not val & test
    full = load_digits()
    assert train | val | test == _rows((full.images / 16.0).astype(np.float32))


def test_digits_split_is_stratified(sklearn):
    ds = data.load("digits")
    full = np.bincount(np.concatenate([ds.train[1], ds.val[1], ds.test[1]])) / 1797
    for _, y in (ds.train, ds.val, ds.test):
        share = np.bincount(y, minlength=10) / len(y)
        assert np.abs(share - full).max() < 0.02


def test_digits_deterministic_per_seed(sklearn):
    _assert_same(data.load("digits", seed=1), data.load("digits", seed=1))
    a, b = data.load("digits", seed=1), data.load("digits", seed=2)
    assert not np.array_equal(a.test[1], b.test[1])


# ------------------------------------------------------------------------ mnist1d


def test_mnist1d_splits(use_cache):
    ds = data.load("mnist1d")
    assert ds.name == "mnist1d" and ds.num_classes == 10 and ds.input_shape == (1, 1, 40)
    _check_splits(ds, (3500, 500, 1000))
    assert abs(float(ds.train[0].mean())) < 1e-4
    assert float(ds.train[0].std()) == pytest.approx(1.0, abs=1e-4)
    assert np.bincount(ds.val[1]).min() >= 45
    train, val, test = (_rows(s[0]) for s in (ds.train, ds.val, ds.test))
    assert not train & val and not train & test and not val & test


def test_mnist1d_seed_moves_only_the_validation_split(use_cache):
    a, b = data.load("mnist1d", seed=0), data.load("mnist1d", seed=1)
    _assert_same(a, data.load("mnist1d", seed=0))
    assert not np.array_equal(a.val[1], b.val[1])
    labels = [np.sort(np.concatenate([d.train[1], d.val[1]])) for d in (a, b)]
    np.testing.assert_array_equal(*labels)
    np.testing.assert_array_equal(a.test[1], b.test[1])
    # The same test signals, standardised with slightly different training statistics.
    za, zb = ((d.test[0] - d.test[0].mean()) / d.test[0].std() for d in (a, b))
    np.testing.assert_allclose(za, zb, atol=1e-4)


def test_mnist1d_args_are_the_package_defaults():
    pytest.importorskip("mnist1d")
    from mnist1d.data import get_dataset_args

    defaults = get_dataset_args(as_dict=True)
    defaults.pop("url")
    assert defaults == data.MNIST1D_ARGS


def test_mnist1d_cache_is_reused(use_cache, monkeypatch):
    files = list(use_cache.glob("mnist1d-*.npz"))
    assert len(files) == 1

    def fail(args):
        raise AssertionError("regenerated despite the cache")

    monkeypatch.setattr(data, "_generate_mnist1d", fail)
    assert len(data.load("mnist1d").test[1]) == 1000


def _stand_in_generator(calls: list):
    """A fast replacement of the MNIST-1D generator: random signals, balanced labels."""
    rng = np.random.default_rng(0)

    def fake(args):
        calls.append(args)
        n = args["num_samples"]
        split = int(n * args["train_split"])
        y = np.arange(n) % 10
        x = rng.standard_normal((n, args["final_seq_length"]))
        return {"x": x[:split], "y": y[:split], "x_test": x[split:], "y_test": y[split:]}

    return fake


def test_mnist1d_cache_key_and_corrupt_file(sklearn, tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_CIM_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(data, "_generate_mnist1d", _stand_in_generator(calls))
    path = tmp_path / f"mnist1d-{data._mnist1d_key(data.MNIST1D_ARGS)}.npz"
    path.write_bytes(b"not an npz file")
    ds = data.load("mnist1d")
    assert len(calls) == 1 and len(ds.train[1]) == 3500
    with np.load(path) as f:
        assert f["x"].shape == (4000, 40)
    data.load("mnist1d")
    assert len(calls) == 1
    other = dict(data.MNIST1D_ARGS, seed=7)
    assert data._mnist1d_key(other) != data._mnist1d_key(data.MNIST1D_ARGS)


def test_mnist1d_generation_leaves_global_rng_alone(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    import random

    monkeypatch.setenv("TVM_CIM_CACHE", str(tmp_path))
    args = dict(data.MNIST1D_ARGS, num_samples=50)
    np.random.seed(123)
    random.seed(123)
    expected = (np.random.random(), random.random())
    np.random.seed(123)
    random.seed(123)
    data._generate_mnist1d(args)
    assert (np.random.random(), random.random()) == expected


# -------------------------------------------------------------------- mnist1d-80k


def test_mnist1d_80k_args_differ_only_in_size():
    args = data.MNIST1D_80K_ARGS
    assert {k for k in args if args[k] != data.MNIST1D_ARGS[k]} == {"num_samples", "train_split"}
    generated_train = int(args["num_samples"] * args["train_split"])
    assert generated_train == 70_000
    assert (generated_train - data.MNIST1D_80K_VAL, args["num_samples"] - generated_train) == (
        60_000,
        10_000,
    )


def test_mnist1d_80k_splits_and_cache(sklearn, tmp_path, monkeypatch):
    """The full-size splits, with a stand-in generator so that no 80,000 signals are made."""
    monkeypatch.setenv("TVM_CIM_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(data, "_generate_mnist1d", _stand_in_generator(calls))
    ds = data.load("mnist1d-80k", seed=0)
    assert calls == [data.MNIST1D_80K_ARGS]
    assert ds.name == "mnist1d-80k" and ds.num_classes == 10 and ds.input_shape == (1, 1, 40)
    _check_splits(ds, (60_000, 10_000, 10_000))
    assert np.bincount(ds.val[1]).tolist() == [1000] * 10
    assert abs(float(ds.train[0].mean())) < 1e-4
    assert float(ds.train[0].std()) == pytest.approx(1.0, abs=1e-4)
    train, val, test = (_rows(s[0]) for s in (ds.train, ds.val, ds.test))
    assert not train & val and not train & test and not val & test
    key = data._mnist1d_key(data.MNIST1D_80K_ARGS)
    assert [p.name for p in tmp_path.glob("mnist1d-*.npz")] == [f"mnist1d-{key}.npz"]
    assert key != data._mnist1d_key(data.MNIST1D_ARGS)
    again, other = data.load("mnist1d-80k", seed=0), data.load("mnist1d-80k", seed=1)
    assert len(calls) == 1
    _assert_same(ds, again)
    assert not np.array_equal(ds.val[1], other.val[1])
    np.testing.assert_array_equal(ds.test[1], other.test[1])


def test_mnist1d_at_scale_with_the_real_generator(sklearn, tmp_path, monkeypatch):
    """The scaled-up arguments, shrunk to 800 samples, through the real generator."""
    pytest.importorskip("mnist1d")
    args = dict(data.MNIST1D_80K_ARGS, num_samples=800)

    def build(cache: Path) -> data.Dataset:
        monkeypatch.setenv("TVM_CIM_CACHE", str(cache))
        return data._mnist1d(3, name="mnist1d-800", args=args, val=100)

    ds = build(tmp_path / "a")
    assert ds.name == "mnist1d-800" and ds.input_shape == (1, 1, 40)
    _check_splits(ds, (600, 100, 100))
    assert np.bincount(ds.val[1], minlength=10).min() >= 9
    assert np.bincount(np.concatenate([ds.train[1], ds.val[1], ds.test[1]])).tolist() == [80] * 10
    assert float(ds.train[0].std()) == pytest.approx(1.0, abs=1e-4)
    assert len(list((tmp_path / "a").glob("mnist1d-*.npz"))) == 1
    # Generated afresh elsewhere and read back from the cache: the same arrays.
    _assert_same(ds, build(tmp_path / "b"))
    _assert_same(ds, build(tmp_path / "a"))


# ---------------------------------------------------------------------- synthetic


def test_synthetic_splits_and_determinism():
    ds = data.load("synthetic", seed=5)
    assert ds.num_classes == 4 and ds.input_shape == (1, 8, 8)
    _check_splits(ds, (1400, 200, 400))
    for _, y in (ds.train, ds.val, ds.test):
        assert np.bincount(y).min() == np.bincount(y).max()
    _assert_same(ds, data.load("synthetic", seed=5))
    assert not np.array_equal(ds.train[0], data.load("synthetic", seed=6).train[0])
    train, val, test = (_rows(s[0]) for s in (ds.train, ds.val, ds.test))
    assert not train & val and not train & test and not val & test


def test_synthetic_is_learnable():
    ds = data.load("synthetic")
    x, y = ds.train[0].reshape(len(ds.train[0]), -1), ds.train[1]
    centroids = np.stack([x[y == c].mean(0) for c in range(ds.num_classes)])
    xt = ds.test[0].reshape(len(ds.test[0]), -1)
    pred = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.test[1]).mean() > 0.9


# ------------------------------------------------------------------- names, errors


def test_names():
    assert data.names() == ["digits", "mnist1d", "mnist1d-80k", "synthetic"]
    assert data.load(" Synthetic ").name == "synthetic"


def test_unknown_name_lists_known_datasets():
    with pytest.raises(
        CimError, match="unknown dataset 'nope'.*digits, mnist1d, mnist1d-80k, synthetic"
    ):
        data.load("nope")


@pytest.mark.parametrize("name", ["mnist", "MNIST", "cifar10", "CIFAR-10", "cifar_100", "imagenet"])
def test_download_only_datasets_are_refused(name):
    with pytest.raises(CimError, match="does not download data at run time") as info:
        data.load(name)
    assert "digits" in str(info.value)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed(seed):
    with pytest.raises(CimError, match="seed"):
        data.load("synthetic", seed=seed)


def test_bad_split_name():
    with pytest.raises(CimError, match="unknown split"):
        data.load("synthetic").split("dev")
    assert data.load("synthetic").split("val")[0].shape == (200, 1, 8, 8)


# ------------------------------------------------------------------------- torch


def test_loaders():
    torch = pytest.importorskip("torch")
    ds = data.load("synthetic")
    train, val, test = ds.loaders(64, seed=1)
    x, y = next(iter(train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(b[1]) for b in val) == 200 and sum(len(b[1]) for b in test) == 400
    first = [b[1] for b in ds.loaders(64, seed=1)[0]]
    again = [b[1] for b in ds.loaders(64, seed=1)[0]]
    other = [b[1] for b in ds.loaders(64, seed=2)[0]]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    np.testing.assert_array_equal(next(iter(test))[1].numpy(), ds.test[1][:64])
    with pytest.raises(CimError):
        ds.loaders(0)


def test_importing_tvm_cim_stays_cheap():
    code = (
        "import sys, tvm_cim, tvm_cim.learn.data\n"
        "heavy = [m for m in ('torch', 'sklearn', 'mnist1d', 'tvm_cim.learn.zoo')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_data_loads_through_the_package_without_tvm_or_torch():
    pytest.importorskip("sklearn")
    code = (
        "import sys, tvm_cim\n"
        "ds = tvm_cim.data.load('digits')\n"
        "assert ds.input_shape == (1, 8, 8), ds.input_shape\n"
        "heavy = [m for m in ('tvm', 'torch', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
