"""Per-operator latency of every bit-width pair, from the compiler's static cost model.

A policy's latency is a sum over operators of ``table[operator, w_bits - 1, a_bits - 1]``,
each entry the latency ``tvm_cim.cost_report`` gives that operator (the number the
simulator reports for it). The model is partitioned once; one cost-only lowering per
``(w_bits, a_bits)`` pair, with every operator at that pair, fills the table: an
operator's latency depends only on its own widths.

The ``objective`` says which latency: ``makespan`` (the default) takes each operator's
share of the scheduled makespan, so that the sum is the total ``tvm-cim report`` prints
for the policy on a chip of many crossbars (layers run one after another, each reading
the one before, so the shares of a mixed policy add up as those of uniform ones);
``sequential`` takes the sum of its instructions' latencies. With ``crossbars=1`` and
free digital steps the two are the same number, CIM-AQ's.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tvm_cim.core.arch import CimArch
from tvm_cim.core.errors import CimError
from tvm_cim.core.files import atomic_path
from tvm_cim.core.precision import MAX_BITS, Bits

#: What a table's entries measure, and the ``OperatorReport`` field each comes from.
OBJECTIVES = {"makespan": "scheduled_us", "sequential": "latency_us"}
DEFAULT_OBJECTIVE = "makespan"

#: Feature names of an operator, in observation order.
FEATURES = (
    "is_conv",
    "in_channels",
    "out_channels",
    "kernel",
    "stride",
    "weight_count",
    "feature_map",
    "index",
    "crossbar_rows",
    "crossbar_cols",
    "tiles",
)


@dataclass(frozen=True)
class OperatorInfo:
    """What the search knows of one offloaded operator (crossbar figures at W8A8)."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: int  # kernel area (kh * kw); 1 for dense
    stride: int
    weight_count: int
    feature_map: int  # input positions (H * W); 1 for dense
    crossbar_rows: int
    crossbar_cols: int
    tiles: int

    @classmethod
    def from_report(cls, op) -> OperatorInfo:
        rows, cols = op.weight_shape
        if op.kind == "conv2d":
            channels = op.in_shape[1]
            in_hw = op.in_shape[2] * op.in_shape[3]
            stride = max(1, round(op.in_shape[2] / max(op.out_shape[2], 1)))
            kernel = rows // channels
        else:
            channels, in_hw, stride, kernel = rows, 1, 1, 1
        return cls(
            name=op.name,
            kind=op.kind,
            in_channels=int(channels),
            out_channels=int(cols),
            kernel=int(kernel),
            stride=int(stride),
            weight_count=int(rows * cols),
            feature_map=int(in_hw),
            crossbar_rows=int(op.crossbar_rows),
            crossbar_cols=int(op.crossbar_cols),
            tiles=int(op.tiles),
        )


