"""The image folder (torchvision's ImageFolder layout), its statistics, and a resumable global-batch sampler.

DIR/train/<class>/* and DIR/val/<class>/*; classes are the sorted folder names of train/.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from ..imaging import ImageFolder, class_folders, load_image, scan_image_folder

# A split of the data folder is an ImageFolder: file paths, class indices, class names.
Split = ImageFolder


def scan_split(root: Path, classes: tuple[str, ...] | None = None) -> Split:
    """List the images of one split; `classes` fixes the class order (the train split's)."""
    if not root.is_dir():
        raise DataError("no such folder", str(root), "the data folder needs train/<class>/ and val/<class>/ folders")
    split = scan_image_folder(root, classes, "every class folder of val/ needs its twin in train/")
    if os.environ.get("RANK", "0") == "0":  # every rank scans; one says what it skips
        for path, _, why in split.problems:  # a dangling link is the user's image gone missing: say so, once
            warnings.warn(f"{path}: {why}; skipped", stacklevel=2)
    return split


def label_order(root: Path, labels: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """The class order of a training folder: the spec's labels when every class folder is named after one
    (output n is then label n, whatever the folders' sorted order); None (sorted folder names) otherwise."""
    if not labels or not root.is_dir():
        return None
    found = class_folders(root)
    return tuple(labels) if set(found) <= set(labels) else None


def scan_folder(data: str | Path, classes: int, labels: tuple[str, ...] = ()) -> tuple[Split, Split]:
    """The train and val splits, checked against the spec's class count before any training. With the
    spec's `labels`, class folders named after them are put in the labels' order."""
    data = Path(data)
    if not data.is_dir():
        raise DataError("no such data folder", str(data))
    train = scan_split(data / "train", label_order(data / "train", labels))
    if len(train.classes) != classes:
        raise DataError(
            f"{len(train.classes)} class folders but the spec has {classes} classes", str(data / "train"),
            f"use --set classes={len(train.classes)}, or give one folder per class",
        )
    empty = [c for i, c in enumerate(train.classes) if i not in set(train.targets)]
    if empty and not (data / "train" / empty[0]).is_dir():  # a label of the spec without its folder
        raise DataError(f"no class folder for the spec's label '{empty[0]}'", str(data / "train"),
                        "give one folder per label, named after it")
    if empty:
        raise DataError(f"class folder '{empty[0]}' holds no images", str(data / "train"))
    return train, scan_split(data / "val", train.classes)


class ImageDataset:
    """Map-style dataset keyed by (epoch, index): the key seeds the image's augmentation.

    An unreadable image yields None; `collate` drops it and counts it, so an epoch never crashes.
    """

    def __init__(self, split: Split, transform: Callable, channels: int, seed: int) -> None:
        self.split, self.transform, self.channels, self.seed = split, transform, channels, seed
        self.cache: dict[int, Image.Image | None] = {}

    def __len__(self) -> int:
        return len(self.split)

    def preload(self, budget: int = 1 << 30) -> int:
        """Decode images into memory until `budget` bytes: a small set (digits) then costs no file I/O
        per epoch, and forked DataLoader workers share the cache. Returns the number cached."""
        used = 0
        for index in range(len(self.split)):
            image = self._load(index)
            used += 0 if image is None else image.width * image.height * len(image.getbands())
            if used > budget:
                break
            self.cache[index] = image
        return len(self.cache)

    def _load(self, index: int) -> Image.Image | None:
        if index in self.cache:
            return self.cache[index]
        try:
            return load_image(self.split.files[index], self.channels)
        except DataError:  # counted and skipped: one bad file must not end an epoch
            return None

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int] | None:
        epoch, index = key
        image = self._load(index)
        if image is None:
            return None
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            return self.transform(image, rng), self.split.targets[index]
        except DataError:  # e.g. too large once rescaled to S: skipped and counted like an unreadable file
            return None


# File descriptors a DataLoader worker costs the main process (its pipes and queues), and those of the batches
# in flight: torch passes each shared tensor as a descriptor ("file_descriptor" sharing), two batches per worker.
FDS_PER_WORKER = 16
FDS_SPARE = 64


def descriptor_problem(workers: int) -> str | None:
    """Why `workers` DataLoader workers would run out of file descriptors, or None. The soft limit is raised to
    the hard one first when that is enough (as a shell's `ulimit -n` would); otherwise, with too few, torch's
    workers fail to pass batches back and the main process waits for ever (`ulimit -n 16`)."""
    import resource

    if workers == 0:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 32
    need = in_use + workers * FDS_PER_WORKER + FDS_SPARE
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    if hard == resource.RLIM_INFINITY or hard >= need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(need, 4096), hard) if hard != resource.RLIM_INFINITY
                                                        else max(need, 4096), hard))
            return None
        except (ValueError, OSError):
            pass
    return (f"the process may open {soft} files (ulimit -n), and {workers} DataLoader worker(s) need about "
            f"{need} ({in_use} open already)")


