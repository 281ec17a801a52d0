"""Writing files so that a reader never sees half of one.

``atomic_path`` hands out a temporary file beside the target; when the writer finishes,
the file is flushed to disk and renamed onto the target in one step, so a crash or a kill
leaves either the old file or the new one, never a truncated one. When the writer fails,
the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import glob
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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_temporaries(path: str | Path) -> None:
    """Remove the temporary files that writers of ``path`` killed mid-write left beside it
    (``atomic_path`` names them ``.<name>.<random><suffix>``). Only for a caller that
    knows no live process is writing ``path``."""
    path = Path(path)
    pattern = glob.escape(_temporary_prefix(path)) + "*" + glob.escape(path.suffix)
    for tmp in path.parent.glob(pattern):
        tmp.unlink(missing_ok=True)


def folder_problem(folder: str | Path) -> str:
    """Why files could not be written into ``folder`` (created if missing), or ``""``.

    The nearest existing folder on its path (``folder`` itself included) must be a folder
    this process may write in. Nothing is created.
    """
    folder = Path(folder).absolute()
    existing = next(f for f in (folder, *folder.parents) if f.exists() or f.is_symlink())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return ""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through; on success it replaces ``path``.

    The temporary file lies in the target's folder (created if missing), so the rename
    never crosses file systems, and keeps the target's suffix, for writers that choose
    the format by it (``np.save``, ``export_library``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=path.suffix)
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
