"""How a trained checkpoint is tested, as ONNX export options (its two forms: vggspec.checkpoints.export_forms)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..contract import paper_test_scales
from ..weights import Checkpoint
from ..weights.checkpoint import training_record


def checkpoint_protocol(ckpt: Checkpoint, path: str | Path | None = None) -> dict[str, Any]:
    """ExportOptions fields carrying how a trained checkpoint is tested by default: the paper's test scales
    for its training scale range, its flip policy, and the record itself; {} for a checkpoint without one."""
    record = training_record(ckpt, None if path is None else str(path))
    if record is None:
        return {}
    return {"test_scales": paper_test_scales(*record["scale"]), "test_flip": record["flip"], "training": record}

