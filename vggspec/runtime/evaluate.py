"""Top-1 / top-5 error over a labelled image folder (DIR/<class>/*), under one or more protocols."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..display import csv_cell
from ..errors import DataError, ModelError
from ..files import printable
from ..imaging import class_folders, scan_image_folder
from .protocols import Protocol, Runner
from .session import ModelOutputError

# What running one image may raise without stopping the batch: a file that cannot be used (DataError),
# onnxruntime failing on that image's input (ModelError, e.g. it cannot allocate for one huge dense pass),
# or its arrays not fitting in memory. Problems of the whole run (models, protocols, scales) are raised
# before the first image, by Runner and the model loaders.
IMAGE_ERRORS = (DataError, ModelError, MemoryError)


def image_error(exc: BaseException) -> str:
    """The one-line reason an image failed, for its `path: error: ...` line and the report."""
    if isinstance(exc, MemoryError):
        return "out of memory while evaluating this image"
    if isinstance(exc, ModelError) and exc.path:
        return f"{exc.message} (model {exc.path})"
    return getattr(exc, "message", str(exc))


# Model failures in a row (no image succeeding in between) that end a batch run.
FAILURE_STREAK = 8


class FailureStreak:
    """Ends a batch run whose model fails image after image (weights that give NaN on every input, a GPU
    that went away) with one error, rather than one line per image for the whole data set. Files that
    cannot be used are the data's problem, not the model's: each is reported, and they neither count nor
    reset the streak."""

    def __init__(self, limit: int = FAILURE_STREAK) -> None:
        self.limit, self.streak = limit, 0

    def succeeded(self) -> None:
        self.streak = 0

    def failed(self, exc: BaseException) -> None:
        """Count one failure; raise ModelError when `limit` model failures have come in a row."""
        if isinstance(exc, DataError):
            return
        self.streak += 1
        if self.streak >= self.limit:
            raise ModelError(f"the model failed on {self.streak} images in a row, the last with: {image_error(exc)}",
                             hint="the run stopped here rather than fail on every image; fix the model or the "
                                  "device (--device cpu rules out the GPU) and run again") from None


def list_dataset(root: str | Path, labels: Sequence[str] = (), classes: int = 0,
                 allow_mismatch: bool = False) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image paths with class indices, class names): the one mapping of eval's folders to a model's classes.
    Indices follow `labels` when the folders are named after them, otherwise the sorted folder names (the
    ImageFolder convention training used; ImageNet's folders are WordNet ids while its labels are words).

    The folders must be the model's classes (`classes` outputs, named `labels`): otherwise a DataError names
    both sides and the likely cause (check_class_folders), unless `allow_mismatch`. Folders that are not the
    classes give every image a wrong class index, and the error rate means nothing.

    Entries named like images that cannot be read (a dangling symbolic link...) are listed too, in path
    order: evaluating them fails with the reason, so each is reported and counted as a failed image."""
    found = class_folders(root)
    if not allow_mismatch:
        check_class_folders(root, found, labels, classes)
    by_label = bool(labels) and set(found) <= set(labels)
    folder = scan_image_folder(root, labels if by_label else None,
                               "name the folders after the labels, or pass --labels FILE")
    return sorted(folder.items() + [(p, t) for p, t, _ in folder.problems]), list(folder.classes)


MISMATCH_HINT = ("give --data the folder whose subfolders are the classes; --allow-mismatch evaluates anyway "
                 "(with sorted folder names as class indices where they are not the model's labels)")


def check_class_folders(root: str | Path, found: Sequence[str], labels: Sequence[str], classes: int) -> None:
    """DataError unless the class folders `found` in `root` are the model's classes: every folder named after
    one of its `labels` (a test set of some of the classes is fine: names, not positions, give the indices);
    or, for folders not named after them (or a model without labels), exactly `classes` folders, numbered in
    sorted order, where one missing would shift every class after it. A model that says nothing of its
    classes (no metadata) cannot be checked."""
    n = classes or len(labels)
    named = [f for f in found if f in labels]
    if not n or len(named) == len(found) or (len(found) == n and not named):
        return
    root = Path(root)
    if named:
        unknown = [f for f in found if f not in labels]
        what = f"{_some(unknown)} {'is' if len(unknown) == 1 else 'are'} not among its labels"
        problem = f"the class folders do not match the model's {n} labels ({_some(labels)}): {what}"
    else:
        problem = (f"{len(found)} class folders ({_some(found)}) for a model of {n} classes"
                   + (f" ({_some(labels)})" if labels else ""))
    raise DataError(f"{problem}; {_likely_cause(root, found, labels, n, named)}", str(root), MISMATCH_HINT)


