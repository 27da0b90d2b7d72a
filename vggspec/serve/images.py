"""The image endpoint: image bytes in, the top-k with labels (and the heat map) out, through the same Runner
and protocols as `vggspec predict`, so one image gets the same posteriors either way.

The bytes go to a private scratch file that the Runner reads like predict reads a path (decoding and every
per-image bound of vggspec.imaging apply), named by nothing the client sent.
"""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.heatmap import check_cells, overlay_png, score_map
from ..runtime.protocols import PROTOCOLS, Protocol, Runner, default_flip, default_scales, top_k
from .oip import RequestError
from .registry import ServedModel

MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff",
               "application/octet-stream")
MAX_SCALES = 8  # test scales per request: each one is a pass (or 50 crops) of the network
MAX_TOPK = 1000


@dataclass(frozen=True)
class ClassifyParams:
    topk: int
    protocol: str
    scales: tuple[int, ...]
    flip: bool
    heatmap: bool

    @classmethod
    def parse(cls, query: Mapping[str, str], served: ServedModel) -> ClassifyParams:
        unknown = sorted(set(query) - {"topk", "protocol", "scales", "flip", "heatmap"})
        if unknown:
            raise RequestError(400, f"unknown query parameter '{_clean(unknown[0])}' (topk, protocol, scales, "
                                    "flip, heatmap)")
        models = served.models  # their own evaluation defaults, as predict's
        protocol = query.get("protocol") or ("dense" if served.members[0].dense is not None else "multi-crop")
        if protocol not in PROTOCOLS:
            raise RequestError(400, f"protocol must be one of {', '.join(PROTOCOLS)}")
        return cls(topk=_int(query.get("topk", "5"), "topk", 1, MAX_TOPK), protocol=protocol,
                   scales=_scales(query.get("scales"), models), flip=_flag(query, "flip", default_flip(models)),
                   heatmap=_flag(query, "heatmap", False))


def _int(text: str, name: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise RequestError(400, f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise RequestError(400, f"{name} must be from {low} to {high}")
    return value


def _scales(text: str | None, models: list[Any]) -> tuple[int, ...]:
    if text is None:
        return tuple(q for q in default_scales(models) if q is not None)
    parts = [p.strip() for p in text.split(",")]
    if not parts or len(parts) > MAX_SCALES or not all(parts):
        raise RequestError(400, f"scales must be 1 to {MAX_SCALES} comma-separated whole numbers, e.g. 256,384")
    return tuple(_int(p, "each scale", 1, 1_000_000) for p in parts)


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    text = query.get(name)
    if text is None:
        return default
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise RequestError(400, f"{name} must be true or false")


def _clean(text: str) -> str:
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 40 else text[:37] + "..."


def classify(served: ServedModel, params: ClassifyParams, image: bytes, scratch: Path, batch_size: int) -> dict:
    """Run one image (blocking: call it from a worker thread). ModelError/DataError when it cannot run."""
    fd, name = tempfile.mkstemp(dir=scratch, prefix="image-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(image)
        proto = Protocol(params.protocol, params.scales, params.flip)
        runner = Runner(served.members, [proto], batch_size)
        posterior = runner.run(name)[proto]
        info = runner.lead.info
        best = top_k(posterior, params.topk)
        flipped = proto.flip or any(mem.model(k).info.flip for mem in runner.members for k in proto.kinds)
        result: dict[str, Any] = {
            "model": served.name, "protocol": proto.name, "scales": list(proto.scales), "flip": flipped,
            "top": [{"index": i, "label": info.label(i), "probability": p} for i, p in best],
            "heatmap": None,
        }
        if params.heatmap:
            result["heatmap"] = _heatmap(served, name, max(params.scales), best[0][0])
        return result
    finally:
        os.unlink(name)


def _heatmap(served: ServedModel, path: str, q: int, index: int) -> dict[str, Any]:
    model = next((m for m in served.models if m.info.fully_conv and "scores" in m.info.outputs), None)
    if model is None:
        raise RequestError(400, "this model has no class score map (export it with --fully-conv --scores)")
    pixels, scores = score_map(model, path, q)  # type: ignore[arg-type]
    check_cells(scores, q, None)
    png = overlay_png(pixels, scores[index])
    return {"png": base64.b64encode(png).decode(), "label": model.info.label(index),
            "width": int(pixels.shape[1]), "height": int(pixels.shape[0])}
