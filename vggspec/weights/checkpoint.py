"""The native checkpoint: safetensors (no pickle), keyed as the generated module's state_dict.

Metadata (string to string, as safetensors requires) holds:
  format         "vggspec"
  vggspec        the version that wrote it
  spec           the spec text the tensors belong to
  preprocessing  JSON: scale, mean, std, channel_order, layout
  labels         JSON list of class labels, when known
  source         where the tensors came from (init:paper:seed=0, torchvision:vgg16.pth, train:...)
  overrides      JSON list of the `--set key=value` overrides the spec was compiled with, when any
                 (the spec text is stored as written; `checkpoint_graph` applies both)
  train.*        a training run's progress (epoch, step, world_size) and how it trained: train.scale
                 (`S` or `SMIN:SMAX`) and train.flip (`true`/`false`), which export turns into the model's
                 default test scales and flip (`training_record`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import WeightsError
from ..files import require_file
from ..graph import LayerGraph, Preprocessing
from .init import param_shapes


@dataclass
class Checkpoint:
    tensors: dict[str, np.ndarray]
    spec: str = ""
    preprocessing: Preprocessing | None = None
    labels: tuple[str, ...] = ()
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()

    def metadata(self) -> dict[str, str]:
        from ..version import __version__

        meta = {"format": "vggspec", "vggspec": __version__, "spec": self.spec, "source": self.source}
        if self.preprocessing is not None:
            meta["preprocessing"] = json.dumps(self.preprocessing.to_dict())
        if self.labels:
            meta["labels"] = json.dumps(list(self.labels))
        if self.overrides:
            meta["overrides"] = json.dumps(list(self.overrides))
        return {**self.extra, **meta}


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write a checkpoint atomically."""
    from safetensors.numpy import save_file

    tensors = {k: np.require(v, requirements="C") for k, v in checkpoint.tensors.items()}  # 0-d stays 0-d
    with atomic_path(path, ".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=checkpoint.metadata())
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Rewrite the header with its metadata keys sorted, so the same checkpoint is the same bytes.

    safetensors keeps metadata in a Rust HashMap, whose order changes from process to process. The
    header is rewritten in place only when re-serialising it unsorted gives back exactly its bytes:
    the same compact JSON, the same length, the tensors' data untouched."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)

        def dump(h: dict) -> bytes:
            return json.dumps(h, separators=(",", ":"), ensure_ascii=False).encode("utf-8").ljust(n)

        if "__metadata__" not in header or dump(header) != raw:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        f.seek(8)
        f.write(dump(header))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint; a file that is not safetensors is a WeightsError, not a traceback."""
    from safetensors import safe_open

    path = Path(path)
    require_file(path, WeightsError, "a checkpoint file")
    try:
        with safe_open(str(path), framework="numpy") as f:  # validates the header and the offsets
            meta = f.metadata() or {}
            mapped = _mapped(path)
            tensors = {k: mapped[k] if k in mapped else f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for every kind of bad file
        raise WeightsError(f"not a safetensors checkpoint ({exc})", str(path)) from None
    known = {"format", "vggspec", "spec", "preprocessing", "labels", "source", "overrides"}
    return Checkpoint(
        tensors=tensors,
        spec=meta.get("spec", ""),
        preprocessing=_preprocessing(meta, str(path)),
        labels=_strings(meta, "labels", str(path)),
        source=meta.get("source", ""),
        extra={k: v for k, v in meta.items() if k not in known},
        overrides=_strings(meta, "overrides", str(path)),
    )


def _metadata_error(key: str, problem: str, path: str) -> WeightsError:
    return WeightsError(f"metadata '{key}' {problem}", path,
                        "the file was not written by vggspec, or was edited; save the weights again")


def _strings(meta: dict[str, str], key: str, path: str) -> tuple[str, ...]:
    """A metadata value that must be a JSON list of strings (labels, --set overrides)."""
    if key not in meta:
        return ()
    try:
        value = json.loads(meta[key])
    except ValueError:
        raise _metadata_error(key, "is not JSON", path) from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _metadata_error(key, "is not a JSON list of strings", path)
    return tuple(value)


def _preprocessing(meta: dict[str, str], path: str) -> Preprocessing | None:
    if "preprocessing" not in meta:
        return None
    try:
        value = json.loads(meta["preprocessing"])
        prep = Preprocessing.from_dict(value)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _metadata_error("preprocessing", f"is not the JSON object it should be ({type(exc).__name__}: "
                                               f"{str(exc)[:100]})", path) from None
    if prep.problem():
        raise _metadata_error("preprocessing", prep.problem(), path)
    return prep


TRAIN_SCALE, TRAIN_FLIP = "train.scale", "train.flip"


def training_extra(scale: tuple[int, int], flip: bool) -> dict[str, str]:
    """The checkpoint metadata recording a run's scale range and flip policy (`training_record` reads it)."""
    text = str(scale[0]) if scale[0] == scale[1] else f"{scale[0]}:{scale[1]}"
    return {TRAIN_SCALE: text, TRAIN_FLIP: "true" if flip else "false"}


def training_record(checkpoint: Checkpoint, path: str | None = None) -> dict[str, object] | None:
    """{"scale": (Smin, Smax), "flip": bool} of a checkpoint written by training; None for one without the
    record (init, an import, or a run of an older vggspec). WeightsError when the record is mangled."""
    scale, flip = checkpoint.extra.get(TRAIN_SCALE), checkpoint.extra.get(TRAIN_FLIP)
    if scale is None and flip is None:
        return None
    parts = (scale or "").split(":")
    if not (1 <= len(parts) <= 2 and all(p.isascii() and p.isdecimal() and len(p) <= 6 for p in parts)):
        raise _metadata_error(TRAIN_SCALE, f"= {scale!r} is not S or SMIN:SMAX", path or "")
    smin, smax = int(parts[0]), int(parts[-1])
    if not 0 < smin <= smax:
        raise _metadata_error(TRAIN_SCALE, f"= {scale!r} is not S or SMIN:SMAX with 0 < SMIN <= SMAX", path or "")
    if flip not in ("true", "false"):
        raise _metadata_error(TRAIN_FLIP, f"= {flip!r} is not true or false", path or "")
    return {"scale": (smin, smax), "flip": flip == "true"}


def checkpoint_graph(checkpoint: Checkpoint, path: str | None = None, overrides: tuple[str, ...] = ()) -> LayerGraph:
    """The layer graph a checkpoint belongs to: its spec text compiled with its stored overrides,
    then `overrides` on top of them."""
    from ..graph import build
    from ..spec import parse

    if not checkpoint.spec.strip():
        raise WeightsError("holds no spec text: not a checkpoint vggspec wrote", path,
                           "`vggspec export SPEC --weights FILE` takes the spec from SPEC; other commands need a "
                           "checkpoint from vggspec init, train or weights import")
    # The labels file named in the spec is not beside a checkpoint: the labels travel in its metadata.
    stored = (*checkpoint.overrides, "labels=", *overrides)
    graph = build(parse(checkpoint.spec, f"{path or '<checkpoint>'}:spec", stored, keep_going=True))
    graph.graph["meta"] = graph.meta.with_(labels=tuple(checkpoint.labels))
    return graph


_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
           "U8": "u1", "BOOL": "?"}


