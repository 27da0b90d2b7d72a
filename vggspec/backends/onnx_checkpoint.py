"""A vggspec checkpoint as the two ONNX models the paper's testing protocols need, without torch."""

from __future__ import annotations

from pathlib import Path

from ..weights import checkpoint_graph, load_checkpoint
from .onnx import export_onnx


def export_forms(checkpoint: str | Path, folder: str | Path) -> tuple[Path, Path]:
    """Write FOLDER/standard.onnx and FOLDER/dense.onnx (fully convolutional, with a `scores` output) from a
    checkpoint, carrying its labels and preprocessing: multi-crop needs the first, dense and heat maps the second."""
    ckpt = load_checkpoint(str(checkpoint))
    graph = checkpoint_graph(ckpt, str(checkpoint))
    folder = Path(folder)
    common = {"weights": ckpt.tensors, "labels": ckpt.labels or None, "preprocessing": ckpt.preprocessing}
    standard, dense = folder / "standard.onnx", folder / "dense.onnx"
    export_onnx(graph, standard, **common)
    export_onnx(graph, dense, fully_conv=True, scores=True, **common)
    return standard, dense
