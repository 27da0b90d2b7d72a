"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations

from .spec.errors import Diagnostic, SpecError


class VggspecError(Exception):
    """An error a user can act on: a message, optionally the file it concerns and a hint."""

    def __init__(self, message: str, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message, self.path, self.hint = message, path, hint

    def format(self) -> str:
        where = f"{self.path}: " if self.path else ""
        text = f"{where}error: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class SpecNotFoundError(VggspecError):
    """No file and no shipped spec of that name."""


class ModelError(VggspecError):
    """A graph or an ONNX model that cannot do what was asked."""


class WeightsError(VggspecError):
    """Weights whose names, shapes or format do not match the spec."""


class DataError(VggspecError):
    """An image, a data folder or a label file that cannot be used."""


__all__ = ["DataError", "Diagnostic", "ModelError", "SpecError", "SpecNotFoundError", "VggspecError", "WeightsError"]


class PassError(ValueError):
    """A graph pass cannot apply to this graph (say, an input too small for the dense form)."""
