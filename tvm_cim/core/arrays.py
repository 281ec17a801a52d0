"""Reading ``.npy`` and ``.npz`` files whose headers are checked before any data is read.

A file declares its arrays' shapes and dtypes in small headers; the data may be much
larger, or (in an ``.npz``) compressed far below its size. Every header is read and
checked first: a dtype that is not plain numbers (objects, which need pickles, complex,
strings, structured records) is refused, a declared size must fit the file (an ``.npy``)
or the member's uncompressed size (an ``.npz``), and all the data together must fit
:func:`array_limit`. Only then is anything loaded or decompressed, so a 128-byte file
that claims terabytes costs 128 bytes to refuse.

The limit is 2 GiB unless the environment variable ``TVM_CIM_MAX_ARRAY_BYTES`` says
otherwise (a number of bytes, with an optional ``K``/``M``/``G``/``T`` suffix).
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from tvm_cim.core.errors import CimError

#: The environment variable that sets how many bytes of array data a file may declare.
LIMIT_VARIABLE = "TVM_CIM_MAX_ARRAY_BYTES"
DEFAULT_LIMIT = 2 << 30
#: dtype kinds of plain numbers: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
#: Most bytes an .npy header may take (numpy's own default).
_MAX_HEADER = 10_000


class ArrayFileError(CimError):
    """An array file cannot be read, or declares data it may not hold."""


def parse_size(text: str, what: str) -> int:
    """``"2G"``, ``"512M"`` or ``"1000"`` as a number of bytes (at least 1).

    Raises
    ------
    CimError
        ``text`` is not such a size; the message names ``what``.
    """
    match = re.fullmatch(r"\s*(\d{1,20})\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    value = int(match[1]) * _UNITS[match[2].upper()] if match else 0
    if value < 1:
        raise CimError(f"{what}: {text[:40]!r} is not a size in bytes (such as 4G or 512M)")
    return value


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps one decimal readable."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 2**70 else "more than a million GiB"
    return f"{n} bytes"


def array_limit() -> int:
    """Bytes of array data one file may declare: ``TVM_CIM_MAX_ARRAY_BYTES`` or 2 GiB."""
    text = os.environ.get(LIMIT_VARIABLE, "")
    return parse_size(text, LIMIT_VARIABLE) if text.strip() else DEFAULT_LIMIT


def _header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The ``(shape, fortran_order, dtype)`` an ``.npy`` stream declares."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(f, max_header_size=_MAX_HEADER)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(f, max_header_size=_MAX_HEADER)
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise ArrayFileError(f"{where} is not a readable .npy array ({reason})") from None
    raise ArrayFileError(f"{where}: .npy format version {version} is not supported")


def _check_dtype(dtype: np.dtype, where: str, kinds: str, native: bool) -> None:
    """Refuse anything but plain numbers of ``kinds`` (and, if ``native``, byte order)."""
    if dtype.hasobject:
        raise ArrayFileError(f"{where} holds Python objects (a pickle), which are not read")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
        raise ArrayFileError(f"{where} is {dtype}; expected {_kind_names(kinds)}")
    if native and not dtype.isnative and dtype.itemsize > 1:
        raise ArrayFileError(
            f"{where} has byte order {dtype.str!r}, not this machine's: convert it with "
            "astype(dtype.newbyteorder('='))"
        )


def _kind_names(kinds: str) -> str:
    names = {"b": "bool", "i": "signed integers", "u": "unsigned integers", "f": "floats"}
    return ", ".join(names[k] for k in kinds)


def _declared_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(int(d) for d in shape) * dtype.itemsize


def _check_size(declared: int, available: int, where: str, limit: int) -> None:
    if declared > limit:
        raise ArrayFileError(
            f"{where} declares {format_size(declared)} of data, over the "
            f"{format_size(limit)} limit (set {LIMIT_VARIABLE} to raise it)"
        )
    if declared > available:
        raise ArrayFileError(
            f"{where} declares {declared} bytes of data but holds {max(available, 0)}: "
            "the file is truncated"
        )


def _read_checked(
    f: BinaryIO, size: int, where: str, kinds: str, native: bool, limit: int
) -> np.ndarray:
    """The array of the ``.npy`` stream ``f`` (``size`` bytes), headers checked first."""
    shape, _, dtype = _header(f, where)
    _check_dtype(dtype, where, kinds, native)
    _check_size(_declared_bytes(shape, dtype), size - f.tell(), where, limit)
    f.seek(0)
    try:
        array = npy_format.read_array(f, allow_pickle=False, max_header_size=_MAX_HEADER)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        raise ArrayFileError(f"{where} cannot be read ({reason})") from None
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _open(path: Path, what: str) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by the caller's with)
    except IsADirectoryError:
        raise ArrayFileError(f"{what}: {path} is a directory, not a file") from None
    except OSError as exc:
        raise ArrayFileError(f"cannot read {what} from {path}: {exc.strerror or exc}") from None


def _magic(f: BinaryIO, path: Path, what: str) -> bytes:
    try:
        head = f.read(len(_NPY_MAGIC))
        f.seek(0)
    except OSError as exc:  # a directory on some systems, a device
        raise ArrayFileError(f"cannot read {what} from {path}: {exc.strerror or exc}") from None
    return head


def read_npy(
    path: str | Path,
    what: str,
    *,
    kinds: str = NUMERIC_KINDS,
    native: bool = True,
    limit: int | None = None,
) -> np.ndarray:
    """The array of the ``.npy`` file ``path``, its header checked before its data.

    Parameters
    ----------
    path
        The file.
    what
        What the file is, for messages: ``"input 'x'"``, ``"precision policy"``.
    kinds
        The dtype kinds accepted (of ``"biuf"``).
    native
        Refuse a byte order other than this machine's (else convert it).
    limit
        Most bytes of data; None means :func:`array_limit`.

    Raises
    ------
    ArrayFileError
        One line naming the file and ``what``: unreadable, a directory, an ``.npz``
        archive, not ``.npy`` data, a refused dtype, truncated, or over the limit.
    """
    path = Path(path)
    limit = array_limit() if limit is None else limit
    with _open(path, what) as f:
        head = _magic(f, path, what)
        if head.startswith(_ZIP_MAGIC):
            raise ArrayFileError(f"{what}: {path} is an .npz archive, not an .npy file")
        size = os.fstat(f.fileno()).st_size
        return _read_checked(f, size, f"{what}: {path}", kinds, native, limit)


def read_npz(
    path: str | Path,
    what: str,
    *,
    kinds: str = NUMERIC_KINDS,
    native: bool = True,
    limit: int | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` file ``path`` by name, every member checked first.

    Each member's declared uncompressed size, and the header of the array it holds, are
    checked (as for :func:`read_npy`, with ``limit`` for all members together) before any
    member is decompressed.
    """
    path = Path(path)
    limit = array_limit() if limit is None else limit
    with _open(path, what) as f:
        try:
            archive = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise ArrayFileError(f"{what}: {path} is not a readable .npz archive ({exc})") from None
        with archive:
            members = _npz_members(archive, path, what, limit)
            for info in members:
                with _member(archive, info, path, what) as member:
                    where = f"{what}: {path} array {info.filename[:-4]!r}"
                    shape, _, dtype = _header(member, where)
                    _check_dtype(dtype, where, kinds, native)
                    _check_size(
                        _declared_bytes(shape, dtype), info.file_size - member.tell(), where, limit
                    )
            arrays = {}
            for info in members:
                with _member(archive, info, path, what) as member:
                    where = f"{what}: {path} array {info.filename[:-4]!r}"
                    arrays[info.filename[:-4]] = _read_checked(
                        member, info.file_size, where, kinds, native, limit
                    )
            return arrays


