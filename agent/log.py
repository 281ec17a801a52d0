"""The episode log of a search: one JSON object per line, written as each episode ends.

The first line is a header naming the search (model, dataset, arch, strategy, seed, the
constraints and the reward); ``reference`` lines hold the uniform points (W8A8, W6A6,
W4A4); ``episode`` lines one scored policy each, with its index and wall time. Every
line is flushed and synced before the search goes on, so a search killed mid-way loses
at most the episode it was computing. ``--resume`` reads the log back, refuses one that
belongs to another search or does not parse, and hands its records to the replay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tvm_cim.core.errors import CimError

from .scoring import Outcome, policy_from_list

#: Header keys that must match for ``--resume`` (the budget may grow).
IDENTITY = ("model", "dataset", "arch", "strategy", "seed", "space", "reward", "evaluation")


def _outcome(record: dict) -> Outcome:
    return Outcome(
        policy_from_list(record["policy"]),
        float(record["latency_us"]),
        float(record["accuracy"]),
        float(record["reward"]),
    )


class EpisodeLog:
    """Append-only JSONL log of one search.

    Parameters
    ----------
    path
        The ``.jsonl`` file.
    header
        The search's identity (``IDENTITY`` keys and anything else worth keeping).
    resume
        Continue an existing log; without it an existing, non-empty log is an error.
    """

    def __init__(self, path, header: dict, resume: bool = False):
        self.path = Path(path)
        self.header = dict(header, type="header")
        self.episodes: list[Outcome] = []
        self.references: dict[str, Outcome] = {}
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if exists and not resume:
            raise CimError(
                f"{self.path} already holds a search; pass --resume to continue it or "
                "choose another --out"
            )
        if exists:
            self._read()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            self._write(self.header)

    @staticmethod
    def read_records(path) -> list[dict]:
        """All records of a log; a line that does not parse is an error naming it."""
        path = Path(path)
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or "type" not in record:
                        raise ValueError("not a log record")
                    if record["type"] in ("episode", "reference"):
                        _outcome(record)
                except (ValueError, KeyError, TypeError) as exc:
                    raise CimError(
                        f"{path}:{number}: corrupt search log ({exc}); repair or remove the "
                        "line to resume"
                    ) from None
                records.append(record)
        if not records or records[0]["type"] != "header":
            raise CimError(f"{path}: corrupt search log (no header line)")
        return records

    def _read(self) -> None:
        records = self.read_records(self.path)
        stored = records[0]
        differ = [k for k in IDENTITY if stored.get(k) != self.header.get(k)]
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} != {self.header.get(k)!r}" for k in differ)
            raise CimError(f"{self.path} belongs to another search ({detail})")
        for record in records[1:]:
            if record["type"] == "reference":
                self.references[record["name"]] = _outcome(record)
            elif record["type"] == "episode":
                if record.get("index") != len(self.episodes):
                    raise CimError(
                        f"{self.path}: corrupt search log (episode {record.get('index')!r} "
                        f"where {len(self.episodes)} was expected)"
                    )
                self.episodes.append(_outcome(record))

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_reference(self, name: str, outcome: Outcome) -> None:
        if name not in self.references:
            self.references[name] = outcome
            self._write({"type": "reference", "name": name, **outcome.to_dict()})

    def add_episode(self, outcome: Outcome, seconds: float) -> None:
        record = {"type": "episode", "index": len(self.episodes), **outcome.to_dict()}
        record["seconds"] = round(seconds, 4)
        self.episodes.append(outcome)
        self._write(record)
