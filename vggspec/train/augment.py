"""Section 3.1's augmentation, per image: isotropic rescale to S (fixed or jittered), a random crop of the
spec's input size, a random horizontal flip, AlexNet's PCA colour shift, then the mean and std.

Every random draw comes from a numpy Generator the caller seeds per (run seed, epoch, image index): the
result depends on neither the worker that decoded the image nor the world size, so a resumed or a
distributed run sees exactly the images an uninterrupted single process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import VggspecError


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
    channels: int
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = True
    lighting: Lighting | None = None

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        s = int(rng.integers(self.scale[0], self.scale[1] + 1))
        image = rescale(image, s)
        image = random_crop(image, self.crop, rng)
        x = to_array(image, self.channels, self.pixel_scale)
        if self.flip and rng.random() < 0.5:
            x = x[:, :, ::-1]
        if self.lighting is not None and self.lighting.std > 0:
            x = x + self.lighting.shift(rng)[:, None, None]
        return normalise(x, self.mean, self.std)


@dataclass(frozen=True)
class CenterEval:
    """The validation transform: rescale to Q (the middle of the training range, as the paper tests), centre crop."""

    crop: tuple[int, int]
    size: int
    channels: int
    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        image = rescale(image, self.size)
        w, h = image.size
        top, left = (h - self.crop[0]) // 2, (w - self.crop[1]) // 2
        image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        return normalise(to_array(image, self.channels, self.pixel_scale), self.mean, self.std)


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


def check_scale(scale: tuple[int, int], crop: tuple[int, int]) -> None:
    """S is the smallest side after rescaling, so it must be at least the crop (S >= 224 in the paper)."""
    if scale[0] < max(crop):
        raise VggspecError(f"training scale {scale[0]} is smaller than the input crop {crop[0]}x{crop[1]}",
                           hint=f"use --scale {max(crop)} or more")


def rescale(image: Image.Image, s: int) -> Image.Image:
    """Isotropic rescale so that the smallest side is s."""
    w, h = image.size
    if min(w, h) == s:
        return image
    if w <= h:
        size = (s, max(s, round(h * s / w)))
    else:
        size = (max(s, round(w * s / h)), s)
    return image.resize(size, Image.BILINEAR)


def random_crop(image: Image.Image, crop: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    top = int(rng.integers(0, h - crop[0] + 1))
    left = int(rng.integers(0, w - crop[1] + 1))
    return image.crop((left, top, left + crop[1], top + crop[0]))


def to_array(image: Image.Image, channels: int, pixel_scale: float) -> np.ndarray:
    """(C, H, W) float32 in pixel * scale units."""
    a = np.asarray(image, dtype=np.float32) * np.float32(pixel_scale)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray((x - m) / s, dtype=np.float32)
