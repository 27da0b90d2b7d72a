"""How much memory one dense pass of an image takes: the network's activations at that input size.

The pixel limit (imaging.MAX_PIXELS) bounds the decoded image, not what the network makes of it: a
dense pass holds, at its peak, a convolution's input and output maps, each `channels / stride**2` floats
per input pixel. For VGG that is the first stage: 64 + 64 floats, 512 bytes per pixel, twice that with
the mirror image. The widths and strides are read from the ONNX graph's Conv and pooling nodes (with
onnx, when it is installed), otherwise assumed to be VGG's first stage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# What a 4 GB edge box can give one image's activations, with the model's weights (D: 550 MB), Python and
# the decoded image beside them. `--max-memory` raises it.
DEFAULT_MAX_MEMORY = 1_500_000_000
# Floats per input pixel at the peak when the graph cannot be read: VGG's first stage (64 channels in and out
# of conv1_2), the widest of the paper's configurations at full resolution.
FALLBACK_FLOATS_PER_PIXEL = 128.0
FLOAT_BYTES = 4
_POOLS = {"MaxPool", "AveragePool", "LpPool"}
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """`1.5G`, `800M`, `2000000000` -> bytes (powers of 1000; a trailing B is optional). ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)b?\s*", text.lower())
    if not match:
        raise ValueError(f"'{text}' is not a size; give e.g. 1.5G, 800M")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value < 1e6 or value > 1e15:
        raise ValueError(f"'{text}' is outside 1M..1000T")
    return int(value)


def shown_size(size: float) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.0f} MB"


def floats_per_pixel(path: str | Path) -> float:
    """The peak floats held per input pixel by one pass of the model at `path` (see the module's note)."""
    try:
        import onnx
    except ImportError:
        return FALLBACK_FLOATS_PER_PIXEL
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # unreadable as a protobuf here, though onnxruntime took it: assume VGG's widths
        return FALLBACK_FLOATS_PER_PIXEL
    return graph_floats_per_pixel(model.graph) or FALLBACK_FLOATS_PER_PIXEL


def graph_floats_per_pixel(graph: Any) -> float:
    """max over Conv nodes of (in channels / in stride**2 + out channels / out stride**2); 0 with no Conv.

    Strides are followed through the graph (nodes are in topological order): a Conv or pooling node
    multiplies its input's stride by its own, every other node keeps the largest of its inputs'."""
    dims = {t.name: list(t.dims) for t in graph.initializer}
    stride: dict[str, int] = {i.name: 1 for i in graph.input if i.name not in dims}
    peak = 0.0
    for node in graph.node:
        s_in = max((stride[n] for n in node.input if n in stride), default=1)
        own = _stride(node) if node.op_type == "Conv" or node.op_type in _POOLS else 1
        for out in node.output:
            stride[out] = s_in * own
        if node.op_type == "Conv" and len(node.input) > 1:
            weight = _weight_dims(node.input[1], graph, dims)
            if weight is not None and len(weight) == 4:
                groups = _attr(node, "group", 1)
                c_in, c_out = weight[1] * groups, weight[0]
                peak = max(peak, c_in / s_in**2 + c_out / (s_in * own) ** 2)
    return peak


def _weight_dims(name: str, graph: Any, dims: dict[str, list[int]]) -> list[int] | None:
    """A Conv's weight shape: an initializer's, or (int8 QDQ models) that of the DequantizeLinear's input."""
    if name in dims:
        return dims[name]
    producer = next((n for n in graph.node if name in n.output), None)
    if producer is not None and producer.op_type in ("DequantizeLinear", "Cast", "Identity") and producer.input:
        return dims.get(producer.input[0])
    return None


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints) if a.ints else a.i
    return default


def _stride(node: Any) -> int:
    strides = _attr(node, "strides", [1])
    return max(strides) if isinstance(strides, list) and strides else 1


def activation_bytes(floats: float, batch: int, size: tuple[int, int], channels: int = 3) -> int:
    """Bytes one pass of `batch` images of `size` (width, height) holds at its peak: the activations and the
    float input."""
    pixels = batch * size[0] * size[1]
    return int(pixels * FLOAT_BYTES * (floats + channels))


def largest_size(floats: float, batch: int, limit: int, channels: int = 3) -> int:
    """The most input pixels per image that fit in `limit` (for messages)."""
    return int(limit / (batch * FLOAT_BYTES * (floats + channels)))


def describe(sizes: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"{h}x{w}" for w, h in sizes)
