"""`vggspec serve`: a long-running server for exported models, speaking the Open Inference Protocol (KServe v2
REST, as Triton implements it) with dynamic batching, an image endpoint, Prometheus metrics and a page.

Torch-free, like the runtime it calls (Starlette + uvicorn, the `serve` extra):

    from vggspec.serve import Entry, LoadOptions, Registry, Settings, create_app
    registry = Registry([Entry.parse("scenes=d_dense.onnx")], LoadOptions())
    app = create_app(registry, Settings())       # any ASGI server runs it; `vggspec serve` uses uvicorn
"""

from __future__ import annotations

from .app import Settings, create_app
from .metrics import Metrics
from .registry import Entry, LoadOptions, Registry

__all__ = ["Entry", "LoadOptions", "Metrics", "Registry", "Settings", "create_app"]
