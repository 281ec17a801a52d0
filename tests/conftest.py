"""Shared fixtures and helpers for the tvm-cim tests.

The ``backend`` fixture runs a test once per simulator backend. The compiled core is
skipped while it is only a placeholder (no ``run``); once it lands every test that
asks for ``backend`` runs against both implementations.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from tvm_cim.core.arch import CimArch
from tvm_cim.core.quant import quant_range
from tvm_cim.sim import Simulator, available_backends
from tvm_cim.sim import simulator as _simulator

settings.register_profile(
    "tvm-cim",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("tvm-cim")


def cython_core_ready() -> bool:
    """Whether the compiled core is built and implements ``run``."""
    return _simulator._core is not None and callable(getattr(_simulator._core, "run", None))


def backend_params() -> list:
    """``pytest.param`` per available backend, skipping an unfinished compiled core."""
    params = []
    for name in available_backends():
        marks = ()
        if name == "cython" and not cython_core_ready():
            marks = pytest.mark.skip(
                reason="tvm_cim.sim._core is a placeholder without run(); "
                "the Cython backend is not implemented yet"
            )
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def ready_backends() -> list[str]:
    """Backends that can run programs now."""
    return [b for b in available_backends() if b != "cython" or cython_core_ready()]


@pytest.fixture(scope="session", params=backend_params())
def backend(request) -> str:
    """Name of a simulator backend (``"cython"`` or ``"numpy"``)."""
    return request.param


# --------------------------------------------------------------------- helpers


def random_weights(rng: np.random.Generator, k: int, n: int, w_bits: int) -> np.ndarray:
    """``[k, n]`` signed ``w_bits`` weights, uniformly over the whole code range."""
    lo, hi = quant_range(w_bits, True)
    return rng.integers(lo, hi + 1, size=(k, n), dtype=np.int64)


def random_inputs(
    rng: np.random.Generator, batch: int, k: int, a_bits: int, signed: bool
) -> np.ndarray:
    """``[batch, k]`` ``a_bits`` inputs, uniformly over the (un)signed code range."""
    lo, hi = quant_range(a_bits, signed)
    return rng.integers(lo, hi + 1, size=(batch, k), dtype=np.int64)


def extreme_weights(rng: np.random.Generator, k: int, n: int, w_bits: int) -> np.ndarray:
    """Random weights whose first columns sit at the code range's ends.

    Column 0 is all ``-2**(w-1)``, column 1 all ``2**(w-1) - 1``, column 2 all zero
    (when the matrix is that wide); the rest is random with both ends mixed in.
    """
    lo, hi = quant_range(w_bits, True)
    w = random_weights(rng, k, n, w_bits)
    ends = rng.random((k, n))
    w[ends < 0.15] = lo
    w[ends > 0.85] = hi
    for col, value in enumerate((lo, hi, 0)):
        if col < n:
            w[:, col] = value
    return w


def extreme_inputs(
    rng: np.random.Generator, batch: int, k: int, a_bits: int, signed: bool
) -> np.ndarray:
    """Random inputs plus rows at the code range's ends.

    Row 0 is all at the maximum, row 1 all at the minimum, row 2 alternates the two;
    further rows are random. ``batch`` must be at least 3.
    """
    lo, hi = quant_range(a_bits, signed)
    x = random_inputs(rng, batch, k, a_bits, signed)
    x[0] = hi
    x[1] = lo
    x[2] = np.where(np.arange(k) % 2 == 0, hi, lo)
    return x


def simulate(program, inputs: dict, backend: str, arch: CimArch | None = None, **kw):
    """Run ``program`` on a fresh simulator of ``backend``."""
    return Simulator(arch, backend=backend).run(program, inputs, **kw)
