"""The environment ``make install`` builds: the pinned versions, and nothing broken.

Brevitas pins ``setuptools<81`` and its extras pin an old onnx; installing it must move
neither torch (the CPU build the Makefile pins) nor onnx (the version TVM's frontend and
onnxruntime were checked with).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _setup_requirements() -> list[Requirement]:
    """Every requirement string written in setup.py."""
    text = (ROOT / "setup.py").read_text()
    specs = re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]*\])?\s*(?:[=<>!~]=?[^"]*)?)"', text)
    found = []
    for spec in specs:
        try:
            requirement = Requirement(spec)
        except Exception:
            continue
        if requirement.specifier:
            found.append(requirement)
    return found


def test_pip_check_finds_nothing_broken():
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_torch_is_the_pinned_cpu_build():
    spec = re.search(r"^TORCH_SPEC := torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert spec is not None
    assert metadata.version("torch").split("+")[0] == spec.group(1)


@pytest.mark.parametrize("requirement", _setup_requirements(), ids=str)
def test_installed_versions_satisfy_setup(requirement):
    try:
        installed = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{requirement.name} is not installed (its extra was not chosen)")
    assert requirement.specifier.contains(installed, prereleases=True), (requirement, installed)
