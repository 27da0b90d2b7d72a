"""What a user does with a vggspec checkpoint, one function each, for the CLI, the runtime's checkpoint path and
Python: open it with its network, export its ONNX forms, initialise one (from a shallower net too), import
torchvision's or the Caffe release's weights into one and export it back.

Every operation opens a checkpoint through `open_checkpoint`, so a broken one (not safetensors, no spec text,
a spec that fails, tensors the spec does not take) is named the same way by every command: the error carries
the file's path. Torch is imported only for torchvision's .pth files; the runtime (vggspec.runtime,
vggspec.serve) never imports this module, it receives `export_forms` from its caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VggspecError
from .graph import LayerGraph
from .graph.load import load_spec
from .preprocessing import Preprocessing
from .weights import Checkpoint, check_tensors, checkpoint_graph, load_checkpoint


def open_checkpoint(path: str | Path, spec: str | Path | None = None,
                    sets: tuple[str, ...] = ()) -> tuple[Checkpoint, LayerGraph]:
    """A checkpoint and its network (SPEC's when given, else the checkpoint's own spec with `sets`), checked
    against each other; every error names PATH."""
    ckpt = load_checkpoint(str(path))
    graph = load_spec(spec, sets) if spec is not None else checkpoint_graph(ckpt, str(path), sets)
    check_tensors(graph, ckpt.tensors, str(path))
    return ckpt, graph


def export_forms(checkpoint: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """Write FOLDER/standard.onnx and FOLDER/dense.onnx (fully convolutional, with a `scores` output) from a
    checkpoint, carrying its labels, preprocessing and test protocol: multi-crop needs the first, dense and heat
    maps the second. The exporter predict, eval and the server pass to vggspec.runtime.members (its `Export`)."""
    from .backends.onnx import export_onnx

    ckpt, graph = open_checkpoint(checkpoint)
    folder = Path(folder)
    common = {"weights": ckpt.tensors, **_model_metadata(ckpt, checkpoint)}
    standard, dense = folder / "standard.onnx", folder / "dense.onnx"
    export_onnx(graph, standard, **common)
    export_onnx(graph, dense, fully_conv=True, scores=True, **common)
    return standard, dense


def export_inputs(spec: str | Path | None, weights: str | Path,
                  sets: tuple[str, ...] = ()) -> tuple[LayerGraph, dict[str, np.ndarray], dict[str, Any]]:
    """What `vggspec export --weights` compiles: the graph (SPEC's, or the checkpoint's own), the tensors, and the
    ExportOptions fields the checkpoint carries (labels, preprocessing, how it is tested)."""
    ckpt = load_checkpoint(str(weights))
    graph = load_spec(spec, sets) if spec is not None else checkpoint_graph(ckpt, str(weights), sets)
    refuse_preprocessing_sets(sets, graph.meta.preprocessing, ckpt.preprocessing, str(weights))
    check_tensors(graph, ckpt.tensors, str(weights))
    return graph, ckpt.tensors, _model_metadata(ckpt, weights)


def _model_metadata(ckpt: Checkpoint, path: str | Path) -> dict[str, Any]:
    from .backends.onnx_checkpoint import checkpoint_protocol

    return {"labels": ckpt.labels or None, "preprocessing": ckpt.preprocessing,
            **checkpoint_protocol(ckpt, path)}  # how it was trained: how it is tested


def refuse_preprocessing_sets(sets: tuple[str, ...], asked: Preprocessing, trained: Preprocessing | None,
                              weights: str) -> None:
    """--set scale/mean/std cannot change what a checkpoint's weights were trained on: the model carries
    the checkpoint's preprocessing, so such a --set that differs from it would be ignored in silence."""
    keys = sorted({s.split("=", 1)[0].strip() for s in sets} & {"scale", "mean", "std"})
    if keys and trained is not None and asked != trained:
        raise VggspecError(f"--set {', '.join(keys)}: the model takes the checkpoint's own preprocessing "
                           f"({trained.to_dict()}), which its weights were trained with", weights,
                           "leave those --set options out; to change the preprocessing, train with it")


@dataclass(frozen=True)
class Initialised:
    """A fresh checkpoint, its network, and the layers copied from a shallower net (source, target)."""

    checkpoint: Checkpoint
    graph: LayerGraph
    scheme: str
    copied: tuple[tuple[str, str], ...] = ()