def _mapped(path: Path) -> dict[str, np.ndarray]:
    """The tensors as copy-on-write memory maps of the file, where numpy has their dtype.

    safetensors' numpy API copies each tensor through a bytes object, so loading D briefly holds
    fc6 (411 MB) twice; a map costs nothing until read and the page cache shares it. The layout
    is the format's own: an 8-byte little-endian header size, a JSON header, then the data.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in _DTYPES:
            continue
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end == begin:
            out[name] = np.zeros(shape, _DTYPES[entry["dtype"]])
        else:
            out[name] = np.memmap(path, _DTYPES[entry["dtype"]], "c", 8 + size + begin, shape)
    return out


def check_tensors(graph: LayerGraph, tensors: dict[str, np.ndarray], path: str | None = None) -> None:
    """Raise WeightsError at the first tensor whose name or shape does not match the graph."""
    expected = param_shapes(graph)
    for key, shape in expected.items():
        if key not in tensors:
            raise WeightsError(f"missing tensor {key} (layer {key.split('.')[0]}, shape {shape})", path)
        if tuple(tensors[key].shape) != shape:
            raise WeightsError(
                f"layer {key.split('.')[0]}: {key} has shape {tuple(tensors[key].shape)}, the spec needs {shape}",
                path,
                "was the checkpoint made for another spec, or with other --set options?",
            )
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise WeightsError(f"unexpected tensor {extra[0]} (the spec has no such layer)", path)
    for key, value in tensors.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise WeightsError(f"{key} holds {bad} NaN or infinite value(s)", path,
                               "the weights are corrupt, or training diverged: use an earlier checkpoint")
