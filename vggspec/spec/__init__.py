"""The spec language: text in, syntax tree out. Knows nothing after the text."""

from __future__ import annotations

from pathlib import Path

from .errors import Diagnostic, DiagnosticSink, Span, SpecError
from .parser import parse
from .syntax import Header, HeaderEntry, LayerToken, SpecTree

__all__ = [
    "Diagnostic",
    "DiagnosticSink",
    "Header",
    "HeaderEntry",
    "LayerToken",
    "Span",
    "SpecError",
    "SpecTree",
    "decode",
    "parse",
    "parse_file",
]

MAX_SPEC_BYTES = 1 << 20


def decode(data: bytes, path: str) -> str:
    """Bytes to text, or a located SpecError naming the first byte that is not UTF-8."""
    sink = DiagnosticSink(path, "")
    if len(data) > MAX_SPEC_BYTES:
        sink.error(Span(1, 1), f"spec is {len(data)} bytes; specs are limited to {MAX_SPEC_BYTES}")
        sink.raise_if_any()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        sink.error(
            Span(line, col), f"file is not UTF-8 text (byte 0x{data[exc.start]:02x})", "save the spec as UTF-8 text"
        )
        sink.raise_if_any()
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        sink.error(Span(line, 1), "file is binary, not a text spec (it contains NUL bytes)")
        sink.raise_if_any()
    return text


def parse_file(path: str | Path, overrides: tuple[str, ...] = ()) -> SpecTree:
    """Read and parse one spec file."""
    path = Path(path)
    return parse(decode(path.read_bytes(), str(path)), str(path), overrides, keep_going=True)
