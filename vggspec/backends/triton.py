"""A Triton model repository from an exported model: `REPO/NAME/1/model.onnx`, `config.pbtxt`, `labels.txt`.

The same .onnx file `vggspec serve` runs on an edge box runs in Triton's onnxruntime backend in the
datacenter; the configuration says what Triton cannot read from the file alone: the batch axis, the
dynamic batcher and the labels of `probs` (Triton's classification extension reads `labels.txt`).
The file keeps its vggspec metadata; the short keys are repeated as the config's `parameters`, so
that they show in Triton's model configuration endpoint.

config.pbtxt is written as text here, without tritonclient or protobuf: an export must not need them.
The tests parse it into Triton's own ModelConfig message (tritonclient's model_config_pb2).

A model folder appears complete or not at all: it is built in a hidden folder inside REPO (a rename
across file systems is not atomic, so beside the target, not in /tmp) and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from ..atomic import sweep_stale, temp_prefix
from ..contract import PREFIX
from ..errors import VggspecError

VERSION = "1"  # Triton's version folder: one version per export
MODEL_FILE = "model.onnx"  # the onnxruntime backend's default_model_filename
LABELS_FILE = "labels.txt"
DEFAULT_MAX_BATCH = 8
DEFAULT_DELAY_US = 0  # as `vggspec serve` and Triton itself: a batch is what queued while the last one ran
_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.UINT8: "TYPE_UINT8"}
# Long texts stay in the model file only (the specs, how to resize and crop); the labels go to labels.txt.
_NOT_PARAMETERS = {"labels", "spec", "member_specs", "resize", "crops"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class TritonOptions:
    """max_batch: Triton's max_batch_size (0: no batching by Triton; forced to 0 for a fixed batch axis).
    delay_us: the dynamic batcher's max_queue_delay_microseconds."""

    max_batch: int = DEFAULT_MAX_BATCH
    delay_us: int = DEFAULT_DELAY_US


