import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax  # noqa: E402

import tvm_cim  # noqa: E402  (registers the cim target)


def run_vm(ex, *args):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.asarray(a)) for a in args])
    if isinstance(out, (list, tuple)) or hasattr(out, "__len__") and not hasattr(out, "numpy"):
        return [o.numpy() for o in out]
    return out.numpy()


def build_llvm(mod):
    return tvm.compile(mod, target="llvm")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


__all__ = ["run_vm", "build_llvm", "tvm_cim"]