class LatencyTable:
    """``[operator, w_bits - 1, a_bits - 1]`` latencies in microseconds for one model and arch.

    Attributes
    ----------
    operators
        The offloaded operators in offload order, with their features.
    latency_us
        float64 array of shape ``[len(operators), 8, 8]``.
    arch
        The architecture the table was computed for.
    objective
        What the entries measure (``OBJECTIVES``).
    """

    def __init__(
        self,
        operators: Sequence[OperatorInfo],
        latency_us: np.ndarray,
        arch: CimArch,
        objective: str = DEFAULT_OBJECTIVE,
    ):
        latency_us = np.asarray(latency_us, dtype=np.float64)
        if latency_us.shape != (len(operators), MAX_BITS, MAX_BITS):
            raise CimError(f"latency table of shape {latency_us.shape} for {len(operators)} ops")
        check_objective(objective)
        self.operators = list(operators)
        self.latency_us = latency_us
        self.arch = arch
        self.objective = objective

    @property
    def names(self) -> list[str]:
        return [op.name for op in self.operators]

    @classmethod
    def build(
        cls, mod, names=None, arch="rram-4b", progress=None, objective=DEFAULT_OBJECTIVE
    ) -> LatencyTable:
        """Fill the table from one partition of ``mod`` and 64 cost-only lowerings (about a
        second for small models). ``names`` are the operator names (see
        ``tvm_cim.compiler.frontend``)."""
        from tvm_cim.compiler.plan import plan_for_cim

        field = OBJECTIVES[check_objective(objective)]
        plan = plan_for_cim(mod, arch=CimArch.load(arch), names=names)
        base = plan.cost_report()
        if not base.operators:
            raise CimError("the model has no operator the crossbars can run")
        operators = [OperatorInfo.from_report(op) for op in base.operators]
        table = np.zeros((len(operators), MAX_BITS, MAX_BITS))
        for w in range(1, MAX_BITS + 1):
            for a in range(1, MAX_BITS + 1):
                report = plan.cost_report(plan.resolve({"default": [w, a]}))
                table[:, w - 1, a - 1] = [getattr(op, field) for op in report.operators]
                if progress is not None:
                    progress()
        return cls(operators, table, plan.arch, objective)

    @classmethod
    def for_model(
        cls, model, example_input, arch="rram-4b", objective=DEFAULT_OBJECTIVE
    ) -> LatencyTable:
        """The table of a PyTorch model (float or prepared), imported with ``torch.export``."""
        from tvm_cim.compiler.frontend import load_torch

        mod, names = load_torch(model, example_input)
        return cls.build(mod, names, arch, objective=objective)

    def latency(self, policy: Sequence[Bits]) -> float:
        """Latency in microseconds of ``policy`` (one ``Bits`` per operator)."""
        if len(policy) != len(self.operators):
            raise CimError(f"a policy of {len(policy)} layers for {len(self.operators)} operators")
        return float(
            sum(self.latency_us[i, b.w_bits - 1, b.a_bits - 1] for i, b in enumerate(policy))
        )

    def operator_latency(self, index: int, bits: Bits) -> float:
        return float(self.latency_us[index, bits.w_bits - 1, bits.a_bits - 1])

    def uniform_latency(self, bits: Bits) -> float:
        return self.latency([bits] * len(self.operators))

    def features(self) -> np.ndarray:
        """``[operators, len(FEATURES)]`` features, each min-max normalized to ``[0, 1]``
        (HAQ's normalization; a feature equal for every operator is 0). Counts are taken
        on a log scale first, so one large layer does not flatten the rest."""
        raw = []
        for i, op in enumerate(self.operators):
            values = dict(asdict(op), is_conv=float(op.kind == "conv2d"), index=float(i))
            raw.append([float(values[f]) for f in FEATURES])
        raw = np.array(raw)
        for j, name in enumerate(FEATURES):
            if name not in ("is_conv", "index", "stride"):
                raw[:, j] = np.log2(np.maximum(raw[:, j], 1.0))
        lo, hi = raw.min(axis=0), raw.max(axis=0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return ((raw - lo) / span).astype(np.float32)

    # ----------------------------------------------------------------- persistence

    def save(self, path) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f,
                latency_us=self.latency_us,
                operators=np.array([_to_json(asdict(op)) for op in self.operators]),
                arch=np.array(_to_json(self.arch.to_dict())),
                objective=np.array(self.objective),
            )
        return path

    @classmethod
    def load(cls, path) -> LatencyTable:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as blob:
                operators = [OperatorInfo(**json.loads(str(s))) for s in blob["operators"]]
                arch = CimArch.from_dict(json.loads(str(blob["arch"])))
                objective = str(blob["objective"]) if "objective" in blob.files else "sequential"
                return cls(operators, blob["latency_us"], arch, objective)
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise CimError(f"{path}: not a latency table ({type(exc).__name__}: {exc})") from None


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise CimError(
            f"unknown latency objective {objective!r}; expected one of {', '.join(OBJECTIVES)}"
        )
    return objective


def _to_json(value) -> str:
    return json.dumps(value, sort_keys=True)