def _npz_members(archive: zipfile.ZipFile, path: Path, what: str, limit: int) -> list:
    """The archive's members, each an ``.npy``; their sizes together within ``limit``."""
    members = archive.infolist()
    names = set()
    for info in members:
        if not info.filename.endswith(".npy") or info.filename in names:
            raise ArrayFileError(
                f"{what}: {path} member {info.filename[:60]!r} is not one .npy array"
            )
        names.add(info.filename)
    total = sum(info.file_size for info in members)
    if total > limit:
        raise ArrayFileError(
            f"{what}: {path} holds {format_size(total)} uncompressed, over the "
            f"{format_size(limit)} limit (set {LIMIT_VARIABLE} to raise it)"
        )
    return members


def _member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, what: str):
    try:
        return archive.open(info)
    except (zipfile.BadZipFile, NotImplementedError, OSError, ValueError, RuntimeError) as exc:
        raise ArrayFileError(
            f"{what}: {path} member {info.filename[:60]!r} cannot be read ({exc})"
        ) from None


def read_arrays(
    path: str | Path,
    what: str,
    *,
    kinds: str = NUMERIC_KINDS,
    native: bool = True,
    limit: int | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npy`` file's array or an ``.npz`` file's arrays, as its first bytes say."""
    path = Path(path)
    with _open(path, what) as f:
        head = _magic(f, path, what)
    read = read_npz if head.startswith(_ZIP_MAGIC) else read_npy
    return read(path, what, kinds=kinds, native=native, limit=limit)
