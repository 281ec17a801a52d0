"""The ELF checks ``tvm-cim run`` makes before loading a library, on a real shared library
(the simulator's own extension module) and on copies edited the way a foreign, cut or
damaged file differs."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tvm_cim.compiler.library import LibraryError, check_elf
from tvm_cim.sim import _core

LIBRARY = Path(_core.__file__).read_bytes()


def _edited(offset: int, value: bytes) -> bytes:
    return LIBRARY[:offset] + value + LIBRARY[offset + len(value) :]


def test_a_shared_library_for_this_machine_passes():
    check_elf(LIBRARY, Path("core.so"))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not a library at all", "no ELF header"),
        (LIBRARY[:20], "malformed ELF headers"),
        (LIBRARY[:4096], "truncated"),
        (LIBRARY[:-1], "truncated"),
        (_edited(4, b"\x01"), "not one for this machine"),  # ELFCLASS32
        (_edited(5, b"\x02"), "not one for this machine"),  # big-endian
        (_edited(16, struct.pack("<H", 2)), "not a shared library"),  # ET_EXEC
        (_edited(18, struct.pack("<H", 183)), "built for EM_AARCH64"),
    ],
    ids=["text", "cut-header", "cut-4096", "cut-last-byte", "32-bit", "big-endian", "exec", "arm"],
)
def test_foreign_cut_or_damaged_libraries_are_refused(data, message):
    with pytest.raises(LibraryError, match=message):
        check_elf(data, Path("m.so"))
