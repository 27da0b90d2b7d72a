"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, no download) as an image folder.

A data set is written whole or not at all (here and in scenes.py): under an exclusive lock on OUT, into a
hidden folder inside it, moved into place once complete. An interrupted run leaves no partial set under the
final names (which `train` would then train on), and `--force` replaces the old set only with a complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..atomic import folder_lock, naming_output, sweep_stale, temp_prefix
from ..errors import DataError
from ..limits import MAX_DATA_SIZE

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


def check_absent(out: Path, force: bool) -> list[Path]:
    """The split folders of an old set in `out` that --force replaces; a DataError when there is one and no --force,
    or when one of them is a link or a file."""
    existing = [out / s for s in SPLITS if (out / s).exists() or (out / s).is_symlink()]
    if existing and not force:
        raise DataError("already holds a data set", str(existing[0]), "use --force to replace it, or another folder")
    check_replaceable(existing)
    return existing


@contextmanager
def staged_set(out: Path, kind: str, force: bool) -> Iterator[Path]:
    """A hidden folder inside `out` to write a data set into, while `out` is locked against a second writer;
    the caller moves the finished set into place (move_into_place) before leaving. Removed however it ends."""
    with folder_lock(out, "wait for the other `vggspec data` to finish, or write into another folder"):
        check_absent(out, force)  # again under the lock: another writer may have finished meanwhile
        sweep_stale(out / kind)  # a killed earlier run's half-written folder
        with naming_output(out):
            tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out / kind), dir=out))
        try:
            with naming_output(out):
                yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: Path, out: Path, names: Sequence[str]) -> None:
    """Swap the finished entries tmp/NAME in for out/NAME. An old one is first renamed into tmp (removed with it),
    so each name always holds a whole set: never a deleted one, never a partial one."""
    for name in names:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, tmp / f".old-{name}")
        os.replace(tmp / name, out / name)


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
    check_absent(out, force)  # before loading anything
    digits = load_digits()
    # Scans hold 0..16 ink levels: stretch to 0..255, then upscale smoothly (bicubic, clipped by PIL).
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    counts = {}
    with staged_set(out, "digits", force) as tmp:
        for name, idx in split_indices(digits.target, fractions, seed).items():
            for i in idx:
                folder = tmp / name / str(digits.target[i])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[i], "L").resize((size, size), Image.BICUBIC).save(folder / f"{i:04d}.png")
            (tmp / name).mkdir(exist_ok=True)  # a split of no images is still a folder
            counts[name] = len(idx)
        move_into_place(tmp, out, SPLITS)
    return counts