def init_checkpoint(spec: str | Path, scheme: str | None = None, init_from: str | Path | None = None,
                    seed: int = 0, sets: tuple[str, ...] = ()) -> Initialised:
    """SPEC's initialised checkpoint (section 3.1): the scheme's seeded weights (default: the spec's `init`), or
    with `init_from` a shallower net's first four conv and last three FC layers and the rest seeded."""
    from .graph.load import load_spec
    from .weights import init_weights
    from .weights.shallow import init_from_shallow

    graph = load_spec(spec, sets)
    scheme = scheme or graph.meta.init
    source, copied = f"init:{scheme}:seed={seed}", ()
    if init_from is None:
        tensors = init_weights(graph, scheme, seed)
    else:
        shallow, shallow_graph = open_checkpoint(init_from)
        result = init_from_shallow(graph, shallow_graph, shallow.tensors, scheme, seed, str(init_from))
        tensors, copied, source = result.tensors, result.copied, f"{source};from:{Path(init_from).name}"
    ckpt = Checkpoint(tensors, spec=graph.meta.spec_text, preprocessing=graph.meta.preprocessing,
                      labels=graph.meta.labels, source=source, overrides=tuple(sets))
    return Initialised(ckpt, graph, scheme, copied)


@dataclass(frozen=True)
class Converted:
    """An imported checkpoint (or the graph of an exported one) and a note for the user, if any."""

    checkpoint: Checkpoint | None
    graph: LayerGraph
    note: str | None = None


def import_checkpoint(source: str, file: str | Path, spec: str | Path, sets: tuple[str, ...] = ()) -> Converted:
    """torchvision's .pth state_dict (source "torchvision"; SPEC may be vgg11..vgg19[_bn]) or the Caffe
    release's blobs ("caffe") as a vggspec checkpoint of SPEC, with the source's preprocessing."""
    if source == "torchvision":
        from .weights import torchvision as tv

        spec, sets = torchvision_spec(str(spec), sets)
        graph = load_spec(spec, sets)
        tensors, preprocessing = tv.from_torchvision(graph, tv.load_pth(file), str(file)), tv.PREPROCESSING
    elif source == "caffe":
        from .weights import caffe

        graph = load_spec(spec, sets)  # only the blobs the spec needs are read
        tensors, preprocessing = caffe.from_caffe(graph, caffe.load_blobs(file, graph), str(file)), caffe.PREPROCESSING
    else:
        raise ValueError(f"unknown weights source {source!r}; use torchvision or caffe")
    note = None
    if preprocessing.problem(graph.meta.input_shape[0]):  # ImageNet's RGB statistics, a network of other channels
        preprocessing = graph.meta.preprocessing
        note = (f"{source}'s preprocessing is for RGB images; the checkpoint takes the spec's (mean "
                f"{list(preprocessing.mean)}, std {list(preprocessing.std)}) for its {graph.meta.input_shape[0]}-"
                "channel input")
    ckpt = Checkpoint(tensors, spec=graph.meta.spec_text, preprocessing=preprocessing, labels=graph.meta.labels,
                      source=f"{source}:{Path(file).name}", overrides=tuple(sets))
    return Converted(ckpt, graph, note)


def torchvision_spec(spec: str, sets: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """`vgg16_bn` means D with norm=batch, unless a file of that name exists."""
    from .weights.torchvision import ARCHITECTURES, spec_for

    if not Path(spec).exists() and spec.lower().removesuffix("_bn") in ARCHITECTURES:
        base, extra = spec_for(spec.lower())
        return base, (*extra, *sets)
    return spec, sets


def export_checkpoint(target: str, checkpoint: str | Path, output: str | Path) -> Converted:
    """A vggspec checkpoint in torchvision's layout (target "torchvision": a .pth state_dict) or as Caffe blobs
    ("caffe": .npz), written atomically to OUTPUT."""
    ckpt, graph = open_checkpoint(checkpoint)
    note = None
    if target == "torchvision":
        from .weights import torchvision as tv

        tv.save_pth(output, tv.to_torchvision(graph, ckpt.tensors))
        if ckpt.preprocessing is not None and ckpt.preprocessing != tv.PREPROCESSING:
            # torchvision's users normalise as ImageNet models do; these weights expect other inputs
            note = f"the weights expect preprocessing {ckpt.preprocessing.to_dict()}, not torchvision's"
    elif target == "caffe":
        from .atomic import atomic_path
        from .weights import caffe

        blobs = caffe.to_caffe(graph, ckpt.tensors)
        with atomic_path(output, ".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **blobs)
    else:
        raise ValueError(f"unknown weights target {target!r}; use torchvision or caffe")
    return Converted(None, graph, note)
