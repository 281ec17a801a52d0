"""``tvm-cim`` that SIGKILLs itself at one chosen point: the kill tests' search process.

Run as ``python killed_search.py search ...`` with ``CIM_TEST_KILL`` set to one point:

``eval:N``
    at the start of the N-th accuracy measurement of this process (mid-episode);
``measure:N``
    once the N-th batch of measurements is sent to the Dask cluster (``--workers``),
    while its tasks run;
``line:N``
    while the N-th log line of this process is written: half of it reaches the file;
``logged:N``
    right after the N-th log line of this process is written (an episode boundary);
``write:GLOB``
    while the first file whose name matches GLOB is written through ``atomic_path``:
    half of its temporary file is written, nothing is renamed;
``commit:N``
    at the N-th database commit of this process (the Optuna study being written).

The kill is ``SIGKILL`` from the process itself, at a point chosen exactly; without
``CIM_TEST_KILL`` the process is the plain command line. ``CIM_TEST_GRACE=S`` shortens
the heartbeat of a shared study's trials to a second and its grace period to ``S``
seconds (a test need not wait a minute for a dead process's trial to be failed).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _counter(limit: int):
    """A callable that kills the process on its ``limit``-th call."""
    calls = {"n": 0}

    def tick() -> None:
        calls["n"] += 1
        if calls["n"] == limit:
            _die()

    return tick


def _install(point: str) -> None:
    """Patch the one place ``point`` names (before the modules that use it are imported)."""
    event, _, arg = point.partition(":")
    if event == "write":
        from tvm_cim.core import files

        original = files.atomic_path

        @contextlib.contextmanager
        def atomic_path(path):
            with original(path) as tmp:
                yield tmp
                if fnmatch.fnmatch(Path(path).name, arg):
                    os.truncate(tmp, tmp.stat().st_size // 2)
                    _die()

        files.atomic_path = atomic_path
    elif event == "eval":
        from tvm_cim.agent.scoring import QatAccuracy

        tick, original_call = _counter(int(arg)), QatAccuracy.__call__

        def measuring(self, precision):
            tick()
            return original_call(self, precision)

        QatAccuracy.__call__ = measuring
    elif event == "measure":
        from distributed import Client

        tick, original_gather = _counter(int(arg)), Client.gather

        def gathering(self, *args, **kwargs):
            tick()
            return original_gather(self, *args, **kwargs)

        Client.gather = gathering
    elif event in ("line", "logged"):
        from tvm_cim.agent.log import EpisodeLog

        limit, calls, original_write = int(arg), {"n": 0}, EpisodeLog._write

        def writing(self, record):
            calls["n"] += 1
            if calls["n"] == limit and event == "line":
                import json

                line = json.dumps(record) + "\n"
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _die()
            original_write(self, record)
            if calls["n"] == limit:
                _die()

        EpisodeLog._write = writing
    elif event == "commit":
        from sqlalchemy import event as sa_event
        from sqlalchemy.engine import Engine

        tick = _counter(int(arg))
        sa_event.listen(Engine, "commit", lambda connection: tick())
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    if os.environ.get("CIM_TEST_GRACE"):
        from tvm_cim.agent import tpe

        tpe.HEARTBEAT_S, tpe.GRACE_S = 1, int(os.environ["CIM_TEST_GRACE"])
    if os.environ.get("CIM_TEST_KILL"):
        _install(os.environ["CIM_TEST_KILL"])
    from tvm_cim.cli.main import main

    sys.exit(main(sys.argv[1:]))
