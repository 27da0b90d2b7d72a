"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, no download) as an image folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import DataError
from .config import MAX_DATA_SIZE

SPLITS = ("train", "val", "test")
def check_size(size: int, least: int) -> None:
    """DataError when `size` (the side of the written images) is outside least..MAX_DATA_SIZE."""
    if not least <= size <= MAX_DATA_SIZE:
        raise DataError(f"image size {size} is outside {least}..{MAX_DATA_SIZE}",
                        hint=f"use --size {least} to {MAX_DATA_SIZE}")


def check_replaceable(existing: list[Path]) -> None:
    """DataError when an old split that --force would replace is a link or a file: it is named, not followed
    or half-removed (shutil.rmtree refuses links with a bare OSError)."""
    for folder in existing:
        if folder.is_symlink() or not folder.is_dir():
            raise DataError("is not a folder (a symbolic link or a file); --force replaces only real split folders",
                            str(folder), "remove it yourself, or write into another folder")


def split_indices(targets: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """A stratified, seeded train/val/test split: each class is shuffled and cut at the same fractions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {s: [] for s in SPLITS}
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        a = round(len(idx) * fractions[0])
        b = a + round(len(idx) * fractions[1])
        for name, chunk in zip(SPLITS, (idx[:a], idx[a:b], idx[b:]), strict=False):
            parts[name].extend(chunk.tolist())
    return {s: np.array(sorted(v)) for s, v in parts.items()}


def write_digits(out: str | Path, size: int = 32, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0, force: bool = False) -> dict[str, int]:
    """Write OUT/{train,val,test}/<digit>/<index>.png (grayscale, 0..255, upscaled to size x size)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    check_size(size, 8)
    out = Path(out)
    existing = [out / s for s in SPLITS if (out / s).exists() or (out / s).is_symlink()]
    if existing and not force:
        raise DataError("already holds a data set", str(existing[0]), "use --force to replace it, or another folder")
    check_replaceable(existing)
    for folder in existing:
        shutil.rmtree(folder)
    digits = load_digits()
    # Scans hold 0..16 ink levels: stretch to 0..255, then upscale smoothly (bicubic, clipped by PIL).
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    counts = {}
    for name, idx in split_indices(digits.target, fractions, seed).items():
        for i in idx:
            folder = out / name / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], "L").resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
        counts[name] = len(idx)
    return counts
