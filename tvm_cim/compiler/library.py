"""Compiled libraries checked before they are loaded.

A library from ``tvm-cim compile`` is native code: loading a truncated file kills the
process with SIGBUS, and loading a replaced one runs whatever it holds. So ``compile``
writes a digest file beside the library (``OUT.so.json``: size, SHA-256, the tvm-cim
version and the model's inputs), and ``run`` checks, before anything is loaded: that the
library is a regular file, that its ELF header is a shared library for this machine (class,
byte order, architecture) whose headers and segments lie inside the file, and that its
size and digest match the digest file. The checked bytes are then loaded from a private
copy, so a file changed after the check cannot be the one that runs. A check only says the
file is the one ``compile`` wrote; it runs with the user's rights all the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import struct
import sys
import tempfile
from pathlib import Path

from tvm_cim.core.errors import CimError

#: The digest file of ``m.so`` is ``m.so.json``.
DIGEST_SUFFIX = ".json"
#: ``format`` of a digest file.
DIGEST_FORMAT = "tvm-cim-library"
#: Largest digest file read: it holds a few numbers and the model's input shapes.
MAX_DIGEST_BYTES = 1 << 20

#: ELF ``e_machine`` (as pyelftools names it) of the machines ``platform.machine()`` names.
_ELF_MACHINES = {
    "x86_64": "EM_X86_64",
    "amd64": "EM_X86_64",
    "aarch64": "EM_AARCH64",
    "arm64": "EM_AARCH64",
    "riscv64": "EM_RISCV",
    "ppc64le": "EM_PPC64",
    "ppc64": "EM_PPC64",
    "s390x": "EM_S390",
    "i386": "EM_386",
    "i686": "EM_386",
    "armv7l": "EM_ARM",
}


class LibraryError(CimError):
    """A library or its digest file is missing, truncated, changed or foreign."""


def digest_path(library: str | Path) -> Path:
    """The digest file beside ``library``."""
    library = Path(library)
    return library.with_name(library.name + DIGEST_SUFFIX)


def digest_record(data: bytes, inputs: list[dict]) -> dict:
    """What the digest file of a library holding ``data`` says; ``inputs`` are the model's
    inputs as ``{"name", "shape", "dtype"}``."""
    from tvm_cim import __version__

    return {
        "format": DIGEST_FORMAT,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "tvm_cim": __version__,
        "machine": platform.machine(),
        "inputs": inputs,
    }


def read_digest(library: str | Path) -> dict | None:
    """The digest file of ``library``, None when there is none.

    Raises
    ------
    LibraryError
        The digest file cannot be read or is not one ``tvm-cim compile`` writes.
    """
    path = digest_path(library)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_DIGEST_BYTES + 1)
    except OSError as exc:
        raise LibraryError(f"cannot read digest file {path}: {exc.strerror or exc}") from None
    if len(text) > MAX_DIGEST_BYTES:
        raise LibraryError(f"digest file {path} is over {MAX_DIGEST_BYTES} bytes")
    try:
        record = json.loads(text)
    except (ValueError, RecursionError):  # also a huge integer, deep nesting, bad UTF-8
        raise LibraryError(f"digest file {path} is not valid JSON") from None
    if not _valid_record(record):
        raise LibraryError(f"digest file {path} is not a tvm-cim library digest")
    return record


def _valid_record(record) -> bool:
    if not isinstance(record, dict) or record.get("format") != DIGEST_FORMAT:
        return False
    size, digest, inputs = record.get("size"), record.get("sha256"), record.get("inputs")
    if type(size) is not int or size < 0 or not isinstance(digest, str) or len(digest) != 64:
        return False
    if not isinstance(inputs, list):
        return False
    for spec in inputs:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return False
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return False
        if not isinstance(spec.get("dtype"), str):
            return False
    return True


# ---------------------------------------------------------------------- ELF


def _host_elf() -> tuple[str, str, str | None]:
    """(ELF class, data encoding, e_machine name or None when unknown) of this machine, as
    pyelftools names them."""
    elf_class = "ELFCLASS64" if struct.calcsize("P") == 8 else "ELFCLASS32"
    encoding = "ELFDATA2LSB" if sys.byteorder == "little" else "ELFDATA2MSB"
    return elf_class, encoding, _ELF_MACHINES.get(platform.machine().lower())


def check_elf(data: bytes, path: Path) -> None:
    """Check that ``data`` is a shared library for this machine whose program headers,
    loaded segments, section headers and sections all lie inside the file (pyelftools
    reads the headers).

    Raises
    ------
    LibraryError
        Naming ``path`` and what is wrong.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if data[:4] != b"\x7fELF":
        raise LibraryError(f"library {path} is not a shared library (no ELF header)")
    try:
        elf = ELFFile(io.BytesIO(data))
        header = elf.header
        host_class, host_encoding, host_machine = _host_elf()
        kind = (header.e_ident["EI_CLASS"], header.e_ident["EI_DATA"])
        if kind != (host_class, host_encoding):
            raise LibraryError(
                f"library {path} is a {kind[0]}/{kind[1]} library, not one for this machine"
            )
        ends = [header.e_phoff + header.e_phentsize * header.e_phnum]
        if header.e_shoff:
            ends.append(header.e_shoff + header.e_shentsize * header.e_shnum)
        if max(ends) > len(data):
            raise LibraryError(
                f"library {path} is truncated: its headers need {max(ends)} bytes, "
                f"it has {len(data)}"
            )
        if header.e_type != "ET_DYN":
            raise LibraryError(f"library {path} is an ELF file but not a shared library")
        if host_machine is not None and header.e_machine != host_machine:
            raise LibraryError(
                f"library {path} is built for {header.e_machine}, not {platform.machine()}"
            )
        for segment in elf.iter_segments("PT_LOAD"):
            ends.append(segment["p_offset"] + segment["p_filesz"])
        for section in elf.iter_sections():
            if section["sh_type"] != "SHT_NOBITS":
                ends.append(section["sh_offset"] + section["sh_size"])
    except ELFError as exc:  # pyelftools' parse errors, headers cut short among them
        raise LibraryError(f"library {path} has malformed ELF headers ({exc})"[:160]) from None
    if max(ends) > len(data):
        raise LibraryError(
            f"library {path} is truncated: its contents need {max(ends)} bytes, it has {len(data)}"
        )