def _likely_cause(root: Path, found: Sequence[str], labels: Sequence[str], n: int, named: Sequence[str]) -> str:
    for name in found[:20]:  # the parent of train/, val/ and test/: its folders hold the class folders
        inner = [p.name for p in sorted((root / name).iterdir()) if p.is_dir() and not p.name.startswith(".")] \
            if (root / name).is_dir() else []
        if inner and (len(inner) == n or any(i in labels for i in inner)):
            return (f"{root / name} holds class folders itself ({_some(inner)}), so {root} looks one level too "
                    f"high: give --data {root / name}")
    if named:
        return "a folder that is not a class, or a model trained on other classes"
    if len(found) < n:
        return ("a class folder is missing: classes are numbered by sorted folder name, so every class after the "
                "missing one would be scored as the next")
    return "these folders hold more than the model's classes"


def _some(names: Sequence[str], limit: int = 6) -> str:
    """`'a', 'b', 'c'` or `'a', 'b', ... 'z' (26)` for a message."""
    shown = [repr(printable(str(x))) for x in names]
    if len(shown) <= limit:
        return ", ".join(shown)
    return f"{', '.join(shown[:limit - 1])}, ... {shown[-1]} ({len(shown)})"


@dataclass
class Score:
    """Running top-1 / top-5 errors of one protocol."""

    n: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0

    def add(self, posterior: np.ndarray, target: int) -> None:
        order = np.argsort(-posterior, kind="stable")
        self.n += 1
        self.top1_wrong += int(order[0] != target)
        self.top5_wrong += int(target not in order[:5])

    @property
    def top1(self) -> float:
        return 100.0 * self.top1_wrong / self.n if self.n else float("nan")

    @property
    def top5(self) -> float:
        return 100.0 * self.top5_wrong / self.n if self.n else float("nan")


@dataclass
class Report:
    scores: dict[Protocol, Score]
    failed: list[tuple[str, str]] = field(default_factory=list)
    # Per image: (path, target, top-1 class under each protocol), for paired comparisons and error analysis.
    predictions: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def add(self, path: str, target: int, results: dict[Protocol, np.ndarray]) -> None:
        """One image's posteriors under every protocol."""
        for proto, posterior in results.items():
            self.scores[proto].add(posterior, target)
        self.predictions.append((path, target, tuple(int(np.argmax(results[p])) for p in self.scores)))
        self.images += 1

    def fail(self, path: str, message: str) -> None:
        self.failed.append((path, message))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [{"protocol": p.name, "scales": [q for q in p.scales], "flip": p.flip, "images": s.n,
                      # null, not NaN, when no image was evaluated: NaN is not JSON, and not a result
                      "top1_error": s.top1 if s.n else None, "top5_error": s.top5 if s.n else None}
                     for p, s in self.scores.items()],
            "failed": [{"image": printable(path), "error": printable(msg)} for path, msg in self.failed],
            "images": self.images, "seconds": self.seconds, "images_per_s": self.images_per_s,
        }


def write_predictions(report: Report, path: str | Path, classes: Sequence[str]) -> Path:
    """One CSV row per image: file, true class, and the top-1 class under each protocol (atomically)."""
    import csv

    from ..atomic import atomic_path

    names = [f"{p.name}@{p.scales_text}" + ("+flip" if p.flip else "") for p in report.scores]
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "target", *names])
        for image, target, top1 in report.predictions:
            row = [printable(image), classes[target], *(classes[i] if i < len(classes) else i for i in top1)]
            writer.writerow([csv_cell(cell) for cell in row])  # names as text, never as formulas
    return Path(path)


def run_each(runner: Runner, paths: Sequence[str | Path],
             on_error: Callable[[str, str], None]) -> Iterator[dict[Protocol, np.ndarray] | None]:
    """Each image's posteriors under every protocol, in order; None for one that cannot be used or fails to
    run (IMAGE_ERRORS), after reporting it through `on_error`. The batch goes on, unless the model has failed
    FAILURE_STREAK times in a row. The one per-image failure policy of predict and eval."""
    streak = FailureStreak()
    for path in paths:
        try:
            results = runner.run(path)
        except ModelOutputError:  # the model's own contract: every image would fail alike
            raise
        except IMAGE_ERRORS as exc:
            on_error(str(path), image_error(exc))
            streak.failed(exc)
            yield None
        else:
            streak.succeeded()
            yield results


def evaluate(runner: Runner, items: Sequence[tuple[Path, int]],
             on_error: Callable[[str, str], None] | None = None,
             on_step: Callable[[], None] | None = None) -> Report:
    """Run every image (run_each); one that fails is reported through `on_error` and counted as failed."""
    report = Report({p: Score() for p in runner.protocols})

    def fail(path: str, message: str) -> None:
        report.fail(path, message)
        if on_error:
            on_error(path, message)

    start = time.perf_counter()
    for (path, target), results in zip(items, run_each(runner, [p for p, _ in items], fail), strict=True):
        if results is not None:
            report.add(str(path), target, results)
        if on_step:
            on_step()
    report.seconds = time.perf_counter() - start
    return report
