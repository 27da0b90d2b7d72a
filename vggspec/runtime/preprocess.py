"""A model's input from an image file, as the model's metadata says (decoding and pixels: vggspec.imaging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..imaging import load_pixels, model_input
from .session import ModelInfo


def check_size(pixels: np.ndarray, minimum: tuple[int, int], path: str | None, q: int | None) -> None:
    """An image smaller than the model's input (crop size, or a dense model's minimum) cannot run."""
    h, w = pixels.shape[:2]
    if h < minimum[0] or w < minimum[1]:
        at = f"after rescaling to Q={q}" if q is not None else "at its own size"
        raise DataError(
            f"too small: {h}x{w} pixels {at}; the model needs at least {minimum[0]}x{minimum[1]}",
            path, "use a larger --scales value" if q is not None else None,
        )


def to_input(batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """What the model's input takes: raw uint8 NHWC when it embeds preprocessing, else normalised floats."""
    return model_input(batch, info.preprocessing, info.embedded_preprocessing, info.input_dtype)


def preprocess(path: str | Path, info: ModelInfo, q: int | None) -> np.ndarray:
    """One image file to a 1-image input batch for `info`'s model at scale Q (the dense form)."""
    pixels = load_pixels(path, info.channels, q)
    check_size(pixels, info.input_size, str(path), q)
    return to_input(pixels[None], info)
