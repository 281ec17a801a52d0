"""Messages made one short line: what the command lines print, and what the compiler's
own errors quote from TVM, whose exceptions append the IR and metadata of a whole module.
"""

from __future__ import annotations

import re

#: Said where a message was cut; ``--verbose`` prints messages whole.
_SHORTENED = " ... (shortened; --verbose shows all)"


def one_line(message: object) -> str:
    """``message`` with its lines joined by single spaces (blank lines dropped)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def first_line(message: object) -> str:
    """The first non-blank line of ``message``: where TVM and most libraries say what went
    wrong, before the IR, the context or the traceback they append."""
    return next((part.strip() for part in str(message).splitlines() if part.strip()), "")


#: What TVM's messages embed that says nothing to a user, and what replaces it.
_TVM_NOISE = (
    (re.compile(r"#\s*Metadata omitted\.[^\n]*?show it\."), ""),
    (re.compile(r'metadata\["[^"]*"\]\[\d+\]'), "a constant"),
    (re.compile(r'ir\.Op\(.*?name="([^"]+)".*?support_level=\d+\)', re.DOTALL), r"\1"),
    (re.compile(r"T\.int64\((-?\d+)\)"), r"\1"),
    (re.compile(r"R\.shape\((\[[^\]]*\])\)"), r"\1"),
)
#: Where the IR text TVM appends to a message begins.
_TVM_IR_START = re.compile(
    r"^\s*(metadata\s*=|# from tvm\.script|@I\.ir_module|@R\.function)", re.M
)


def tvm_message(exc: BaseException, limit: int = 140) -> str:
    """What a TVM exception says, as one short line: the IR text and metadata it appends
    dropped, constants and operators named briefly, at most ``limit`` characters."""
    text = str(exc)
    start = _TVM_IR_START.search(text)
    if start is not None:
        text = text[: start.start()]
    for pattern, replacement in _TVM_NOISE:
        text = pattern.sub(replacement, text)
    text = " ".join(one_line(text).split()) or type(exc).__name__
    return shorten(text, limit)


def shorten(text: str, limit: int) -> str:
    """``text`` itself when at most ``limit`` characters, else its start and a note."""
    if len(text) <= limit:
        return text
    return text[: max(limit - len(_SHORTENED), 0)].rstrip() + _SHORTENED
