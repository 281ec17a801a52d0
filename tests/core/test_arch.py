"""Tests for the architecture model (tvm_cim.core.arch)."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest

from tvm_cim import ArchError, CimArch, CimError

CIMAQ_CONFIG = """\
crossbar:
  size:
    m: 256            # columns
    n: 256            # rows
  resolution_weight_bits: 4
  resolution_input_bits: 1
  mvm_write_latency: 56     # us
  mvm_execute_latency: 1.4  # us
mapper:
  mapping_type: dc          # of | offset, dc | differential-column, dr | differential-row
"""


def without_name(arch: CimArch) -> dict:
    d = arch.to_dict()
    d.pop("name")
    return d


def test_defaults_are_rram_4b():
    preset = CimArch.preset("rram-4b")
    assert without_name(CimArch()) == without_name(preset)
    assert preset.name == "rram-4b"
    assert (preset.rows, preset.cols, preset.cell_bits, preset.dac_bits) == (256, 256, 4, 1)
    assert preset.adc_bits is None
    assert preset.mapping == "differential-column"
    assert preset.crossbars == 1
    assert (preset.write_latency_us, preset.mvm_latency_us) == (56.0, 1.4)


def test_presets():
    assert CimArch.presets() == ["rram-4b", "rram-2b", "isaac"]
    two = CimArch.preset("rram-2b")
    assert two.cell_bits == 2
    assert without_name(two) == without_name(CimArch(cell_bits=2))


def test_isaac_preset_is_the_published_component_table():
    """ISAAC's Table I (one IMA: eight 128x128 arrays, 100 ns cycle) and PUMA's write,
    restated here in their own units (mW, ns, GS/s) and converted to nJ per operation."""
    isaac = CimArch.preset("isaac")
    cycle_ns, arrays, rows = 100, 8, 128
    array_mw, dacs_mw, sample_holds_mw = 0.3, 4.0, 0.010  # DACs, S+Hs: 8 x 128 of each
    adcs_mw, adc_rate_gsps, shift_adds_mw = 16.0, 1.28, 0.2  # 8 ADCs, 4 S+A units
    mvm_pj = (array_mw + (dacs_mw + sample_holds_mw) / arrays) * cycle_ns
    assert isaac.mvm_energy_nj == pytest.approx(mvm_pj / 1e3, rel=1e-12)
    assert isaac.adc_energy_nj == pytest.approx(adcs_mw / arrays / adc_rate_gsps / 1e3)
    per_column_pj = shift_adds_mw * cycle_ns / (arrays * 128)
    assert isaac.digital_energy_nj == pytest.approx(per_column_pj * isaac.cols / 1e3)
    assert (isaac.write_latency_us, isaac.write_energy_nj) == (351 / 32, 676 / 32)
    assert (isaac.rows, isaac.cols, isaac.cell_bits, isaac.dac_bits) == (rows, 128, 2, 1)
    assert (isaac.adc_bits, isaac.crossbars, isaac.mvm_latency_us) == (8, arrays, 0.1)


def test_unknown_preset():
    with pytest.raises(ArchError, match="rram-4b, rram-2b"):
        CimArch.preset("sram-8b")


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("of", "offset"),
        ("OF", "offset"),
        ("offset", "offset"),
        ("dc", "differential-column"),
        ("Differential-Column", "differential-column"),
        ("differential_column", "differential-column"),
        ("dr", "differential-row"),
        ("DR", "differential-row"),
        ("differential-row", "differential-row"),
    ],
)
def test_mapping_aliases(alias, canonical):
    assert CimArch(mapping=alias).mapping == canonical


def test_int_and_float_normalisation():
    arch = CimArch(write_latency_us=56, clock_ghz=2, mvm_energy_nj=1)
    assert isinstance(arch.write_latency_us, float)
    assert isinstance(arch.clock_ghz, float)
    assert isinstance(arch.mvm_energy_nj, float)
    assert arch == CimArch(write_latency_us=56.0, clock_ghz=2.0, mvm_energy_nj=1.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("rows", 0),
        ("rows", 65536),
        ("rows", 256.0),
        ("rows", True),
        ("rows", "256"),
        ("cols", 0),
        ("cols", -3),
        ("cols", 70000),
        ("cell_bits", 0),
        ("cell_bits", 9),
        ("cell_bits", False),
        ("dac_bits", 0),
        ("dac_bits", 9),
        ("dac_bits", 1.0),
        ("adc_bits", 0),
        ("adc_bits", 33),
        ("adc_bits", 8.0),
        ("adc_bits", True),
        ("mapping", "diagonal"),
        ("mapping", None),
        ("mapping", 1),
        ("crossbars", 0),
        ("crossbars", 4097),
        ("crossbars", 1.5),
        ("write_latency_us", -1.0),
        ("write_latency_us", float("nan")),
        ("write_latency_us", float("inf")),
        ("write_latency_us", None),
        ("mvm_latency_us", -0.1),
        ("mvm_latency_us", "1.4"),
        ("adc_latency_us", -1),
        ("shift_add_latency_us", -1),
        ("requant_latency_us", True),
        ("load_store_latency_us", -1e-9),
        ("clock_ghz", 0),
        ("clock_ghz", -1.0),
        ("clock_ghz", float("inf")),
        ("write_energy_nj", -1.0),
        ("mvm_energy_nj", "x"),
        ("adc_energy_nj", float("nan")),
        ("digital_energy_nj", -2),
        ("name", 3),
    ],
)
def test_validation(field, value):
    with pytest.raises(ArchError, match=f"CimArch.{field} ") as info:
        CimArch(**{field: value})
    assert info.value.field == field
    assert isinstance(info.value, CimError)


def test_validation_message_names_range():
    with pytest.raises(ArchError) as info:
        CimArch(cell_bits=9)
    assert str(info.value) == "CimArch.cell_bits must be an integer in 1..8, got 9"


def test_differential_row_needs_even_rows():
    with pytest.raises(ArchError, match="rows must be even") as info:
        CimArch(rows=255, mapping="dr")
    assert info.value.field == "rows"
    CimArch(rows=255, mapping="dc")
    CimArch(rows=254, mapping="dr")


def test_boundaries_accepted():
    arch = CimArch(
        rows=65535, cols=1, cell_bits=8, dac_bits=8, adc_bits=32, crossbars=4096, clock_ghz=0.001
    )
    assert arch.adc_bits == 32
    assert CimArch(adc_bits=1, write_latency_us=0, write_energy_nj=0.0).write_energy_nj == 0.0


def test_frozen():
    arch = CimArch()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.rows = 128  # type: ignore[misc]


def test_replace_validates():
    arch = CimArch().replace(mapping="of", crossbars=4)
    assert arch.mapping == "offset"
    assert arch.crossbars == 4
    with pytest.raises(ArchError, match="cell_bits"):
        CimArch().replace(cell_bits=0)
    with pytest.raises(ArchError, match="bogus"):
        CimArch().replace(bogus=1)


def test_structural_key():
    arch = CimArch()
    assert arch.structural_key() == (256, 256, 4, 1, None, "differential-column")
    faster = arch.replace(mvm_latency_us=0.5, crossbars=8, name="fast", write_energy_nj=1.0)
    assert faster.structural_key() == arch.structural_key()
    for change in [{"rows": 128}, {"cols": 128}, {"cell_bits": 2}, {"dac_bits": 2}]:
        assert arch.replace(**change).structural_key() != arch.structural_key()
    assert arch.replace(adc_bits=8).structural_key() != arch.structural_key()
    assert arch.replace(mapping="of").structural_key() != arch.structural_key()


def test_latency_ps():
    assert CimArch.preset("rram-4b").latency_ps() == {
        "write": 56_000_000,
        "mvm": 1_400_000,
        "adc": 0,
        "shift_add": 0,
        "requant": 0,
        "load_store": 0,
    }
    arch = CimArch(adc_latency_us=0.0125, shift_add_latency_us=0.001, requant_latency_us=3)
    ps = arch.latency_ps()
    assert (ps["adc"], ps["shift_add"], ps["requant"]) == (12_500, 1_000, 3_000_000)
    assert all(isinstance(v, int) for v in ps.values())


@pytest.mark.parametrize(
    "clock_ghz, latency_ps, cycles",
    [
        (1.0, 0, 0),
        (1.0, 1_000, 1),
        (1.0, 1_001, 2),
        (1.0, 1_400_000, 1_400),
        (2.0, 1_400_000, 2_800),
        (0.3, 10_000, 3),  # 0.3 GHz * 10 ns = 3 cycles exactly, not 3.0000000000000004
        (0.3, 10_001, 4),
        (1.5, 1, 1),
        (0.001, 56_000_000, 56),
    ],
)
def test_cycles(clock_ghz, latency_ps, cycles):
    assert CimArch(clock_ghz=clock_ghz).cycles(latency_ps) == cycles


def test_dict_round_trip():
    arch = CimArch(rows=128, mapping="dr", adc_bits=8, mvm_energy_nj=0.25, name="x")
    d = arch.to_dict()
    assert list(d)[:3] == ["rows", "cols", "cell_bits"]
    assert d["mapping"] == "differential-row"
    assert CimArch.from_dict(d) == arch


def test_from_dict_missing_keys_default():
    assert CimArch.from_dict({"cell_bits": 2}) == CimArch(cell_bits=2)
    assert CimArch.from_dict({}) == CimArch()


def test_from_dict_unknown_keys():
    with pytest.raises(ArchError, match="unknown CimArch keys: bar, foo") as info:
        CimArch.from_dict({"rows": 128, "foo": 1, "bar": 2})
    assert info.value.field == "bar"
    with pytest.raises(ArchError, match="mapping"):
        CimArch.from_dict([("rows", 1)])  # type: ignore[arg-type]


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_file_round_trip(tmp_path, suffix):
    arch = CimArch(
        rows=512, cols=128, cell_bits=2, adc_bits=6, mapping="of", crossbars=16,
        adc_latency_us=0.01, clock_ghz=1.2, write_energy_nj=3.5, name="round-trip",
    )  # fmt: skip
    path = tmp_path / f"arch{suffix}"
    if suffix == ".json":
        arch.to_json(path)
        assert json.loads(path.read_text())["mapping"] == "offset"
        assert CimArch.from_json(path) == arch
    else:
        arch.to_yaml(path)
        assert CimArch.from_yaml(path) == arch
    assert CimArch.load(path) == arch
    assert CimArch.load(str(path)) == arch


def test_native_yaml_unknown_key(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("rows: 128\ncolumns: 64\n")
    with pytest.raises(ArchError, match="arch.yaml.*unknown CimArch keys: columns"):
        CimArch.from_yaml(path)


def test_native_yaml_bad_value_names_file_and_field(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text("cell_bits: 12\n")
    with pytest.raises(ArchError, match=r"arch\.yaml: CimArch\.cell_bits") as info:
        CimArch.load(path)
    assert info.value.field == "cell_bits"


def test_cimaq_config_is_rram_4b(tmp_path):
    path = tmp_path / "hardware_config.yaml"
    path.write_text(CIMAQ_CONFIG)
    arch = CimArch.from_yaml(path)
    assert without_name(arch) == without_name(CimArch.preset("rram-4b"))
    assert CimArch.load(path) == arch


def test_cimaq_config_dr_2bit(tmp_path):
    text = CIMAQ_CONFIG.replace("mapping_type: dc", "mapping_type: dr").replace(
        "resolution_weight_bits: 4", "resolution_weight_bits: 2"
    )
    path = tmp_path / "hardware_config.yaml"
    path.write_text(text)
    arch = CimArch.from_yaml(path)
    assert arch.mapping == "differential-row"
    assert arch.cell_bits == 2
    assert without_name(arch) == without_name(CimArch.preset("rram-2b").replace(mapping="dr"))


def test_cimaq_config_other_shape(tmp_path):
    path = tmp_path / "hw.yml"
    path.write_text(
        textwrap.dedent(
            """\
            crossbar:
              size: {m: 128, n: 64}
              resolution_weight_bits: 1
              resolution_input_bits: 2
              mvm_write_latency: 10
              mvm_execute_latency: 0.5
            mapper:
              mapping_type: offset
              extra: ignored
            """
        )
    )
    arch = CimArch.load(path)
    assert (arch.cols, arch.rows, arch.cell_bits, arch.dac_bits) == (128, 64, 1, 2)
    assert arch.mapping == "offset"
    assert arch.latency_ps()["write"] == 10_000_000
    assert arch.latency_ps()["mvm"] == 500_000


@pytest.mark.parametrize(
    "drop, key",
    [
        ("    m: 256            # columns\n", "crossbar.size.m"),
        ("    n: 256            # rows\n", "crossbar.size.n"),
        ("  resolution_weight_bits: 4\n", "crossbar.resolution_weight_bits"),
        ("  resolution_input_bits: 1\n", "crossbar.resolution_input_bits"),
        ("  mvm_write_latency: 56     # us\n", "crossbar.mvm_write_latency"),
        ("  mvm_execute_latency: 1.4  # us\n", "crossbar.mvm_execute_latency"),
        (CIMAQ_CONFIG[CIMAQ_CONFIG.index("mapper:") :], "mapper.mapping_type"),
    ],
)
def test_cimaq_missing_key(tmp_path, drop, key):
    assert drop in CIMAQ_CONFIG
    path = tmp_path / "hardware_config.yaml"
    path.write_text(CIMAQ_CONFIG.replace(drop, ""))
    with pytest.raises(ArchError, match=f"hardware_config.yaml.*missing the key {key}") as info:
        CimArch.from_yaml(path)
    assert info.value.field == key


def test_cimaq_bad_value_names_key(tmp_path):
    path = tmp_path / "hardware_config.yaml"
    path.write_text(CIMAQ_CONFIG.replace("mapping_type: dc", "mapping_type: zz"))
    with pytest.raises(ArchError, match="mapper.mapping_type: CimArch.mapping") as info:
        CimArch.from_yaml(path)
    assert info.value.field == "mapper.mapping_type"


def test_unreadable_and_invalid_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ArchError, match="missing.yaml"):
        CimArch.from_yaml(missing)
    with pytest.raises(ArchError, match="missing.yaml"):
        CimArch.load(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [1, 2\n")
    with pytest.raises(ArchError, match="bad.yaml: invalid YAML"):
        CimArch.from_yaml(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{rows: 1")
    with pytest.raises(ArchError, match="bad.json: invalid JSON"):
        CimArch.from_json(bad_json)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ArchError, match="scalar.yaml: .*mapping"):
        CimArch.from_yaml(scalar)


def test_load_dispatch():
    assert CimArch.load("rram-2b") == CimArch.preset("rram-2b")
    assert CimArch.load("RRAM-4B") == CimArch.preset("rram-4b")
    arch = CimArch(rows=64)
    assert CimArch.load(arch) is arch
    assert CimArch.load({"rows": 64}) == arch
    with pytest.raises(ArchError, match="neither a preset"):
        CimArch.load("arch.txt")
    with pytest.raises(ArchError):
        CimArch.load(42)  # type: ignore[arg-type]


def test_latencies_are_bounded_so_that_picoseconds_stay_exact():
    from tvm_cim.core.arch import MAX_LATENCY_US

    assert CimArch(write_latency_us=MAX_LATENCY_US).latency_ps()["write"] == 10**21
    for value in (1e307, MAX_LATENCY_US * 2):
        with pytest.raises(ArchError, match="write_latency_us must be .* <= 1e\\+15"):
            CimArch(write_latency_us=value)
