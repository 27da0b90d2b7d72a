"""A vggspec checkpoint as the two ONNX models the paper's testing protocols need, without torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contract import paper_test_scales
from ..weights import Checkpoint, checkpoint_graph, load_checkpoint
from ..weights.checkpoint import training_record
from .onnx import export_onnx


def checkpoint_protocol(ckpt: Checkpoint, path: str | Path | None = None) -> dict[str, Any]:
    """ExportOptions fields carrying how a trained checkpoint is tested by default: the paper's test scales
    for its training scale range, its flip policy, and the record itself; {} for a checkpoint without one."""
    record = training_record(ckpt, None if path is None else str(path))
    if record is None:
        return {}
    return {"test_scales": paper_test_scales(*record["scale"]), "test_flip": record["flip"], "training": record}


def export_forms(checkpoint: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """Write FOLDER/standard.onnx and FOLDER/dense.onnx (fully convolutional, with a `scores` output) from a
    checkpoint, carrying its labels, preprocessing and test protocol: multi-crop needs the first, dense and heat
    maps the second."""
    ckpt = load_checkpoint(str(checkpoint))
    graph = checkpoint_graph(ckpt, str(checkpoint))
    folder = Path(folder)
    common = {"weights": ckpt.tensors, "labels": ckpt.labels or None, "preprocessing": ckpt.preprocessing,
              **checkpoint_protocol(ckpt, checkpoint)}
    standard, dense = folder / "standard.onnx", folder / "dense.onnx"
    export_onnx(graph, standard, **common)
    export_onnx(graph, dense, fully_conv=True, scores=True, **common)
    return standard, dense