# ---------------------------------------------------------------------- checking and loading


def checked_library(path: str | Path, *, use_digest: bool = True) -> tuple[bytes, dict | None]:
    """The bytes of the library ``path`` and its digest record, checked (see the module
    docstring); with ``use_digest=False`` no digest file is needed nor read.

    Raises
    ------
    LibraryError
        The library is missing, not a regular file, not a shared library for this machine,
        truncated, or does not match its digest file; or there is no digest file.
    """
    path = Path(path)
    if not path.exists():
        raise LibraryError(f"library {path} does not exist")
    if not path.is_file():
        raise LibraryError(f"library {path} is not a file")
    record = read_digest(path) if use_digest else None
    if use_digest and record is None:
        raise LibraryError(
            f"library {path} has no digest file {digest_path(path).name} beside it: copy it "
            "with the library, or pass --no-digest"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LibraryError(f"cannot read library {path}: {exc.strerror or exc}") from None
    if record is not None and len(data) != record["size"]:
        raise LibraryError(
            f"library {path} has {len(data)} bytes, its digest file says {record['size']}: "
            "truncated or replaced"
        )
    check_elf(data, path)
    if record is not None and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise LibraryError(f"library {path} does not match its digest file: changed or replaced")
    return data, record


def load_library(path: str | Path, data: bytes):
    """Load the checked bytes ``data`` of the library ``path`` as a TVM module, from a
    private copy.

    Raises
    ------
    LibraryError
        TVM cannot load it (a shared library, but not one ``tvm-cim compile`` wrote).
    """
    import tvm

    with tempfile.TemporaryDirectory(prefix="tvm-cim-library-") as folder:
        copy = Path(folder) / "library.so"
        copy.write_bytes(data)
        try:
            return tvm.runtime.load_module(str(copy))
        except Exception as exc:  # TVM raises its own error types for foreign libraries
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            reason = reason.replace(str(copy), "it")
            raise LibraryError(f"cannot load library {path}: {reason[:100]}") from None
