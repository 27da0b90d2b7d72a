"""A model's input from an image file, as the model's metadata says (decoding and pixels: vggspec.imaging)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..imaging import load_pixels, model_input, rescaled_size
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


def check_static_size(pixels: np.ndarray, fixed: tuple[int, int] | None, path: str | None, q: int | None,
                      source: tuple[int, int] | None = None) -> None:
    """A model exported with --static-shape takes exactly `fixed` (H, W): DataError for another size, saying
    which --scales makes this image (`source`: width, height before rescaling) that size, or that none does.
    In the message, not a hint: a failing image of a batch run gets one line, and hints are left off it."""
    if fixed is None or tuple(pixels.shape[:2]) == fixed:
        return
    raise DataError(f"at Q={q if q is not None else 'native'} the image is {pixels.shape[0]}x{pixels.shape[1]}, "
                    f"but the model takes exactly {fixed[0]}x{fixed[1]} (exported with --static-shape); "
                    f"{_fitting_scale(source, fixed)}", path,
                    "export the model without --static-shape to take every size")


def _fitting_scale(source: tuple[int, int] | None, fixed: tuple[int, int]) -> str:
    """The one Q that could fit (the image's shorter side becomes Q), when it really does."""
    if source is None:
        return "choose --scales that give images that size"
    w, h = source
    q = fixed[0] if h <= w else fixed[1]
    if rescaled_size(source, q) == (fixed[1], fixed[0]):
        return f"--scales {q} makes this image {fixed[0]}x{fixed[1]}"
    return f"no --scales fits: this image is {h}x{w}, of other proportions"


def to_input(batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """What the model's input takes: raw uint8 NHWC when it embeds preprocessing, else normalised floats."""
    return model_input(batch, info.preprocessing, info.embedded_preprocessing, info.input_dtype)


def preprocess(path: str | Path, info: ModelInfo, q: int | None) -> np.ndarray:
    """One image file to a 1-image input batch for `info`'s model at scale Q (the dense form)."""
    pixels = load_pixels(path, info.channels, q)
    check_size(pixels, info.input_size, str(path), q)
    return to_input(pixels[None], info)
