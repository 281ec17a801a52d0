"""The ISA table is the one definition: the compiled core, both backends and the limits
follow it."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from tvm_cim.core.arch import MAX_CROSSBARS
from tvm_cim.sim import _core, isa, isa_pxi, reference
from tvm_cim.sim.timing import SimStats

SIM_DIR = Path(isa.__file__).resolve().parent


def test_core_is_built_from_this_table():
    assert isa.fingerprint() == _core.ISA_FINGERPRINT
    assert tuple(spec.mnemonic for spec in isa.INSTRUCTIONS) == _core.DISPATCHED
    assert _core.COUNTERS == isa.COUNTERS


def test_every_instruction_has_both_execute_functions():
    core_source = (SIM_DIR / "_core.pyx").read_text()
    assert set(reference.EXECUTE) == set(isa.BY_MNEMONIC)
    for spec in isa.INSTRUCTIONS:
        assert reference.EXECUTE[spec.mnemonic] is getattr(reference, f"execute_{spec.mnemonic}")
        signature = f"cdef void _execute_{spec.mnemonic}(Machine *m, const int64_t *ops)"
        assert signature in core_source, spec.mnemonic


def test_generated_dispatch_calls_every_row():
    text = isa_pxi.render()
    assert f'ISA_FINGERPRINT = "{isa.fingerprint()}"' in text
    for spec in isa.INSTRUCTIONS:
        name = spec.mnemonic.upper()
        assert f"    {name} = {spec.opcode}\n" in text
        assert f"op == {name}:\n        _execute_{spec.mnemonic}(m, ops)\n" in text
        for column, field in enumerate(spec.fields):
            assert f"    {name}_{field.name.upper()} = {column}\n" in text


def test_generator_runs_standalone(tmp_path):
    """The build runs it before the package is installed: it needs only isa.py."""
    out = tmp_path / "_isa.pxi"
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['isa_pxi.py', {str(out)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SIM_DIR / 'isa_pxi.py')!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.startswith('tvm_cim')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert done.stdout.strip() == "[]"
    assert out.read_text() == isa_pxi.render()
    assert not isa_pxi.write(out)  # unchanged: left alone, so Cython does not recompile


def test_fingerprint_follows_what_the_core_is_made_of(monkeypatch):
    table = isa.INSTRUCTIONS
    base = isa.fingerprint()
    reworded = tuple(dataclasses.replace(spec, doc="other words") for spec in table)
    monkeypatch.setattr(isa, "INSTRUCTIONS", reworded)
    assert isa.fingerprint() == base
    unread = tuple(dataclasses.replace(spec, reads=()) for spec in table)
    monkeypatch.setattr(isa, "INSTRUCTIONS", unread)
    assert isa.fingerprint() != base


def test_core_built_for_another_table_is_refused():
    """The import fails, and the simulator falls back to the numpy reference."""
    sim_path = find_spec("tvm_cim.sim").submodule_search_locations[0]
    script = (
        "import sys, types\n"
        "import tvm_cim\n"
        "package = types.ModuleType('tvm_cim.sim')\n"  # the package without its __init__
        f"package.__path__ = [{sim_path!r}]\n"
        "sys.modules['tvm_cim.sim'] = package\n"
        "from tvm_cim.sim import isa\n"
        "isa.fingerprint = lambda: 'another table'\n"
        "try:\n"
        "    from tvm_cim.sim import _core\n"
        "except ImportError as exc:\n"
        "    print('refused:', exc)\n"
        "from tvm_cim.sim import simulator\n"
        "print(simulator.available_backends())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    refused, backends = done.stdout.strip().splitlines()
    assert refused.startswith("refused: tvm_cim.sim._core was built for another instruction")
    assert backends == "['numpy']"


def test_limits_come_from_the_field_widths():
    load, shadd = isa.BY_MNEMONIC["load"], isa.BY_MNEMONIC["shadd"]
    assert isa.MAX_BUFFERS == 1 << shadd.field("dst").bits == 65536
    assert isa.MAX_TENSORS == 1 << load.field("tensor").bits == 256
    assert isa.MAX_COLUMNS == load.field("ncols").max_value == (1 << 16) - 1
    assert isa.table_size("crossbar") == 1 << isa.BY_MNEMONIC["mvm"].field("xb").bits == 4096
    assert isa.table_size("crossbar") == MAX_CROSSBARS  # the arch accepts what words address


@pytest.mark.parametrize("spec", isa.INSTRUCTIONS, ids=lambda s: s.mnemonic)
def test_rows_are_consistent(spec):
    names = [f.name for f in spec.fields]
    stats_fields = {f.name for f in dataclasses.fields(SimStats)}
    for name in spec.reads + spec.writes:
        assert spec.field(name).kind == "buffer"
    for count in spec.counts:
        assert count.counter in stats_fields
        assert count.operand is None or count.operand in names
    if spec.unit == "crossbar":
        assert spec.operand("crossbar") in names
