"""The architecture model: one description of a CIM crossbar accelerator.

:class:`CimArch` holds everything the compiler and the simulator need to know about
the hardware: crossbar geometry, cell / DAC / ADC resolutions, how signed weights
are mapped onto cells, how many crossbars work in parallel, and the latency (and
optionally the energy) of each class of operation.

It reads and writes its own flat YAML / JSON layout (field name -> value) and also
reads the ``hardware_config.yaml`` layout of CIM-AQ, the published RL mixed-precision
search for RRAM CIM accelerators::

    crossbar:
      size: {m: 256, n: 256}        # m = columns (outputs), n = rows (inputs)
      resolution_weight_bits: 4
      resolution_input_bits: 1
      mvm_write_latency: 56         # us
      mvm_execute_latency: 1.4      # us
    mapper:
      mapping_type: dc              # of | dc | dr

The default configuration, also available as the preset ``"rram-4b"``, is the one
used in the CIM-AQ paper.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from tvm_cim.core import files
from tvm_cim.core.errors import ArchError

__all__ = ["CimArch", "MAPPINGS"]

#: Canonical names of the signed-weight mappings.
MAPPINGS = ("offset", "differential-column", "differential-row")

# Accepted spellings (lower case) -> canonical mapping name.
_MAPPING_ALIASES = {
    "of": "offset",
    "dc": "differential-column",
    "dr": "differential-row",
    **{m: m for m in MAPPINGS},
    **{m.replace("-", "_"): m for m in MAPPINGS},
}

#: Most crossbars a chip may have: what the instruction words' crossbar field addresses.
MAX_CROSSBARS = 4096

# Integer fields and their inclusive ranges.
_INT_RANGES = {
    "rows": (1, 65535),
    "cols": (1, 65535),
    "cell_bits": (1, 8),
    "dac_bits": (1, 8),
    "crossbars": (1, MAX_CROSSBARS),
}
_ADC_RANGE = (1, 32)

# Latency fields (microseconds) and the keys of ``CimArch.latency_ps()``.
_LATENCY_KEYS = {
    "write_latency_us": "write",
    "mvm_latency_us": "mvm",
    "adc_latency_us": "adc",
    "shift_add_latency_us": "shift_add",
    "requant_latency_us": "requant",
    "load_store_latency_us": "load_store",
}
_ENERGY_FIELDS = ("write_energy_nj", "mvm_energy_nj", "adc_energy_nj", "digital_energy_nj")

# The published CIM-AQ configurations.
_PRESETS: dict[str, dict[str, Any]] = {
    "rram-4b": {
        "rows": 256,
        "cols": 256,
        "cell_bits": 4,
        "dac_bits": 1,
        "adc_bits": None,
        "mapping": "differential-column",
        "crossbars": 1,
        "write_latency_us": 56.0,
        "mvm_latency_us": 1.4,
        "adc_latency_us": 0.0,
        "shift_add_latency_us": 0.0,
        "requant_latency_us": 0.0,
        "load_store_latency_us": 0.0,
    },
}
_PRESETS["rram-2b"] = {**_PRESETS["rram-4b"], "cell_bits": 2}

# ISAAC's in-situ multiply-accumulate unit (Shafiee et al., ISCA 2016, Table I, 32 nm):
# eight 128x128 arrays of 2-bit cells, each with its own 8-bit ADC, 1-bit DACs and a
# 100 ns read cycle in which the ADC converts the previous read's 128 columns. ISAAC
# never reprograms its arrays, so the write figures are PUMA's (Ankit et al., ASPLOS
# 2019, the released simulator's crossbar write of a whole 128x128 array).
_ISAAC_CYCLE_NS = 100.0
_ISAAC_ROWS = 128
_PRESETS["isaac"] = {
    "rows": _ISAAC_ROWS,
    "cols": 128,
    "cell_bits": 2,
    "dac_bits": 1,
    "adc_bits": 8,
    "mapping": "offset",
    "crossbars": 8,
    "write_latency_us": 351.0 / 32,
    "mvm_latency_us": _ISAAC_CYCLE_NS / 1e3,
    "adc_latency_us": 0.0,  # overlapped with the next read
    "shift_add_latency_us": 0.0,
    "requant_latency_us": 0.0,
    "load_store_latency_us": 0.0,
    "write_energy_nj": 676.0 / 32,
    # One read cycle of one array: the array's 0.3 mW and its 128 DACs (4 mW for 1,024)
    # and sample-and-holds (10 uW for 1,024). mW x ns = pJ.
    "mvm_energy_nj": (0.3 + _ISAAC_ROWS * (4.0 + 0.01) / 1024) * _ISAAC_CYCLE_NS / 1e3,
    # One conversion: 16 mW for eight ADCs of 1.28 GS/s each.
    "adc_energy_nj": (16.0 / 8) / 1.28 / 1e3,
    # One shift-add of a vector of one array's 128 columns: four units (0.2 mW) handle
    # the 1,024 columns of a cycle.
    "digital_energy_nj": 0.2 * _ISAAC_CYCLE_NS * 128 / 1024 / 1e3,
}

# CIM-AQ hardware_config.yaml key path -> CimArch field.
_CIMAQ_KEYS = {
    ("crossbar", "size", "m"): "cols",
    ("crossbar", "size", "n"): "rows",
    ("crossbar", "resolution_weight_bits"): "cell_bits",
    ("crossbar", "resolution_input_bits"): "dac_bits",
    ("crossbar", "mvm_write_latency"): "write_latency_us",
    ("crossbar", "mvm_execute_latency"): "mvm_latency_us",
    ("mapper", "mapping_type"): "mapping",
}

_YAML_SUFFIXES = (".yaml", ".yml")
_JSON_SUFFIXES = (".json",)


#: Largest latency of one operation, in microseconds (about 32 years): timing sums
#: integer picoseconds (beyond int64 where needed), and their conversion back to
#: microseconds must stay finite for any count a program can make.
MAX_LATENCY_US = 1e15


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value) -> bool:
    """Finite as a float (a huge integer overflows and is not)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


