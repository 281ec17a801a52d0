"""Writing files so that a reader never sees half of one.

``atomic_path`` hands out a temporary file beside the target; when the writer finishes,
the file is flushed to disk and renamed onto the target in one step, so a crash or a kill
leaves either the old file or the new one, never a truncated one. When the writer fails,
the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


def _default_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give (0o666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it replaces ``path``.

    The temporary file lies in the target's folder (created if missing), so the rename
    never crosses file systems, and keeps the target's suffix, for writers that choose
    the format by it (``np.save``, ``export_library``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with suppress(OSError):  # the rename itself, on file systems that need it
        _fsync(path.parent)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return write_bytes(path, text.encode())
