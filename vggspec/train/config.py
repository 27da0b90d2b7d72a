"""The settings of one training run; stored in the run's state so that --resume continues with them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Options a resumed run may change: how it runs, not what it computes.
RESUMABLE_OVERRIDES = ("epochs", "workers", "threads", "save_every", "compile", "progress", "data", "device")


class TrainingNote(UserWarning):
    """Something training decided that the user should know, not a problem: `vggspec train` prints it as
    a note. A warning category (defined here, free of torch) so that library callers see it too."""


@dataclass
class TrainConfig:
    spec: str
    data: str
    rundir: str
    sets: tuple[str, ...] = ()
    scale: tuple[int, int] | None = None  # None: the spec's input size plus 1/8, as 256 is to 224
    batch_size: int = 256
    accumulate: int = 1
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 74
    patience: int = 5
    max_decreases: int = 3
    init_from: str | None = None
    weights: str | None = None
    seed: int = 0
    deterministic: bool = False
    save_every: int = 0
    workers: int = 2
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default (one per core)
    compile: bool = False
    bf16: bool = False
    channels_last: bool = False
    sync_bn: bool = False  # batch norm over the global batch under DDP
    flip: bool = True
    lighting: float = 0.1
    device: str = "auto"
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sets"], d["scale"] = list(self.sets), list(self.scale) if self.scale else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["sets"] = tuple(d.get("sets", ()))
        d["scale"] = tuple(d["scale"]) if d.get("scale") else None
        return cls(**d)
