"""Typed errors. Library code raises these; only the CLI turns them into messages and exit codes."""

from __future__ import annotations

from .error_root import VggspecError
from .spec.errors import Diagnostic, SpecError


class SpecNotFoundError(VggspecError):
    """No file and no shipped spec of that name."""


class ModelError(VggspecError):
    """A graph or an ONNX model that cannot do what was asked."""


class WeightsError(VggspecError):
    """Weights whose names, shapes or format do not match the spec."""


class DataError(VggspecError):
    """An image, a data folder or a label file that cannot be used."""


class PassError(VggspecError, ValueError):
    """A graph pass cannot apply to this graph (say, an input too small for the dense form). Still a
    ValueError, as it was before it joined the root, for callers that catch that."""


__all__ = ["DataError", "Diagnostic", "ModelError", "PassError", "SpecError", "SpecNotFoundError", "VggspecError",
           "WeightsError"]
