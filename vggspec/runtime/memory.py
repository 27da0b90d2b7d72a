"""How much memory one dense pass of an image takes: the network's activations at that input size.

The pixel limit (imaging.MAX_PIXELS) bounds the decoded image, not what the network makes of it: a
dense pass holds, at its peak, a convolution's input and output maps, each `channels / stride**2` floats
per input pixel. For VGG that is the first stage: 64 + 64 floats, 512 bytes per pixel, twice that with
the mirror image. The widths and strides are read from the ONNX graph's Conv and pooling nodes (with
onnx, when it is installed), otherwise assumed to be VGG's first stage.
"""

from __future__ import annotations

import math
import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# What a 4 GB edge box can give one image's activations, with the model's weights (D: 550 MB), Python and
# the decoded image beside them. `--max-memory` raises it.
DEFAULT_MAX_MEMORY = 1_500_000_000
# Floats per input pixel at the peak when the graph cannot be read: VGG's first stage (64 channels in and out
# of conv1_2), the widest of the paper's configurations at full resolution.
FALLBACK_FLOATS_PER_PIXEL = 128.0
FLOAT_BYTES = 4
# Bytes per activation by the model's precision (contract.PRECISIONS). An int8 model's Q/DQ nodes hand floats
# between its quantized layers, and "mixed" may hold fp32 anywhere: both keep the float's 4.
VALUE_BYTES = {"fp16": 2}
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
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _skeleton(onnx, buf)
    except Exception:  # unreadable as a protobuf here, though onnxruntime took it: assume VGG's widths
        return FALLBACK_FLOATS_PER_PIXEL
    return graph_floats_per_pixel(graph) or FALLBACK_FLOATS_PER_PIXEL


# ---- the graph without its weights: onnx.load of D (553 MB) takes 4.7 s and 1.1 GB; this, milliseconds.
# ONNX's protobuf field numbers: ModelProto.graph 7; GraphProto.node 1, initializer 5, input 11;
# TensorProto.dims 1, name 8; ValueInfoProto.name 1.


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint itself) of one message's fields."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, pos, pos + size
            pos += size
        else:
            raise ValueError(f"protobuf wire type {wire}")


def _tensor_header(buf: Any, start: int, end: int) -> SimpleNamespace:
    """An initializer's name and dims; its data (raw_data, float_data...) skipped, never copied."""
    name, dims = "", []
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == 2:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 1 and wire == 0:
            dims.append(a)
        elif number == 1 and wire == 2:  # packed
            pos = a
            while pos < b:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
    return SimpleNamespace(name=name, dims=dims)


def _skeleton(onnx: Any, buf: Any) -> SimpleNamespace:
    """The model's graph as graph_floats_per_pixel reads it: nodes (onnx.NodeProto), initializer headers, inputs."""
    # A message field that occurs several times is merged (vggspec's streamed writer emits the graph in parts).
    parts = [(a, b) for number, wire, a, b in _fields(buf, 0, len(buf)) if number == 7 and wire == 2]
    if not parts:
        raise ValueError("no graph")
    nodes, inits, inputs = [], [], []
    for number, wire, a, b in (field for part in parts for field in _fields(buf, *part)):
        if wire != 2:
            continue
        if number == 1:
            nodes.append(onnx.NodeProto.FromString(bytes(buf[a:b])))
        elif number == 5:
            inits.append(_tensor_header(buf, a, b))
        elif number == 11:
            name = next((bytes(buf[x:y]).decode("utf-8", "replace") for n, w, x, y in _fields(buf, a, b)
                         if n == 1 and w == 2), "")
            inputs.append(SimpleNamespace(name=name))
    return SimpleNamespace(node=nodes, initializer=inits, input=inputs)


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


def activation_bytes(floats: float, batch: int, size: tuple[int, int], channels: int = 3,
                     precision: str = "fp32") -> int:
    """Bytes one pass of `batch` images of `size` (width, height) holds at its peak: the activations and the
    input, at the model's `precision`."""
    pixels = batch * size[0] * size[1]
    return int(pixels * VALUE_BYTES.get(precision, FLOAT_BYTES) * (floats + channels))
