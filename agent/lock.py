"""One search per output directory at a time: an OS lock held for the whole run.

The lock is ``fcntl.flock`` on ``<out>/search.lock``: the kernel releases it when the
holder exits, however it exits, so a killed search never leaves a stale lock. The file
holds the holder's PID for the error message of the search that finds it taken.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tvm_cim.core.errors import CimError

LOCK_NAME = "search.lock"


@contextmanager
def hold_directory(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s search lock while the block runs.

    Raises
    ------
    CimError
        Another process holds it (the message names its PID).
    """
    path = Path(folder) / LOCK_NAME
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise CimError(
                f"{folder} is in use by another search (pid {holder}); wait for it to end "
                "or choose another --out"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # closing the file releases the lock
