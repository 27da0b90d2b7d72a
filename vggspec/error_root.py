"""The one root of every error a user sees: `except VggspecError` catches them all.

A leaf of its own (standard library only) so that the spec package, which imports nothing else of vggspec,
can root SpecError here too; vggspec.errors re-exports it with the other types.
"""

from __future__ import annotations


class VggspecError(Exception):
    """An error a user can act on: a message, optionally the file it concerns and a hint."""

    def __init__(self, message: str, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.path, self.hint = message, path, hint

    def format(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}error: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text