def write_repository(repo: str | Path, name: str, write_model: Callable[[Path], None],
                     options: TritonOptions | None = None, force: bool = False) -> Path:
    """Write the model folder `repo/name` with `write_model(path)` writing the .onnx file; returns the folder.

    Refuses to replace an existing model folder unless `force`. Raises VggspecError before anything
    appears in `repo` on bad input; a failure while writing leaves `repo` as it was.
    """
    options = options or TritonOptions()
    target = _target(Path(repo), name, force)
    sweep_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    try:
        (staging / VERSION).mkdir()
        write_model(staging / VERSION / MODEL_FILE)
        model = onnx.load(str(staging / VERSION / MODEL_FILE), load_external_data=False)
        labels = _labels(model)
        (staging / "config.pbtxt").write_text(model_config(model, name, options, bool(labels)), encoding="utf-8")
        if labels:
            (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
        _open_modes(staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_config(model: onnx.ModelProto, name: str, options: TritonOptions | None = None,
                 labels: bool = False) -> str:
    """The text of config.pbtxt for `model` (a vggspec export): Triton's ModelConfig in protobuf text format."""
    options = options or TritonOptions()
    batched = options.max_batch > 0 and all(_batch_is_free(v) for v in model.graph.input)
    lines = [f"name: {_quote(name)}", 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
             f"max_batch_size: {options.max_batch if batched else 0}"]
    lines += _tensors("input", model.graph.input, batched)
    lines += _tensors("output", model.graph.output, batched, labels)
    if batched:
        sizes = ", ".join(map(str, _preferred(options.max_batch)))
        lines += ["dynamic_batching {", f"  preferred_batch_size: [ {sizes} ]",
                  f"  max_queue_delay_microseconds: {options.delay_us}", "}"]
    lines += _parameters(model)
    return "\n".join(lines) + "\n"


def _target(repo: Path, name: str, force: bool) -> Path:
    """REPO/NAME, after checking the name, creating REPO when its parent exists, and refusing to replace."""
    if not _NAME.fullmatch(name):
        raise VggspecError(f"'{name}' cannot name a Triton model folder", str(repo),
                           "use letters, digits, '_', '.' and '-', not starting with '.' or '-'")
    if repo.exists() and not repo.is_dir():
        raise VggspecError("is not a folder; --triton-repo takes a model repository folder", str(repo))
    if not repo.exists():
        if not repo.parent.is_dir():
            raise VggspecError(f"folder {repo.parent} does not exist", str(repo), "create it first")
        repo.mkdir()
    target = repo / name
    if (target.exists() or target.is_symlink()) and not force:
        raise VggspecError(f"already holds a model named {name}", str(repo),
                           "add --force to replace it, or give another --triton-name")
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder to `target`; an old one (--force) is renamed aside first, then removed."""
    if not (target.exists() or target.is_symlink()):
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), dir=target.parent))
    os.replace(target, old / "old")  # a folder cannot be renamed over a non-empty one
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(old / "old", target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _open_modes(folder: Path) -> None:
    """mkdtemp makes 0700: give the folders the usual mode, so a server running as another user reads them."""
    mask = os.umask(0)
    os.umask(mask)
    for path in (folder, *[p for p in folder.rglob("*") if p.is_dir()]):
        os.chmod(path, 0o777 & ~mask)


def _labels(model: onnx.ModelProto) -> tuple[str, ...]:
    """The model's labels (empty when unknown); one per line in labels.txt, so none may hold a line break."""
    props = {p.key: p.value for p in model.metadata_props}
    labels = tuple(json.loads(props.get(PREFIX + "labels", "[]")))
    for i, label in enumerate(labels):
        if "\n" in label or "\r" in label:
            raise VggspecError(f"label {i} holds a line break; Triton's labels file has one label per line",
                               hint="give the checkpoint labels without line breaks")
    return labels


def _batch_is_free(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return bool(dims) and not dims[0].dim_value


def _tensors(kind: str, values: Sequence[onnx.ValueInfoProto], batched: bool, labels: bool = False) -> list[str]:
    """`input [ {...} ]` or `output [ {...} ]`: names, types and dims (-1: a free axis; no batch axis if batched)."""
    entries = []
    for v in values:
        t = v.type.tensor_type
        if t.elem_type not in _TYPES:
            raise VggspecError(f"{kind} {v.name} has an element type Triton's config is not written for here")
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in t.shape.dim][1 if batched else 0:]
        fields = [f"name: {_quote(v.name)}", f"data_type: {_TYPES[t.elem_type]}",
                  f"dims: [ {', '.join(map(str, dims))} ]"]
        if labels and kind == "output" and v.name == "probs":
            fields.append(f"label_filename: {_quote(LABELS_FILE)}")
        entries.append("  {\n" + "".join(f"    {f}\n" for f in fields) + "  }")
    return [f"{kind} [", ",\n".join(entries), "]"]


def _preferred(max_batch: int) -> list[int]:
    """The powers of two from 2 up to max_batch, and max_batch itself: sizes the batcher tries to fill."""
    sizes = [2**i for i in range(1, max_batch.bit_length()) if 2**i < max_batch]
    return [*sizes, max_batch]


def _parameters(model: onnx.ModelProto) -> list[str]:
    """The model's short vggspec metadata as config parameters (string values), in the file's order."""
    lines = []
    for p in model.metadata_props:
        if p.key.startswith(PREFIX) and p.key[len(PREFIX):] not in _NOT_PARAMETERS:
            lines.append(f"parameters {{ key: {_quote(p.key)} value {{ string_value: {_quote(p.value)} }} }}")
    return lines


def _quote(text: str) -> str:
    """A protobuf text-format string: printable ASCII as is, quotes and backslashes escaped, other bytes octal."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= byte < 127 else f"\\{byte:03o}")
    return '"' + "".join(out) + '"'