@dataclasses.dataclass(frozen=True)
class CimArch:
    """A CIM crossbar accelerator.

    All fields are validated on construction; a bad value raises
    :class:`~tvm_cim.core.errors.ArchError` naming the field and its allowed range.
    Latencies are in microseconds and energies in nanojoules. The defaults are the
    ``"rram-4b"`` preset (the CIM-AQ paper's configuration) named ``"custom"``.

    Examples
    --------
    >>> arch = CimArch.preset("rram-4b")
    >>> arch.replace(mapping="dr", crossbars=4).mapping
    'differential-row'
    """

    # Crossbar rows: inputs per crossbar ("n" in CIM-AQ).
    rows: int = 256
    # Crossbar columns: outputs per crossbar ("m" in CIM-AQ).
    cols: int = 256
    # Bits stored per cell; wider weights are sliced over several columns.
    cell_bits: int = 4
    # Input bits applied per step (bit-serial inputs when 1).
    dac_bits: int = 1
    # ADC resolution per column read; None means lossless (no clipping).
    adc_bits: int | None = None
    # Signed-weight mapping: offset, differential-column or differential-row.
    mapping: str = "differential-column"
    # Crossbars that hold weights at once and run in parallel.
    crossbars: int = 1
    # Programming one crossbar.
    write_latency_us: float = 56.0
    # One input step on one crossbar for one input vector.
    mvm_latency_us: float = 1.4
    # One ADC read of a crossbar's columns, per input vector.
    adc_latency_us: float = 0.0
    # One shift-add or accumulate operation, per input vector.
    shift_add_latency_us: float = 0.0
    # Requantizing one output vector.
    requant_latency_us: float = 0.0
    # Loading or storing one vector.
    load_store_latency_us: float = 0.0
    # Clock frequency, used only to express latencies as cycles.
    clock_ghz: float = 1.0
    # Energy of programming one crossbar.
    write_energy_nj: float | None = None
    # Energy of one input step on one crossbar for one input vector.
    mvm_energy_nj: float | None = None
    # Energy of one column conversion.
    adc_energy_nj: float | None = None
    # Energy of one digital operation for one vector.
    digital_energy_nj: float | None = None
    # A label for reports.
    name: str = "custom"

    # ------------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        for field, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, field)
            if not _is_int(value) or not lo <= value <= hi:
                raise ArchError(
                    f"CimArch.{field} must be an integer in {lo}..{hi}, got {value!r}",
                    field=field,
                )
            object.__setattr__(self, field, int(value))

        lo, hi = _ADC_RANGE
        if self.adc_bits is not None:
            if not _is_int(self.adc_bits) or not lo <= self.adc_bits <= hi:
                raise ArchError(
                    f"CimArch.adc_bits must be None (lossless) or an integer in {lo}..{hi}, "
                    f"got {self.adc_bits!r}",
                    field="adc_bits",
                )
            object.__setattr__(self, "adc_bits", int(self.adc_bits))

        mapping = self.mapping
        canonical = _MAPPING_ALIASES.get(mapping.lower()) if isinstance(mapping, str) else None
        if canonical is None:
            raise ArchError(
                f"CimArch.mapping must be one of {', '.join(repr(m) for m in MAPPINGS)} "
                f"(aliases 'of', 'dc', 'dr'), got {mapping!r}",
                field="mapping",
            )
        object.__setattr__(self, "mapping", canonical)
        if canonical == "differential-row" and self.rows % 2:
            raise ArchError(
                f"CimArch.rows must be even for mapping 'differential-row', got {self.rows}",
                field="rows",
            )

        for field in _LATENCY_KEYS:
            self._check_real(field, optional=False)
        for field in _ENERGY_FIELDS:
            self._check_real(field, optional=True)

        clock = self.clock_ghz
        if not _is_real(clock) or not _finite(clock) or clock <= 0:
            raise ArchError(
                f"CimArch.clock_ghz must be a finite number > 0, got {clock!r}", field="clock_ghz"
            )
        object.__setattr__(self, "clock_ghz", float(clock))

        if not isinstance(self.name, str):
            raise ArchError(f"CimArch.name must be a string, got {self.name!r}", field="name")

    def _check_real(self, field: str, *, optional: bool) -> None:
        """Check that ``field`` is a finite number >= 0 (or None when optional); store a float."""
        value = getattr(self, field)
        if value is None and optional:
            return
        bound = MAX_LATENCY_US if field in _LATENCY_KEYS else math.inf
        if not (_is_real(value) and _finite(value) and 0 <= value <= bound):
            allowed = "None or a finite number >= 0" if optional else "a finite number >= 0"
            if field in _LATENCY_KEYS:
                allowed += f" and <= {MAX_LATENCY_US:g}"
            raise ArchError(f"CimArch.{field} must be {allowed}, got {value!r}", field=field)
        object.__setattr__(self, field, float(value))

    # -------------------------------------------------------------------- timing

    def latency_ps(self) -> dict[str, int]:
        """Latency of each operation class in integer picoseconds.

        Returns
        -------
        dict
            Keys ``"write"``, ``"mvm"``, ``"adc"``, ``"shift_add"``, ``"requant"``,
            ``"load_store"``; values ``round(microseconds * 1_000_000)``. Timing is
            summed exactly in these units everywhere else.
        """
        return {key: round(getattr(self, f) * 1_000_000) for f, key in _LATENCY_KEYS.items()}

    def cycles(self, latency_ps: int) -> int:
        """Clock cycles needed for ``latency_ps`` picoseconds, rounded up.

        Computed exactly from the decimal value of ``clock_ghz``:
        ``ceil(latency_ps * clock_ghz / 1000)``.
        """
        ps = int(latency_ps) if _is_int(latency_ps) else None
        if ps is None:
            raise TypeError(f"latency_ps must be an integer, got {latency_ps!r}")
        clock = Fraction(repr(self.clock_ghz))
        num = ps * clock.numerator
        den = clock.denominator * 1000
        return -(-num // den)

    # ------------------------------------------------------------------- identity

    def structural_key(self) -> tuple:
        """The fields that change what a compiled program means.

        A program compiled for one architecture runs on another exactly when their
        structural keys are equal; latencies, energies, parallelism and the name
        only change how long it takes.
        """
        return (self.rows, self.cols, self.cell_bits, self.dac_bits, self.adc_bits, self.mapping)

    def replace(self, **changes: Any) -> CimArch:
        """Return a validated copy with ``changes`` applied."""
        unknown = sorted(set(changes) - set(_field_names()))
        if unknown:
            raise ArchError(f"unknown CimArch fields: {', '.join(unknown)}", field=unknown[0])
        return dataclasses.replace(self, **changes)

    # -------------------------------------------------------------------- presets

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        return list(_PRESETS)

    @classmethod
    def preset(cls, name: str) -> CimArch:
        """A named configuration.

        ``"rram-4b"`` is the CIM-AQ paper's configuration (256x256 crossbar, 4-bit
        cells, 1-bit DAC, lossless ADC, differential-column mapping, one crossbar,
        56 us write, 1.4 us MVM step, no digital costs); ``"rram-2b"`` is the same
        with 2-bit cells; ``"isaac"`` is one in-situ multiply-accumulate unit of ISAAC
        (eight 128x128 crossbars of 2-bit cells, 8-bit ADCs, 100 ns cycle) with its
        published energy figures and PUMA's crossbar write (docs/architecture.md).
        """
        key = name.lower() if isinstance(name, str) else name
        if key not in _PRESETS:
            raise ArchError(
                f"unknown architecture preset {name!r}; presets: {', '.join(_PRESETS)}",
                field="name",
            )
        return cls(**_PRESETS[key], name=key)

    # ---------------------------------------------------------- dict / yaml / json

    def to_dict(self) -> dict[str, Any]:
        """All fields, in declaration order, as plain Python values."""
        return {f: getattr(self, f) for f in _field_names()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CimArch:
        """Build from a ``{field: value}`` mapping; missing fields take their defaults.

        Raises
        ------
        ArchError
            If ``d`` is not a mapping, has keys that are not fields, or a value is invalid.
        """
        if not isinstance(d, Mapping):
            raise ArchError(
                f"an architecture description must be a mapping, got {type(d).__name__}"
            )
        names = set(_field_names())
        unknown = sorted(str(k) for k in d if k not in names)
        if unknown:
            raise ArchError(
                f"unknown CimArch keys: {', '.join(unknown)} (known: {', '.join(_field_names())})",
                field=unknown[0],
            )
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> CimArch:
        """Read a YAML file in the native layout or in CIM-AQ's ``hardware_config.yaml``.

        The CIM-AQ layout is recognised by its top-level ``crossbar`` key; its other
        fields (ADC, parallelism, digital costs) take the defaults, which reproduce
        the CIM-AQ latency model.
        """
        return cls._from_file(path, yaml.safe_load, yaml.YAMLError, "YAML")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> CimArch:
        """Read a JSON file (native layout, or CIM-AQ's layout as JSON)."""
        return cls._from_file(path, json.loads, json.JSONDecodeError, "JSON")

    def to_yaml(self, path: str | os.PathLike) -> None:
        """Write the native layout as YAML."""
        files.write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the native layout as JSON."""
        files.write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(
        cls, path_or_preset: str | os.PathLike | CimArch | Mapping[str, Any] | None
    ) -> CimArch:
        """Load an architecture from a preset name, a file, a mapping or a ``CimArch``;
        None is the default architecture, ``CimArch()``.

        Files are chosen by suffix: ``.yaml`` / ``.yml`` or ``.json``.
        """
        if path_or_preset is None:
            return cls()
        if isinstance(path_or_preset, CimArch):
            return path_or_preset
        if isinstance(path_or_preset, Mapping):
            return cls.from_dict(path_or_preset)
        if not isinstance(path_or_preset, (str, os.PathLike)):
            raise ArchError(
                "expected a preset name, a .yaml/.yml/.json path, a mapping or a CimArch, "
                f"got {type(path_or_preset).__name__}"
            )
        if isinstance(path_or_preset, str) and path_or_preset.lower() in _PRESETS:
            return cls.preset(path_or_preset)
        suffix = Path(path_or_preset).suffix.lower()
        if suffix in _YAML_SUFFIXES:
            return cls.from_yaml(path_or_preset)
        if suffix in _JSON_SUFFIXES:
            return cls.from_json(path_or_preset)
        raise ArchError(
            f"{str(path_or_preset)!r} is neither a preset ({', '.join(_PRESETS)}) "
            "nor a .yaml/.yml/.json file"
        )

    @classmethod
    def _from_file(cls, path: str | os.PathLike, parse, parse_error, syntax: str) -> CimArch:
        """Read and ``parse`` a file, then build from its contents; errors name the file."""
        text = _read_text(path)
        try:
            data = parse(text)
        except RecursionError:
            raise ArchError(f"{path}: invalid {syntax}: nested too deeply") from None
        except (parse_error, ValueError) as err:
            reason = f"{type(err).__name__}: {err}"
            if "integer string conversion" in str(err):  # Python's own digit limit
                reason = "an integer too large to read"
            raise ArchError(f"{path}: invalid {syntax}: {reason}") from None
        if not isinstance(data, Mapping):
            raise ArchError(
                f"{path}: an architecture file must hold a mapping, got {type(data).__name__}"
            )
        try:
            if "crossbar" in data:
                return cls._from_cimaq(data)
            return cls.from_dict(data)
        except ArchError as err:
            raise ArchError(f"{path}: {err}", field=err.field) from None

    @classmethod
    def _from_cimaq(cls, data: Mapping[str, Any]) -> CimArch:
        """Convert CIM-AQ's ``hardware_config.yaml`` layout; other keys are ignored."""
        kwargs: dict[str, Any] = {}
        for keys, field in _CIMAQ_KEYS.items():
            path = ".".join(keys)
            node: Any = data
            for depth, key in enumerate(keys):
                if not isinstance(node, Mapping):
                    parent = ".".join(keys[:depth])
                    raise ArchError(
                        f"CIM-AQ hardware config: {parent} must be a mapping holding {path}",
                        field=path,
                    )
                if key not in node:
                    raise ArchError(f"CIM-AQ hardware config is missing the key {path}", field=path)
                node = node[key]
            kwargs[field] = node
        try:
            return cls(**kwargs, name="cim-aq")
        except ArchError as err:
            path = next((".".join(k) for k, f in _CIMAQ_KEYS.items() if f == err.field), None)
            if path is None:
                raise
            raise ArchError(f"{path}: {err}", field=path) from None


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(CimArch))


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ArchError(f"cannot read architecture file {str(path)!r}: {err}") from None
