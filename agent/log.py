"""The episode log of a search: one JSON object per line, written as each episode ends.

The first line is a header naming the search (model, dataset, arch, strategy, seed, the
constraints and the reward); ``reference`` lines hold the uniform points (W8A8, W6A6,
W4A4); ``episode`` lines one scored policy each, with its index and wall time. Every
line is flushed and synced before the search goes on, so a search killed mid-way loses
at most the episode it was computing. ``--resume`` reads the log back, refuses one that
belongs to another search or does not parse, and hands its records to the replay. A
last line without its newline that does not parse is what a kill mid-write leaves: the
resume drops it with a warning (the file is rewritten without it, atomically) and the
episode is played again; a line that does not parse anywhere else is an error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tvm_cim.core import files
from tvm_cim.core.errors import CimError

from .scoring import Outcome, policy_from_list

#: Header keys that must match for ``--resume`` (the budget may grow).
IDENTITY = (
    "model",
    "dataset",
    "arch",
    "strategy",
    "seed",
    "workers",
    "space",
    "reward",
    "evaluation",
)


def _outcome(record: dict) -> Outcome:
    return Outcome(
        policy_from_list(record["policy"]),
        float(record["latency_us"]),
        float(record["accuracy"]),
        float(record["reward"]),
    )


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _parse(line: str) -> dict:
    """One log record; ``ValueError``, ``KeyError`` or ``TypeError`` if it is not one."""
    record = json.loads(line)
    if not isinstance(record, dict) or "type" not in record:
        raise ValueError("not a log record")
    if record["type"] in ("episode", "reference"):
        _outcome(record)
    return record


def _scan(path: Path, torn_ok: bool) -> tuple[list[dict], int | None, bytes]:
    """The records of a log, the byte offset of a torn last line (None if there is none;
    with ``torn_ok`` only) and the file's bytes; a line that does not parse is an error
    naming it."""
    data = path.read_bytes()
    records, torn, offset = [], None, 0
    lines = data.splitlines(keepends=True)
    for number, raw in enumerate(lines, 1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            records.append(_parse(raw.decode("utf-8")))
        except (ValueError, KeyError, TypeError) as exc:
            if torn_ok and number == len(lines) and not raw.endswith(b"\n"):
                torn = start
                continue
            raise CimError(
                f"{path}:{number}: corrupt search log ({exc}); repair or remove the line to resume"
            ) from None
    return records, torn, data


def _check_identity(path: Path, records: list[dict], header: dict) -> None:
    """The log ``records`` must begin with a header naming the search ``header`` names."""
    stored = records[0]
    if stored.get("type") != "header":
        raise CimError(f"{path}: corrupt search log (no header line)")
    differ = [k for k in IDENTITY if stored.get(k) != header.get(k)]
    if differ:
        detail = ", ".join(f"{k}: {stored.get(k)!r} != {header.get(k)!r}" for k in differ)
        raise CimError(f"{path} belongs to another search ({detail})")


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
    warn
        Receives the warning about a dropped torn last line (default: stderr).
    """

    def __init__(
        self, path, header: dict, resume: bool = False, warn: Callable[[str], None] | None = None
    ):
        self.path = Path(path)
        self.header = dict(header, type="header")
        self.episodes: list[Outcome] = []
        self.references: dict[str, Outcome] = {}
        self._warn = warn or _warn
        self.check_absent(self.path, resume)
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._repair()
        if self.path.is_file() and self.path.stat().st_size > 0:
            self._read()
        else:
            files.write_text(self.path, json.dumps(self.header) + "\n")

    @staticmethod
    def check_absent(path, resume: bool) -> None:
        """Without ``resume``, refuse a log that already holds a search."""
        path = Path(path)
        if not resume and path.is_file() and path.stat().st_size > 0:
            raise CimError(
                f"{path} already holds a search; pass --resume to continue it or choose "
                "another --out"
            )

    @staticmethod
    def read_records(path, torn_ok: bool = False) -> list[dict]:
        """All records of a log; a line that does not parse is an error naming it (a torn
        last line is left out if ``torn_ok``)."""
        path = Path(path)
        records, _, _ = _scan(path, torn_ok)
        if not records or records[0]["type"] != "header":
            raise CimError(f"{path}: corrupt search log (no header line)")
        return records

    def _repair(self) -> None:
        """Drop a torn last line, and end a complete last line that lacks its newline."""
        records, torn, data = _scan(self.path, torn_ok=True)
        if torn is not None:
            self._warn(
                f"warning: {self.path}: dropped a torn last line (a search killed while "
                f"writing it); {len(records)} records kept"
            )
            files.write_bytes(self.path, data[:torn])
        elif data and not data.endswith(b"\n"):
            files.write_bytes(self.path, data + b"\n")

    @classmethod
    def check(cls, path, header: dict, resume: bool) -> None:
        """Refuse, writing nothing, a log this search may not continue: one that already
        holds a search (without ``resume``), belongs to another search or does not parse
        (a torn last line excepted: the resume drops it)."""
        path = Path(path)
        cls.check_absent(path, resume)
        if path.is_file() and path.stat().st_size > 0:
            records, _, _ = _scan(path, torn_ok=True)
            if records:
                _check_identity(path, records, header)

    def _read(self) -> None:
        records = self.read_records(self.path)
        _check_identity(self.path, records, self.header)
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
