"""The settings of one training run; stored in the run's state so that --resume continues with them."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from ..errors import VggspecError
from ..limits import MAX_LR, MAX_WEIGHT_DECAY

# Options a resumed run may change: how long and how it runs, not what each step computes.
RESUMABLE_OVERRIDES = ("epochs", "wait_at_chance", "workers", "threads", "save_every", "compile", "progress", "data",
                       "device")


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
    lr_steps: tuple[int, ...] = ()  # epochs after which the rate is divided by 10; empty: the plateau schedule
    wait_at_chance: int = 0  # epochs at chance before the net starts to learn, at most this many, add to `epochs`
    init_from: str | None = None
    weights: str | None = None
    seed: int = 0
    deterministic: bool = False
    save_every: int = 0
    workers: int | None = None  # DataLoader workers; None: 0 when the training set fits in memory, else 2
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default (one per core)
    compile: bool = False
    bf16: bool = False
    channels_last: bool = False
    sync_bn: bool = False  # batch norm over the global batch under DDP
    flip: bool = True
    lighting: float = 0.1
    device: str = "auto"
    progress: bool = True

    def check(self) -> None:
        """Refuse values torch would reject mid-setup (a raw ValueError) or take silently (a NaN), naming the
        option; --weights and --init-from are two ways to start, so both at once is refused too."""
        for option, value, ok, need in (
            # 0 as torch allows (the weights stay as they start); the CLI asks for more than 0, as a typo is likelier.
            ("--lr", self.lr, 0 <= self.lr <= MAX_LR,
             f"a learning rate above 0 and at most {MAX_LR:g}, e.g. 0.01 (0.001 to fine-tune)"),
            ("--momentum", self.momentum, 0 <= self.momentum < 1, "a momentum from 0 to below 1, e.g. 0.9"),
            ("--weight-decay", self.weight_decay, 0 <= self.weight_decay <= MAX_WEIGHT_DECAY,
             f"a weight decay from 0 to {MAX_WEIGHT_DECAY:g}, e.g. 5e-4"),
            ("--lighting", self.lighting, self.lighting >= 0, "a lighting std of 0 (off) or more, e.g. 0.1"),
        ):
            if not (math.isfinite(value) and ok):
                raise VggspecError(f"{option} {value} is out of range", hint=f"use {need}")
        steps = self.lr_steps
        if any(e < 1 for e in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise VggspecError(f"--lr-steps {','.join(map(str, steps))} is not a rising list of epochs",
                               hint="use epochs from 1 up, each later than the one before, e.g. 15,18")
        if self.weights and self.init_from:
            raise VggspecError("--weights and --init-from are alternatives: both say where the weights start",
                               hint="--weights to fine-tune a net of this spec, --init-from to start a deeper net "
                                    "from a shallower one's layers")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sets"], d["scale"] = list(self.sets), list(self.scale) if self.scale else None
        d["lr_steps"] = list(self.lr_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["sets"] = tuple(d.get("sets", ()))
        d["scale"] = tuple(d["scale"]) if d.get("scale") else None
        d["lr_steps"] = tuple(d.get("lr_steps", ()))
        return cls(**d)


# The one source of training defaults: `vggspec train`'s options read theirs from here, so the command and a
# TrainConfig made in Python cannot drift apart (tests/test_cli_train.py checks every option against it).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
