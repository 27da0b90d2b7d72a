""".caffemodel files: Caffe's NetParameter, decoded with the protobuf library.

The messages are built at run time from a subset of Caffe's own schema (caffe.proto, BSD-2): the
same field numbers and types, so protobuf reads every .caffemodel Caffe wrote, both the current
`layer` list (LayerParameter) and the legacy `layers` list (V1LayerParameter) that the 2014 VGG
release (VGG_ILSVRC_16_layers.caffemodel, VGG_ILSVRC_19_layers.caffemodel) uses. Fields outside
the subset (layer settings, solver state) are skipped by the parser as unknown fields; only names
and blobs are needed. A blob's shape is `shape.dim`, or the legacy (num, channels, height, width).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WeightsError
from ..files import require_file

# (message, [(field, number, type, label, message type or None, packed)])
SCHEMA: list[tuple[str, list[tuple[str, int, str, str, str | None, bool]]]] = [
    ("BlobShape", [("dim", 1, "INT64", "REPEATED", None, True)]),
    ("BlobProto", [("shape", 7, "MESSAGE", "OPTIONAL", "BlobShape", False),
                   ("data", 5, "FLOAT", "REPEATED", None, True),
                   ("double_data", 8, "DOUBLE", "REPEATED", None, True),
                   ("num", 1, "INT32", "OPTIONAL", None, False),
                   ("channels", 2, "INT32", "OPTIONAL", None, False),
                   ("height", 3, "INT32", "OPTIONAL", None, False),
                   ("width", 4, "INT32", "OPTIONAL", None, False)]),
    ("LayerParameter", [("name", 1, "STRING", "OPTIONAL", None, False),
                        ("type", 2, "STRING", "OPTIONAL", None, False),
                        ("blobs", 7, "MESSAGE", "REPEATED", "BlobProto", False)]),
    ("V1LayerParameter", [("name", 4, "STRING", "OPTIONAL", None, False),
                          ("type", 5, "INT32", "OPTIONAL", None, False),  # an enum on the wire
                          ("blobs", 6, "MESSAGE", "REPEATED", "BlobProto", False)]),
    ("NetParameter", [("name", 1, "STRING", "OPTIONAL", None, False),
                      ("layers", 2, "MESSAGE", "REPEATED", "V1LayerParameter", False),
                      ("layer", 100, "MESSAGE", "REPEATED", "LayerParameter", False)]),
]
MAX_BYTES = 4 * 2**30  # VGG-19's file is 575 MB; anything far beyond is not a VGG release


@cache
def messages() -> dict[str, Any]:
    """The message classes of the schema subset, in a private descriptor pool (package `caffe`)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    proto = descriptor_pb2.FileDescriptorProto(name="vggspec_caffe_subset.proto", package="caffe", syntax="proto2")
    fd = descriptor_pb2.FieldDescriptorProto
    for name, fields in SCHEMA:
        message = proto.message_type.add(name=name)
        for field, number, kind, label, type_name, packed in fields:
            f = message.field.add(name=field, number=number, type=getattr(fd, f"TYPE_{kind}"),
                                  label=getattr(fd, f"LABEL_{label}"))
            if type_name:
                f.type_name = f".caffe.{type_name}"
            if packed:
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"caffe.{name}"))
            for name, _ in SCHEMA}


def _blob_array(blob: Any) -> np.ndarray:
    data = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = tuple(int(v) for v in (blob.num, blob.channels, blob.height, blob.width))
    if int(np.prod(shape)) != data.size:
        raise ValueError(f"a blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def read_caffemodel(path: str | Path) -> dict[str, np.ndarray]:
    """Every layer's blobs, keyed `<layer>.<blob index>` (`conv1_1.0` weights, `conv1_1.1` biases)."""
    path = Path(path)
    require_file(path, WeightsError, "a Caffe model file")
    if path.stat().st_size > MAX_BYTES:
        raise WeightsError(f"{path.stat().st_size / 2**30:.1f} GB is more than a VGG release holds", str(path))
    net = messages()["NetParameter"]()
    try:
        net.ParseFromString(path.read_bytes())
        blobs = {f"{layer.name}.{i}": _blob_array(b) for layer in (*net.layers, *net.layer)
                 for i, b in enumerate(layer.blobs)}
    except Exception as exc:  # protobuf's DecodeError, a blob whose shape and data disagree
        raise WeightsError(f"not a readable .caffemodel ({type(exc).__name__}: {exc})", str(path)) from None
    if not blobs:
        raise WeightsError("holds no layer with blobs: not a trained Caffe model", str(path))
    return blobs


def write_caffemodel(path: str | Path, blobs: dict[str, np.ndarray], name: str = "vgg", legacy: bool = False) -> None:
    """Blobs keyed `<layer>.<index>` (or `.weight`/`.bias`) as a .caffemodel: `layer` entries, or
    `layers` (V1) with 4-D legacy shapes when `legacy`, as the 2014 release was written."""
    from ..atomic import write_bytes_atomic

    net = messages()["NetParameter"](name=name)
    layers: dict[str, list[tuple[int, np.ndarray]]] = {}
    for key, value in blobs.items():
        layer, index = key.rsplit(".", 1)
        order = {"weight": 0, "bias": 1}.get(index)
        layers.setdefault(layer, []).append((int(index) if order is None else order, np.asarray(value, np.float32)))
    for layer, items in layers.items():
        entry = net.layers.add(name=layer) if legacy else net.layer.add(name=layer)
        for _, value in sorted(items, key=lambda t: t[0]):
            blob = entry.blobs.add()
            if legacy:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - value.ndim) + value.shape
            else:
                blob.shape.dim.extend(value.shape)
            blob.data.extend(value.ravel().tolist())
    write_bytes_atomic(path, net.SerializeToString())
