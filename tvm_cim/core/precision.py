"""Precision configs: per-operator weight and activation bit widths.

Accepted forms, wherever a precision is asked for:

* a mapping ``{operator_name: {w_bits: .., a_bits: ..}, default: {...}}`` (YAML or JSON file,
  or a dict);
* a list of ``{w_bits, a_bits}`` entries or ``[w_bits, a_bits]`` pairs in offload order;
* CIM-AQ's ``.npy`` policy: an ``[L, 2]`` integer array of ``[w_bits, a_bits]`` in offload order.

Operator names are the ONNX node names for ONNX models, else the names the partitioner
derives (``conv2d_0``, ``dense_3``, ...); ``tvm-cim inspect`` lists them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from tvm_cim.core.arrays import read_npy
from tvm_cim.core.errors import CimError

MIN_BITS, MAX_BITS = 1, 8


@dataclass(frozen=True)
class Bits:
    """Weight and activation widths of one operator."""

    w_bits: int
    a_bits: int

    def to_dict(self) -> dict:
        return {"w_bits": self.w_bits, "a_bits": self.a_bits}


W8A8 = Bits(8, 8)


def _bits(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise CimError(f"{where}: bits must be an integer in 1..8, got {value!r}")
    if not MIN_BITS <= int(value) <= MAX_BITS:
        raise CimError(f"{where}: bits must be in {MIN_BITS}..{MAX_BITS}, got {value}")
    return int(value)


def _entry(value, where: str) -> Bits:
    if isinstance(value, Mapping):
        unknown = set(value) - {"w_bits", "a_bits"}
        if unknown or not {"w_bits", "a_bits"} <= set(value):
            raise CimError(f"{where}: expected keys w_bits and a_bits, got {sorted(value)}")
        return Bits(
            _bits(value["w_bits"], f"{where}.w_bits"), _bits(value["a_bits"], f"{where}.a_bits")
        )
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str) and len(value) == 2:
        return Bits(_bits(value[0], f"{where} w_bits"), _bits(value[1], f"{where} a_bits"))
    raise CimError(f"{where}: expected {{w_bits, a_bits}} or [w_bits, a_bits], got {value!r}")


class Precision:
    """Bit widths by operator name or by offload position, with an optional default."""

    def __init__(
        self,
        by_name: Mapping[str, Bits] | None = None,
        ordered: Sequence[Bits] | None = None,
        default: Bits | None = None,
        source: str = "precision config",
    ):
        self.by_name = dict(by_name or {})
        self.ordered = list(ordered) if ordered is not None else None
        self.default = default
        self.source = source

    @classmethod
    def load(cls, spec) -> Precision:
        """A ``Precision`` from a path, dict, list, ``[L, 2]`` array, or None (W8A8)."""
        if spec is None:
            return cls(default=None, source="default W8A8")
        if isinstance(spec, Precision):
            return spec
        if isinstance(spec, (str, Path)):
            return cls._from_file(Path(spec))
        if isinstance(spec, np.ndarray):
            return cls._from_array(spec, "policy array")
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec, "precision config")
        if isinstance(spec, Sequence):
            return cls(ordered=[_entry(v, f"entry {i}") for i, v in enumerate(spec)], source="list")
        raise CimError(f"cannot read a precision from {type(spec).__name__}")

    @classmethod
    def _from_file(cls, path: Path) -> Precision:
        if not path.is_file():
            raise CimError(f"precision file {path} does not exist")
        if path.suffix == ".npy":
            # integers only: a policy is a few bit widths, never floats or pickles
            array = read_npy(path, "precision policy", kinds="iu", native=False)
            return cls._from_array(array, str(path))
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CimError(f"{path}: cannot parse precision config ({exc})") from None
        if isinstance(data, list):
            entries = [_entry(v, f"{path} entry {i}") for i, v in enumerate(data)]
            return cls(ordered=entries, source=str(path))
        if not isinstance(data, Mapping):
            raise CimError(f"{path}: expected a mapping or a list, got {type(data).__name__}")
        return cls._from_mapping(data, str(path))

    @classmethod
    def _from_mapping(cls, data: Mapping, source: str) -> Precision:
        default = None
        by_name = {}
        for name, value in data.items():
            if name == "default":
                default = _entry(value, f"{source}: default")
            else:
                by_name[str(name)] = _entry(value, f"{source}: operator {name!r}")
        return cls(by_name=by_name, default=default, source=source)

    @classmethod
    def _from_array(cls, array: np.ndarray, source: str) -> Precision:
        if array.ndim != 2 or array.shape[1] != 2 or not np.issubdtype(array.dtype, np.integer):
            raise CimError(
                f"{source}: a policy is an [L, 2] integer array, got {array.shape} {array.dtype}"
            )
        return cls(
            ordered=[_entry(row.tolist(), f"{source} row {i}") for i, row in enumerate(array)],
            source=source,
        )

    def resolve(self, names: Sequence[str]) -> dict[str, Bits | None]:
        """Bits per operator name, in offload order; None where nothing was specified.

        Raises
        ------
        CimError
            A name that is not an offloaded operator, or a list of the wrong length.
        """
        if self.ordered is not None:
            if len(self.ordered) != len(names):
                raise CimError(
                    f"{self.source}: {len(self.ordered)} entries for {len(names)} offloaded "
                    f"operators ({', '.join(names)})"
                )
            return dict(zip(names, self.ordered))
        unknown = [n for n in self.by_name if n not in names]
        if unknown:
            raise CimError(
                f"{self.source}: operator {unknown[0]!r} is not an offloaded operator; "
                f"known: {', '.join(names) or 'none'}"
            )
        return {n: self.by_name.get(n, self.default) for n in names}

    def to_dict(self, names: Sequence[str]) -> dict:
        """The resolved config as ``{name: {w_bits, a_bits}}`` (W8A8 where unspecified)."""
        return {n: (b or W8A8).to_dict() for n, b in self.resolve(names).items()}
