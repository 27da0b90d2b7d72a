"""Untrusted text (class names, file names, messages quoting them) made safe where it is shown.

Labels come from spec files and models, file names from any folder: a name can hold terminal escape
sequences (colours, a cleared screen, a forged `error:` line after a carriage return) or begin like a
spreadsheet formula. Every command prints such text through `terminal`, and writes CSV cells through
`csv_cell`: one rule each, here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), and the Unicode bidirectional overrides that
# reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Cells a spreadsheet would read as a formula (OWASP's CSV injection rule): these first characters.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text: str | Path, keep_newlines: bool = False) -> str:
    """`text` with control characters shown as \\xNN escapes (and bytes that are not UTF-8 too), so that
    printing it cannot move the cursor, colour the terminal or start a line of its own. `keep_newlines`:
    for a message of several lines (an error and its hint), whose parts were escaped already."""
    text = str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string beginning with =, +, -, @, a tab or a carriage
    return gets a leading single quote (OWASP); other values are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
