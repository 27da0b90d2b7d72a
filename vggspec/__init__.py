"""vggspec: a compiler from VGG-style network specs to PyTorch modules and ONNX graphs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError, ModelError, SpecError, SpecNotFoundError, VggspecError, WeightsError
from .version import __version__

if TYPE_CHECKING:
    import onnx
    import torch

    from .graph import LayerGraph

# The compiler (networkx, jinja2, onnx) loads on first use: the runtime path (`vggspec predict` of an
# .onnx file, `import vggspec.runtime`) runs on an edge box that has only vggspec's core and onnxruntime.
_LAZY = {"LayerGraph": ".graph", "build": ".graph", "fully_conv": ".graph", "load_spec": ".graph.load",
         "loads_spec": ".graph.load", "resolve_spec": ".resources", "parse": ".spec", "parse_file": ".spec",
         "ExportOptions": ".backends.onnx"}


def _graph(spec_or_graph: str | Path | LayerGraph) -> LayerGraph:
    from .graph import LayerGraph
    from .graph.load import load_spec

    return spec_or_graph if isinstance(spec_or_graph, LayerGraph) else load_spec(spec_or_graph)


def to_torch(spec_or_graph: str | Path | LayerGraph, **kwargs: Any) -> torch.nn.Module:
    """An instance of the generated PyTorch module for a spec (imports torch)."""
    from .backends.torch import to_torch as _to_torch

    return _to_torch(_graph(spec_or_graph), **kwargs)


def export_onnx(
    spec_or_graph: str | Path | LayerGraph, output: str | Path | None = None, **kwargs: Any
) -> onnx.ModelProto:
    """Build the ONNX graph of a spec, and write it atomically when `output` is given (no torch).

    kwargs: `weights=`, and `options=ExportOptions(...)` or its fields by keyword (`fully_conv=True`).
    """
    from .backends.onnx import export_onnx as _export

    return _export(_graph(spec_or_graph), output, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'vggspec' has no attribute {name!r}")


__all__ = [
    "DataError",
    "ExportOptions",
    "LayerGraph",
    "ModelError",
    "SpecError",
    "SpecNotFoundError",
    "VggspecError",
    "WeightsError",
    "__version__",
    "build",
    "export_onnx",
    "fully_conv",
    "load_spec",
    "loads_spec",
    "resolve_spec",
    "to_torch",
]
