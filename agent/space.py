"""What a precision search may choose, and how a finished policy is scored.

``SearchSpace`` holds the constraints (bit ranges, weight bits as multiples of the cell
bits, the first and last operator pinned to W8A8) and turns them into the lists of
choices each decision draws from. ``Reward`` is CIM-AQ's reward by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tvm_cim.core.errors import CimError
from tvm_cim.core.precision import MAX_BITS, W8A8, Bits

#: QAT quantizes weights symmetrically: one bit leaves only the code 0.
MIN_WEIGHT_BITS = 2


@dataclass(frozen=True)
class SearchSpace:
    """Constraints on per-operator bit widths.

    Attributes
    ----------
    min_w_bits, max_w_bits
        Weight widths allowed (at least 2: symmetric weights).
    min_a_bits, max_a_bits
        Activation widths allowed.
    weight_multiple_of_cell
        Weight widths only in whole cells (multiples of the arch's ``cell_bits``).
    pin_first_last
        The first and last operators stay at W8A8 and are not searched (CIM-AQ's option;
        off by default because the small models' first layer carries half the latency).
    """

    min_w_bits: int = 2
    max_w_bits: int = 8
    min_a_bits: int = 2
    max_a_bits: int = 8
    weight_multiple_of_cell: bool = False
    pin_first_last: bool = False

    def __post_init__(self):
        for name in ("min_w_bits", "max_w_bits", "min_a_bits", "max_a_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise CimError(f"{name} must be an integer, got {value!r}")
            if not 1 <= value <= MAX_BITS:
                raise CimError(f"{name} must be in 1..{MAX_BITS}, got {value}")
        if self.min_w_bits < MIN_WEIGHT_BITS:
            raise CimError(f"min_w_bits must be at least {MIN_WEIGHT_BITS} (symmetric weights)")
        if self.min_w_bits > self.max_w_bits:
            raise CimError(f"min_w_bits {self.min_w_bits} > max_w_bits {self.max_w_bits}")
        if self.min_a_bits > self.max_a_bits:
            raise CimError(f"min_a_bits {self.min_a_bits} > max_a_bits {self.max_a_bits}")

    def weight_choices(self, cell_bits: int) -> list[int]:
        """Allowed weight widths, ascending; refuses constraints that leave none."""
        bits = range(self.min_w_bits, self.max_w_bits + 1)
        if self.weight_multiple_of_cell:
            bits = [b for b in bits if b % cell_bits == 0]
        if not bits:
            raise CimError(
                f"no weight width in {self.min_w_bits}..{self.max_w_bits} is a multiple of "
                f"the cell's {cell_bits} bits"
            )
        return list(bits)

    def activation_choices(self) -> list[int]:
        return list(range(self.min_a_bits, self.max_a_bits + 1))

    def searched(self, count: int) -> list[int]:
        """Indices of the operators the search chooses bits for."""
        if self.pin_first_last:
            if count <= 2:
                raise CimError(
                    f"pinning the first and last operators leaves none of {count} to search"
                )
            return list(range(1, count - 1))
        return list(range(count))

    def pinned(self) -> Bits:
        return W8A8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Reward:
    """The reward of a finished policy (CIM-AQ's by default).

    With ``target = reference_accuracy - max_acc_drop`` and ``ratio = latency / latency
    at W8A8``: below the target ``-penalty * (target - accuracy)``; otherwise
    ``latency_gain * (1 / ratio - 1) + accuracy_bonus * (accuracy - target)``.

    Attributes
    ----------
    max_acc_drop
        Accuracy points the policy may lose against W8A8.
    penalty
        Reward per point below the target.
    latency_gain
        Reward per unit of ``1 / ratio - 1`` (speedup minus one).
    accuracy_bonus
        Reward per point above the target.
    """

    max_acc_drop: float = 0.1
    penalty: float = 10.0
    latency_gain: float = 100.0
    accuracy_bonus: float = 0.1

    def __post_init__(self):
        if not self.max_acc_drop >= 0:
            raise CimError(f"max_acc_drop must be >= 0 points, got {self.max_acc_drop}")

    def __call__(self, accuracy: float, reference_accuracy: float, latency_ratio: float) -> float:
        target = reference_accuracy - self.max_acc_drop
        if accuracy < target:
            return -self.penalty * (target - accuracy)
        return self.latency_gain * (1.0 / latency_ratio - 1.0) + self.accuracy_bonus * (
            accuracy - target
        )

    def to_dict(self) -> dict:
        return asdict(self)
