"""The original Caffe release's naming (VGG_ILSVRC_16_layers and _19_layers), as a documented mapping.

The release names its layers as vggspec does: conv1_1 ... conv5_3 (or conv5_4), fc6, fc7, fc8, each
with two blobs, weights then biases. Its convolution weights are (out, in, kh, kw) like PyTorch's,
and its fc6 reads pool5 in the same channel-major order as `flatten`, so the tensors map one to one
except for two differences this module handles:

- the network reads BGR images: the input channels of the first convolution are reversed so that
  the imported net reads RGB, as vggspec's preprocessing hands it;
- its preprocessing is pixel values 0..255 minus the mean BGR pixel (103.939, 116.779, 123.68),
  scale 1, no std: `PREPROCESSING` below is that in RGB order.

The release's .caffemodel files are read directly (caffe_proto.py decodes Caffe's NetParameter with
the protobuf library); blobs dumped to a .npz or .safetensors file keyed `conv1_1.weight`,
`conv1_1.bias` (or `conv1_1.0`, `conv1_1.1`, the blob indices) are read too. FC weights stored as
convolution kernels (a fully convolutional release) are reshaped back. The release has
no batch norm, so only `norm: none` specs map.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..files import require_file
from ..graph import LayerGraph, Preprocessing
from .checkpoint import check_tensors
from .init import param_shapes

MEAN_BGR = (103.939, 116.779, 123.68)
PREPROCESSING = Preprocessing(scale=1.0, mean=MEAN_BGR[::-1], std=(1.0, 1.0, 1.0), channel_order="RGB", layout="NCHW")
_BLOBS = {"weight": ("weight", "0"), "bias": ("bias", "1")}


def load_blobs(path: str | Path) -> dict[str, np.ndarray]:
    """Blobs from a .caffemodel (Caffe's protobuf), a .npz (no pickles) or a .safetensors file."""
    path = Path(path)
    require_file(path, WeightsError, "a weights file")
    if path.suffix == ".caffemodel":
        from .caffe_proto import read_caffemodel

        return read_caffemodel(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return dict(load_file(str(path)))
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # numpy and safetensors raise many kinds of errors for damaged files
        raise WeightsError(f"cannot read Caffe blobs ({exc})", str(path),
                           "give a .caffemodel, or blobs in a .npz or .safetensors file") from None


def from_caffe(graph: LayerGraph, blobs: Mapping[str, np.ndarray], path: str | None = None) -> dict[str, np.ndarray]:
    """Caffe-release blobs -> vggspec tensors: first-conv channels BGR -> RGB, FC kernels flattened."""
    if graph.of_op("bn"):
        raise WeightsError("the Caffe release has no batch norm; use a spec with norm: none", path)
    shapes = param_shapes(graph)
    out: dict[str, np.ndarray] = {}
    for key in shapes:
        name, kind = key.split(".", 1)
        found = [f"{name}.{alias}" for alias in _BLOBS[kind] if f"{name}.{alias}" in blobs]
        if not found:
            raise WeightsError(f"missing blob {name}.{kind} (or {name}.{_BLOBS[kind][1]}) for layer {name}", path)
        value = _legacy(np.asarray(blobs[found[0]], dtype=np.float32), kind, graph.layer(name).op)
        out[key] = value
    first = graph.of_op("conv")
    if first and first[0].in_shape[0] == 3:
        out[f"{first[0].name}.weight"] = _flip(out[f"{first[0].name}.weight"])
    known = {f"{k.split('.')[0]}.{a}" for k in shapes for a in _BLOBS[k.split(".")[1]]}
    extra = sorted(set(blobs) - known)
    if extra:
        raise WeightsError(f"unexpected blob {extra[0]} (the spec has no such layer)", path)
    check_tensors(graph, out, path)
    return out


def _legacy(value: np.ndarray, kind: str, op: str) -> np.ndarray:
    """A blob in the layer's own shape. The 2014 release's blobs are 4-D (num, channels, height, width):
    biases (1, 1, 1, out), FC weights (1, 1, out, in); a fully convolutional release has FC weights as
    kernels (out, C, k, k), read channel-major as `flatten` does."""
    if kind == "bias":
        return value.reshape(-1)
    if op == "fc" and value.ndim == 4:
        if value.shape[:2] == (1, 1):
            return value.reshape(value.shape[2], value.shape[3])
        return value.reshape(value.shape[0], -1)
    return value


def to_caffe(graph: LayerGraph, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vggspec tensors -> Caffe-release blobs (`conv1_1.weight`, ...), the first conv back to BGR."""
    check_tensors(graph, dict(tensors))
    if graph.of_op("bn"):
        raise WeightsError("the Caffe release has no batch norm; use a spec with norm: none")
    out = {k: np.asarray(v) for k, v in tensors.items()}
    first = graph.of_op("conv")
    if first and first[0].in_shape[0] == 3:
        out[f"{first[0].name}.weight"] = _flip(out[f"{first[0].name}.weight"])
    return out


def _flip(weight: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(weight[:, ::-1])