def collate(batch: list) -> tuple:
    """Stack the readable samples; return (images, labels, number skipped)."""
    import torch

    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    x = torch.from_numpy(np.stack([b[0] for b in good]))
    y = torch.tensor([b[1] for b in good], dtype=torch.long)
    return x, y, skipped


class GlobalBatchSampler:
    """Yields this rank's micro-batches of (epoch, index) keys for one epoch, from step `start` on.

    The epoch's permutation depends only on (seed, epoch); a global batch of `batch` images is cut
    into `world` equal rank slices and each slice into `accumulate` micro-batches, so the images of
    an optimisation step are the same whatever the world size. The last partial batch is dropped so
    that every rank's share, and so the DDP gradient average, is exact.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, accumulate: int, seed: int,
                 epoch: int, start: int = 0) -> None:
        if batch % (world * accumulate):
            raise DataError(f"batch size {batch} does not split into {world} processes x {accumulate} steps",
                            hint="choose a batch size divisible by world size x --accumulate")
        if n < batch:
            raise DataError(f"the training set has {n} images, fewer than one batch of {batch}",
                            hint="use a smaller --batch-size")
        self.n, self.batch, self.rank, self.world, self.accumulate = n, batch, rank, world, accumulate
        self.seed, self.epoch, self.start = seed, epoch, start

    @property
    def steps(self) -> int:
        return self.n // self.batch

    @property
    def micro(self) -> int:
        return self.batch // (self.world * self.accumulate)

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accumulate

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = np.random.default_rng([self.seed, self.epoch, 0x5A3]).permutation(self.n)
        share = self.batch // self.world
        for step in range(self.start, self.steps):
            mine = perm[step * self.batch + self.rank * share:][:share]
            for a in range(self.accumulate):
                yield [(self.epoch, int(i)) for i in mine[a * self.micro:(a + 1) * self.micro]]


def eval_batches(n: int, batch: int, rank: int, world: int) -> list[list[tuple[int, int]]]:
    """Validation: every image once over all ranks (contiguous shards, no padding)."""
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    return [[(0, i) for i in mine[j:j + batch]] for j in range(0, len(mine), batch)]


def channel_stats(split: Split, channels: int, pixel_scale: float, limit: int = 1000,
                  side: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and the pixel covariance (pixel * scale units) over up to `limit` training images.

    Images are shrunk to `side` on the short side first: the mean and the colour covariance barely
    depend on resolution, and a fixed cost keeps the start of an ImageNet run short.
    """
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(split))[:limit]
    total, outer, count, bad = np.zeros(channels), np.zeros((channels, channels)), 0, 0
    for i in picks:
        try:
            image = load_image(split.files[i], channels)
        except DataError:
            bad += 1
            continue
        if min(image.size) > side:
            image.thumbnail((side * image.size[0] // min(image.size) + 1, side * image.size[1] // min(image.size) + 1))
        a = np.asarray(image, np.float64).reshape(-1, channels) * pixel_scale
        total += a.sum(0)
        outer += a.T @ a
        count += len(a)
    if count == 0:
        raise DataError("no readable training images", str(split.root))
    if bad:
        warnings.warn(f"{bad} unreadable training images skipped while computing the mean", stacklevel=2)
    mean = total / count
    return mean, outer / count - np.outer(mean, mean)
