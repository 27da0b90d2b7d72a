"""Run checkpoints that survive faults.

RUNDIR/state.pt holds everything a resume needs in ONE atomically replaced file: the model's
state_dict, optimizer, scheduler, epoch, step, the position in the epoch, the epoch's running sums and
the RNG states. Keeping the weights there too (not only in model.safetensors) means a kill between two
writes can never pair weights of step k with optimizer state of step k-1.
RUNDIR/model.safetensors is the deployable native checkpoint (spec, preprocessing, labels), also atomic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import VggspecError
from ..graph import LayerGraph, Preprocessing
from ..weights import Checkpoint, save_checkpoint

STATE = "state.pt"
MODEL = "model.safetensors"
FORMAT = "vggspec-train-state/1"


@dataclass
class Progress:
    """Where the run is: `epoch` (0-based, the one under way), `step` (optimizer steps done in it)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "count": 0.0,
                                                            "skipped": 0.0, "seconds": 0.0})


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch generator states (numpy arrays as lists so weights_only loading works)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in np_state["state"].items()}
    rng = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(rng["numpy"])
    np_state["state"] = {k: (np.array(v, dtype=np.uint64) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_state(rundir: Path, payload: dict[str, Any]) -> None:
    with atomic_path(rundir / STATE, ".pt") as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)


def load_state(rundir: str | Path, spec_text: str) -> dict[str, Any]:
    """The saved state of a run, checked to belong to this spec; clear errors otherwise."""
    rundir = Path(rundir)
    path = rundir / STATE
    if not path.is_file():
        raise VggspecError("holds no training run to resume (no state.pt)", str(rundir),
                           "give the -o folder of an earlier `vggspec train`, or start a new run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise VggspecError(f"cannot read the run state ({exc})", str(path)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise VggspecError("is not a vggspec run state", str(path))
    if state["spec_text"] != spec_text:
        raise VggspecError("this run was trained from another spec (or other --set options)", str(rundir),
                           "resume with the spec the run started from, or train into a new -o folder")
    return state


def has_run(rundir: Path) -> bool:
    return (rundir / STATE).is_file()


def save_model(rundir: Path, model: torch.nn.Module, graph: LayerGraph, pre: Preprocessing,
               labels: tuple[str, ...], extra: dict[str, str], overrides: tuple[str, ...] = ()) -> None:
    """The native safetensors checkpoint of the current weights (with the --set overrides it was built with)."""
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(tensors, spec=graph.meta.spec_text, preprocessing=pre, labels=labels,
                      source=f"train:{rundir.name}", extra=extra, overrides=tuple(overrides))
    save_checkpoint(rundir / MODEL, ckpt)
