"""Precision configs in every accepted form, and their errors."""

import json

import numpy as np
import pytest

from tvm_cim import CimError
from tvm_cim.core.precision import Bits, Precision

NAMES = ["conv1", "layer1.0.conv1", "fc"]


def test_yaml_with_default(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("default: {w_bits: 6, a_bits: 5}\nfc: {w_bits: 8, a_bits: 8}\n")
    bits = Precision.load(path).resolve(NAMES)
    assert bits == {"conv1": Bits(6, 5), "layer1.0.conv1": Bits(6, 5), "fc": Bits(8, 8)}


def test_json_without_default_leaves_others_unspecified(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"conv1": {"w_bits": 2, "a_bits": 3}}))
    assert Precision.load(path).resolve(NAMES) == {
        "conv1": Bits(2, 3),
        "layer1.0.conv1": None,
        "fc": None,
    }


def test_list_and_cim_aq_npy_policy(tmp_path):
    policy = np.array([[8, 8], [4, 2], [8, 8]])
    np.save(tmp_path / "policy.npy", policy)
    for spec in (tmp_path / "policy.npy", policy, policy.tolist()):
        assert list(Precision.load(spec).resolve(NAMES).values()) == [
            Bits(8, 8),
            Bits(4, 2),
            Bits(8, 8),
        ]


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"conv2": {"w_bits": 4, "a_bits": 4}}, "'conv2' is not an offloaded operator"),
        ({"fc": {"w_bits": 0, "a_bits": 4}}, "operator 'fc'.w_bits: bits must be in 1..8"),
        ({"fc": {"w_bits": 4, "a_bits": 9}}, "operator 'fc'.a_bits: bits must be in 1..8"),
        ({"fc": {"w_bits": 4}}, "expected keys w_bits and a_bits"),
        ([[8, 8]], "1 entries for 3 offloaded operators"),
        (np.ones((3, 3), int), r"\[L, 2\] integer array"),
    ],
)
def test_errors_name_the_operator(spec, message):
    with pytest.raises(CimError, match=message):
        Precision.load(spec).resolve(NAMES)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(CimError, match="does not exist"):
        Precision.load(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(CimError, match="cannot parse"):
        Precision.load(bad)
