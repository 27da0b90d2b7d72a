"""Writing a single-file ONNX model straight from numpy buffers.

`onnx.save_model` needs every weight inside the ModelProto first: for D that is the 553 MB of
numpy weights copied into TensorProtos, copied again into the GraphProto and once more into the
serialised bytes. Here the graph is serialised without its initializers, and each tensor is
appended as its own fragment `ModelProto{graph{initializer: tensor}}` whose raw_data comes from the
array's buffer. Protobuf parsers merge concatenated messages (a singular message field merges, a
repeated field appends), so every reader, onnx.load and onnxruntime included, sees exactly the
ModelProto that `onnx.save_model` would have written: same bytes per tensor, same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper

# Field numbers in onnx.proto: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the weights held in the proto itself (what counts toward protobuf's 2 GB)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, length: int) -> bytes:
    """The key and length of a length-delimited field."""
    return _varint((field << 3) | 2) + _varint(length)


def _write_tensor(f: BinaryIO, name: str, array: np.ndarray) -> None:
    array = np.require(array, requirements="C")  # not ascontiguousarray: it turns 0-d into 1-d
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))  # ONNX raw_data is little-endian
    head = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
    head_bytes = head.SerializeToString()
    raw = memoryview(array).cast("B")
    tensor_len = len(head_bytes) + len(_key(TENSOR_RAW_DATA, raw.nbytes)) + raw.nbytes
    graph_len = len(_key(GRAPH_INITIALIZER, tensor_len)) + tensor_len
    for chunk in (_key(MODEL_GRAPH, graph_len), _key(GRAPH_INITIALIZER, tensor_len), head_bytes,
                  _key(TENSOR_RAW_DATA, raw.nbytes), raw):
        f.write(chunk)


def write_streamed(skeleton: onnx.ModelProto, tensors: Iterable[tuple[str, np.ndarray]], path: str | Path) -> None:
    """Write `skeleton` (a model without initializers) followed by `tensors` as its initializers."""
    if len(skeleton.graph.initializer):
        raise ValueError("the skeleton must not hold initializers: they would be written twice")
    with open(path, "wb") as f:
        f.write(skeleton.SerializeToString())
        for name, array in tensors:
            _write_tensor(f, name, array)
