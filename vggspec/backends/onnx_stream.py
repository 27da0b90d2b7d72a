"""ONNX files: checking models with onnx.checker and writing them (atomically, streamed, or with external data).

Streaming a single-file model straight from numpy buffers:

`onnx.save_model` needs every weight inside the ModelProto first: for D that is the 553 MB of
numpy weights copied into TensorProtos, copied again into the GraphProto and once more into the
serialised bytes. Here the graph is serialised without its initializers, and each tensor is
appended as its own fragment `ModelProto{graph{initializer: tensor}}` whose raw_data comes from the
array's buffer. Protobuf parsers merge concatenated messages (a singular message field merges, a
repeated field appends), so every reader, onnx.load and onnxruntime included, sees exactly the
ModelProto that `onnx.save_model` would have written: same bytes per tensor, same order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import helper

from ..atomic import atomic_path, check_output_path, naming_output, sweep_stale, temp_prefix
from ..contract import EXTERNAL_DATA_BYTES
from ..errors import ModelError

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


def write_atomic(skeleton: onnx.ModelProto, arrays: dict[str, np.ndarray], output: str | Path) -> None:
    """The skeleton and its weights streamed into OUTPUT, atomically."""
    with atomic_path(check_output_path(output), ".onnx") as tmp:
        write_streamed(skeleton, arrays.items(), tmp)


def check_model(model: onnx.ModelProto | str | Path) -> None:
    """onnx.checker with full_check; a failure is our bug, reported as a ModelError."""
    if isinstance(model, onnx.ModelProto) and initializer_bytes(model) >= EXTERNAL_DATA_BYTES:
        return _check_large(model)  # the checker cannot take a proto over 2 GB, only a path
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"internal error: the exported graph fails onnx.checker: {exc}") from None


def check_graph(skeleton: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> None:
    """onnx.checker's full check (shape inference included) of a graph whose weights are kept apart.

    The weights are declared as typed graph inputs of their exact shapes, so the checker sees every
    type and shape it would see in the file, in milliseconds and without a copy of the weights.
    That the file then holds exactly these tensors is onnx_stream's contract (tested against
    onnx.save_model); parsing D's 553 MB back only to re-check it would double export's memory.
    """
    check_model(with_weight_inputs(skeleton, arrays))


def with_weight_inputs(skeleton: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `skeleton` declaring its kept-apart weights as typed graph inputs, for checking and inference."""
    probe = onnx.ModelProto()
    probe.CopyFrom(skeleton)
    probe.graph.input.extend(
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
        for name, a in arrays.items()
    )
    return probe


def _check_large(model: onnx.ModelProto) -> None:
    """Check a copy saved with external data in a temporary folder (the model itself keeps its tensors)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="vggspec-check-") as tmp:
        onnx.save_model(copy, f"{tmp}/model.onnx", save_as_external_data=True, location="model.onnx.data")
        check_model(f"{tmp}/model.onnx")


def save_model(model: onnx.ModelProto, output: str | Path) -> None:
    """Check and write atomically; over 2 GB, with external data (OUT.data) written in a temp folder first."""
    output = check_output_path(output)
    if initializer_bytes(model) < EXTERNAL_DATA_BYTES:
        _write_single(model, output)
    else:
        _write_external(model, output)


def _write_single(model: onnx.ModelProto, output: Path) -> None:
    """Write beside OUT, check the written file (faster than the proto for big models: no re-serialising), rename."""
    with atomic_path(output, ".onnx") as tmp:
        onnx.save_model(model, str(tmp))
        check_model(tmp)


def _write_external(model: onnx.ModelProto, output: Path) -> None:
    """Model and data into a hidden folder beside OUT, checked there, then renamed: data first, model last."""
    sweep_stale(output)
    with naming_output(output):
        tmpdir = Path(tempfile.mkdtemp(prefix=temp_prefix(output), dir=output.parent))
    try:
        data_name = f"{output.name}.data"
        staged = tmpdir / output.name
        with naming_output(output, tmpdir):  # a full disk names OUT, not the hidden folder
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        check_model(staged)
        with naming_output(output, tmpdir):
            for path in (tmpdir / data_name, staged):
                os.chmod(path, 0o644)
            os.replace(tmpdir / data_name, output.parent / data_name)
            os.replace(staged, output)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
