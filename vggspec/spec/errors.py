"""Located diagnostics for spec text: the only error type the spec package raises."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..error_root import VggspecError


def shorten(text: str, keep: int = 24) -> str:
    """A value quoted in a message: a 5,000-digit number or a 30,000-space line must not fill the screen."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Span:
    """A 1-based position in a source, and how many characters it covers."""

    line: int
    col: int
    length: int = 1


@dataclass(frozen=True)
class Diagnostic:
    """One problem in one spec, with enough context to print a caret under it."""

    path: str
    span: Span
    message: str
    source_line: str = ""
    hint: str | None = None

    def format(self) -> str:
        head = f"{self.path}:{self.span.line}:{self.span.col}: error: {self.message}"
        lines = [head]
        if self.source_line:
            lines.append("    " + self.source_line.rstrip("\n"))
            caret = " " * (self.span.col - 1) + "^" + "~" * max(0, self.span.length - 1)
            lines.append("    " + caret)
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class SpecError(VggspecError):
    """One or more diagnostics found in one spec; raised after collecting all of them. A VggspecError whose
    message is every diagnostic with its caret, and whose path is the spec's."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.format(), self.diagnostics[0].path if self.diagnostics else None)

    def format(self) -> str:
        return "\n".join(d.format() for d in self.diagnostics)

    def __str__(self) -> str:
        return self.format()


class DiagnosticSink:
    """Collects diagnostics against one source so a whole file is reported at once."""

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.lines = source.splitlines()
        self.diagnostics: list[Diagnostic] = []

    def error(self, span: Span, message: str, hint: str | None = None) -> None:
        text = self.lines[span.line - 1] if 0 < span.line <= len(self.lines) else ""
        self.diagnostics.append(Diagnostic(self.path, span, message, text, hint))

    def raise_if_any(self) -> None:
        if self.diagnostics:  # in reading order, whichever phase found them (the overrides' own file last)
            ordered = sorted(self.diagnostics, key=lambda d: (d.path != self.path, d.path, d.span.line, d.span.col))
            raise SpecError(ordered)
