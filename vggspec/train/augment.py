"""Section 3.1's augmentation, per image: isotropic rescale to S (fixed or jittered), a random crop of the
spec's input size, a random horizontal flip, AlexNet's PCA colour shift, then the mean and std. The pixel
work is vggspec.imaging's, shared with the runtime.

Every random draw comes from a numpy Generator the caller seeds per (run seed, epoch, image index): the
result depends on neither the worker that decoded the image nor the world size, so a resumed or a
distributed run sees exactly the images an uninterrupted single process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import VggspecError
from ..imaging import MAX_SCALE, center_crop, normalise, random_crop, rescale, scale_problem, to_array
from ..preprocessing import Preprocessing


@dataclass(frozen=True)
class Lighting:
    """PCA of the training set's pixel covariance (pixel * scale units): eigval (C,), eigvec (C, C) columns."""

    eigval: np.ndarray
    eigvec: np.ndarray
    std: float = 0.1  # AlexNet's alpha ~ N(0, 0.1)

    def shift(self, rng: np.random.Generator) -> np.ndarray:
        """One colour shift, eigvec @ (alpha * eigval); for one channel a brightness shift alpha * variance."""
        alpha = rng.normal(0.0, self.std, size=len(self.eigval))
        return (self.eigvec @ (alpha * self.eigval)).astype(np.float32)


@dataclass(frozen=True)
class Augment:
    """The training transform. `scale` is (Smin, Smax); equal ends mean a fixed S."""

    crop: tuple[int, int]  # H, W of the spec's input
    scale: tuple[int, int]
    preprocessing: Preprocessing
    flip: bool = True
    lighting: Lighting | None = None

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        s = int(rng.integers(self.scale[0], self.scale[1] + 1))
        pixels = random_crop(to_array(rescale(image, s)), self.crop, rng)
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        shift = self.lighting.shift(rng) if self.lighting is not None and self.lighting.std > 0 else None
        return _chw(normalise(pixels[None], self.preprocessing, shift))


@dataclass(frozen=True)
class CenterEval:
    """The validation transform: rescale to Q (the middle of the training range, as the paper tests), centre crop.

    The same functions as the runtime's preprocessing, so validation sees the pixels inference will see.
    """

    crop: tuple[int, int]
    size: int
    preprocessing: Preprocessing

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        pixels = center_crop(to_array(rescale(image, self.size)), self.crop)
        return _chw(normalise(pixels[None], self.preprocessing))


def _chw(batch: np.ndarray) -> np.ndarray:
    """The one image of a normalised NCHW batch, contiguous for torch.from_numpy."""
    return np.ascontiguousarray(batch[0], dtype=np.float32)


def parse_scale(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """`256` -> (256, 256); `256:512` -> (256, 512)."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        parts = text.split(":")
        try:
            lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
        except ValueError:
            lo, hi = 0, -1
    if lo < 1 or hi < lo:
        raise VggspecError(f"training scale '{text}' is not S or Smin:Smax with 0 < Smin <= Smax",
                           hint="e.g. --scale 256 or --scale 256:512")
    return lo, hi


def check_scale(scale: tuple[int, int], crop: tuple[int, int], spec: str | None = None) -> None:
    """S is the smallest side after rescaling, so it must be at least the crop (S >= 224 in the paper), and
    at most MAX_SCALE, or every image would be skipped as too large and the run would learn nothing."""
    if scale[0] < max(crop):
        raise VggspecError(f"training scale {scale[0]} is smaller than the spec's input crop {crop[0]}x{crop[1]}",
                           spec, f"use --scale {max(crop)} or more (S is the short side before the crop)")
    if scale_problem(scale[1]):
        raise VggspecError(f"training scale {scale[1]} {scale_problem(scale[1])}", spec,
                           f"use --scale of at most {MAX_SCALE}")
