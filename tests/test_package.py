"""The public face: cheap to import, everything else reachable by attribute on first use."""

import subprocess
import sys

import pytest

import tvm_cim


def test_import_is_cheap():
    code = (
        "import sys, tvm_cim; "
        "print(sorted(m for m in ('tvm', 'torch', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(tvm_cim._LAZY_MODULES))
def test_every_short_module_name_resolves(name):
    module = getattr(tvm_cim, name)
    assert module.__name__ == f"tvm_cim.{tvm_cim._LAZY_MODULES[name]}"
    assert name in dir(tvm_cim)


@pytest.mark.parametrize("name", sorted(tvm_cim._LAZY_ATTRIBUTES))
def test_every_public_name_resolves(name):
    assert callable(getattr(tvm_cim, name))
    assert name in tvm_cim.__all__


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        tvm_cim.nothing  # noqa: B018
