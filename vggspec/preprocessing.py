"""Preprocessing: how decoded pixels become a network's input. The contract between every part.

The spec's header sets it, checkpoints and ONNX metadata carry it, the runtime applies it.
Standard library only, so that the runtime shares it without importing the compiler.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """input = (pixel * scale - mean) / std, pixels 0..255 in `channel_order`, laid out as `layout`."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale, "mean": list(self.mean), "std": list(self.std),
            "channel_order": self.channel_order, "layout": self.layout,
        }

    def problem(self, channels: int | None = None) -> str | None:
        """What makes this preprocessing unusable (NaN inputs, a division by zero), or for a network of
        `channels` input channels (one mean and std value each), or None."""
        numbers = (self.scale, *self.mean, *self.std)
        if not all(math.isfinite(v) for v in numbers) or self.scale <= 0 or min(self.std, default=0) <= 0:
            return "needs a finite positive scale and std, and a finite mean"
        if self.channel_order not in ("RGB", "BGR") or self.layout not in ("NCHW", "NHWC"):
            return "needs channel_order RGB or BGR and layout NCHW or NHWC"
        if channels is not None and (len(self.mean) != channels or len(self.std) != channels):
            return f"needs {channels} mean and std values, one per input channel"
        return None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            float(d.get("scale", 1 / 255)), tuple(map(float, d["mean"])), tuple(map(float, d["std"])),
            str(d.get("channel_order", "RGB")).upper(), str(d.get("layout", "NCHW")).upper(),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        return cls.from_dict(json.loads(text))
