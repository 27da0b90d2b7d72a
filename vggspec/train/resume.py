"""A run's own settings, read back from its folder: what `train --resume RUNDIR` continues with.

`train(run_config("runs/d"), resume=True, overrides={"epochs": 90})` continues a run from Python as
`vggspec train --resume runs/d --epochs 90` does from the command line: the spec, its --set options, the
data folder and every other setting come from the run's state (runs since issue 23 record the spec file
and the data folder as absolute paths; older ones as they were typed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import RESUMABLE_OVERRIDES, TrainConfig
from .state import read_settings


def run_config(rundir: str | Path) -> TrainConfig:
    """The settings the run in RUNDIR was trained with (rundir set to RUNDIR as given)."""
    return TrainConfig.from_dict({**read_settings(rundir)["config"], "rundir": str(rundir)})


def differing(run: TrainConfig, given: dict[str, Any]) -> dict[str, Any]:
    """The given options a resume cannot take (not in RESUMABLE_OVERRIDES) whose value differs from the
    run's; options equal to the run's own are no change and pass silently."""
    return {k: v for k, v in given.items()
            if k not in RESUMABLE_OVERRIDES and _normal(v) != _normal(getattr(run, k, None))}


def _normal(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
