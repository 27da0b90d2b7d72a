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


# Without a spec to say which blobs are wanted, the most a .npz may unpack to: VGG-19's 144 M floats, twice.
MAX_UNKNOWN_BYTES = 2 * 144_000_000 * 4


def load_blobs(path: str | Path, graph: LayerGraph | None = None) -> dict[str, np.ndarray]:
    """Blobs from a .caffemodel (Caffe's protobuf), a .npz (no pickles) or a .safetensors file.

    With `graph`, a .npz or .safetensors file's headers are read first (names, shapes, types) and checked
    against the blobs the spec needs, and only those are loaded: a small compressed file whose arrays would
    unpack to gigabytes is refused before anything is allocated."""
    path = Path(path)
    require_file(path, WeightsError, "a weights file")
    if path.suffix == ".caffemodel":
        from .caffe_proto import read_caffemodel

        return read_caffemodel(path)
    expected = _expected_sizes(graph, str(path)) if graph is not None else None
    try:
        if path.suffix == ".safetensors":
            return _safetensors_blobs(path, expected)
        return _npz_blobs(path, expected)
    except WeightsError:
        raise
    except Exception as exc:  # numpy, zipfile and safetensors raise many kinds of errors for damaged files
        raise WeightsError(f"cannot read Caffe blobs ({exc})", str(path),
                           "give a .caffemodel, or blobs in a .npz or .safetensors file") from None


def _expected_sizes(graph: LayerGraph, path: str) -> dict[str, int]:
    """Every blob name the spec takes (both spellings: conv1_1.weight and conv1_1.0) -> its element count."""
    if graph.of_op("bn"):
        raise WeightsError("the Caffe release has no batch norm; use a spec with norm: none", path)
    sizes = {}
    for key, shape in param_shapes(graph).items():
        name, kind = key.split(".", 1)
        for alias in _BLOBS[kind]:
            sizes[f"{name}.{alias}"] = int(np.prod(shape))
    return sizes


def _check_header(name: str, shape: tuple[int, ...], dtype: np.dtype, expected: dict[str, int] | None,
                  path: Path) -> int:
    """The blob's size in bytes, once its name, type and element count are what the spec needs."""
    if dtype.hasobject or dtype.kind not in "fiu":
        raise WeightsError(f"blob {name} holds {dtype}, not numbers", str(path))
    count = int(np.prod(shape, dtype=np.float64))
    if expected is not None:
        if name not in expected:
            raise WeightsError(f"unexpected blob {name} (the spec has no such layer)", str(path))
        if count != expected[name]:
            raise WeightsError(f"blob {name} has shape {tuple(shape)} ({count:,} values); the spec's layer has "
                               f"{expected[name]:,}", str(path), "import with the spec the blobs were trained for")
    return count * dtype.itemsize


def _npz_blobs(path: Path, expected: dict[str, int] | None) -> dict[str, np.ndarray]:
    """A .npz is a zip of .npy files: every member's header is read (a few bytes each) before any array."""
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path) as archive:
        members, total = [], 0
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            with archive.open(info) as f:
                version = npy.read_magic(f)
                read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
                shape, _, dtype = read(f)
            total += _check_header(name, shape, dtype, expected, path)
            members.append((name, info))
        if expected is None and total > MAX_UNKNOWN_BYTES:
            raise WeightsError(f"the blobs would unpack to {total / 1e9:.1f} GB", str(path),
                               "no Caffe release of VGG is that large")
        blobs = {}
        for name, info in members:
            with archive.open(info) as f:
                blobs[name] = npy.read_array(f, allow_pickle=False)
        return blobs


def _safetensors_blobs(path: Path, expected: dict[str, int] | None) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        names = list(f.keys())
        for name in names:
            sliced = f.get_slice(name)
            dtype = np.dtype(_SAFETENSORS_DTYPES.get(sliced.get_dtype(), "O"))
            _check_header(name, tuple(sliced.get_shape()), dtype, expected, path)
        return {name: f.get_tensor(name) for name in names}


_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64", "I8": "int8", "I16": "int16",
                       "I32": "int32", "I64": "int64", "U8": "uint8"}


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
