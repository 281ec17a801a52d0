"""Exported libraries are self-contained: a fresh process runs them after importing tvm_cim."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.compiler import models
from tests.compiler.conftest import run_vm
from tvm_cim import compile_for_cim

tvm = pytest.importorskip("tvm")

SCRIPT = """
import sys
import numpy as np
{imports}
from tvm import relax
lib = tvm.runtime.load_module(sys.argv[1])
vm = relax.VirtualMachine(lib, tvm.cpu())
x = np.load(sys.argv[2])
np.save(sys.argv[3], vm["main"](tvm.runtime.tensor(x)).numpy())
"""


@pytest.mark.parametrize("imports", ["import tvm_cim\nimport tvm", "import tvm\nimport tvm_cim"])
def test_exported_library_runs_in_fresh_process(rng, tmp_path, imports):
    mod = models.int_conv(rng, stride=2, padding=1)
    ex, _ = compile_for_cim(mod)
    lib = tmp_path / "model.so"
    ex.export_library(str(lib))
    x = rng.integers(-128, 128, (2, 3, 7, 7)).astype("int8")
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(imports=imports)))
    subprocess.run(
        [sys.executable, str(script), str(lib), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), run_vm(ex, x))


def test_import_tvm_cim_does_not_import_tvm():
    code = "import sys, tvm_cim, tvm_cim.sim; print('tvm' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
