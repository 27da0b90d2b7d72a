"""Label files, read in one place: a spec's `labels:` and the command line's `--labels` alike.

One label per line, or a JSON list; the n-th label names class n. Strict, because a label file is only
ever checked by its count: a blank line dropped in the middle, or a label given twice, shifts or merges
classes and every number computed with the file is silently wrong. Blank lines after the last label (and
the final newline) are fine, as is space around a label. Only regular files of a sane size are opened:
a device or a pipe given by mistake must not read forever or block.

A spec's `labels:` is confined to the spec's own folder and below (`spec_labels`): a spec is a file people
share, and whatever file it names ends up as class names in the ONNX metadata, checkpoints and `predict`'s
output, so `labels: /proc/self/environ` or `../../.ssh/id_rsa` would carry that file's lines away. A file
named on the command line (`--labels`, `--set labels=`) is the user's own choice and is read where it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import DataError, ModelError
from .files import require_file

MAX_BYTES = 16 * 2**20  # ImageNet-21k's 21,841 labels take under 1 MB


def read_labels(path: str | Path) -> tuple[str, ...]:
    """The labels in `path`; a DataError naming the file and what is wrong with it."""
    # Asked first, as for every file a user names: missing, a dangling link, a folder or a pipe is said the same way.
    path = require_file(path, DataError, "a label file")
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise DataError(f"the label file is {size / 2**20:.0f} MB, more than {MAX_BYTES // 2**20} MB",
                            str(path))
        # utf-8-sig: a byte-order mark (Windows editors) would otherwise stick to the first label.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the label file ({exc})", str(path)) from None
    labels = _json_labels(text, path) if text.lstrip().startswith("[") else _line_labels(text, path)
    if not labels:
        raise DataError("the label file is empty", str(path))
    return labels


def spec_labels(folder: str | Path, name: str) -> tuple[str, ...]:
    """The labels of a spec's `labels: NAME`, read from the spec's `folder` or below; a DataError when NAME is
    absolute or leads out of the folder (through `..` or a symbolic link), or is not a readable label file."""
    return read_labels(confined_path(folder, name))


def confined_path(folder: str | Path, name: str) -> Path:
    """`folder/name` with every link resolved, checked to lie inside `folder` (itself resolved, so a spec
    reached through a linked folder still finds its own files). The resolved path is what gets opened:
    a link swapped between this check and the read cannot lead out."""
    hint = ("name a label file in the spec's folder or below (labels: labels.txt), or one of yours on the command "
            "line (--set labels=FILE)")
    if Path(name).is_absolute():
        raise DataError("is an absolute path; a spec's labels file must be in the spec's folder or below",
                        name, hint)
    try:
        root = Path(folder).resolve(strict=True)
        path = (root / name).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a link loop, no permission: read_labels says which
        return Path(folder) / name
    if not path.is_relative_to(root):
        raise DataError(f"leads out of the spec's folder {root} (to {path})", name, hint)
    return path


def check_label_count(labels: Sequence[str], classes: int, path: str | Path) -> None:
    """A DataError unless there is one label per class: for a model (or spec) of `classes` outputs."""
    if len(labels) != classes:
        raise DataError(f"the label file has {len(labels)} labels for {classes} classes", str(path),
                        f"give {classes} labels, one per class in the order of the model's outputs")


def _line_labels(text: str, path: Path) -> tuple[str, ...]:
    """One label per line; a blank line before the last label is an error, not skipped."""
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if "" in lines:
        line = lines.index("") + 1
        raise DataError(f"line {line} is blank: the labels after it would name the wrong classes", str(path),
                        f"give one label per line, the n-th line naming class n; delete line {line} or name "
                        "its class")
    _check_unique(lines, path, "line")
    return tuple(lines)


def _json_labels(text: str, path: Path) -> tuple[str, ...]:
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise DataError(f"the label file is not a valid JSON list ({exc})", str(path)) from None
    if not isinstance(values, list):
        raise DataError("the label file is not a JSON list", str(path))
    labels = [str(v) for v in values]
    blank = [n for n, label in enumerate(labels, start=1) if not label.strip()]
    if blank:
        raise DataError(f"label {blank[0]} of the JSON list is empty", str(path), "give every class a name")
    _check_unique(labels, path, "label")
    return tuple(labels)


def _check_unique(labels: list[str], path: Path, unit: str) -> None:
    """Two classes with one name: predictions of either would read the same, and eval would merge them."""
    first: dict[str, int] = {}
    for n, label in enumerate(labels, start=1):
        if label in first:
            raise DataError(f"{unit} {n} repeats the label '{label}' of {unit} {first[label]}", str(path),
                            "every class needs its own label: rename one of the two (word lists of ImageNet "
                            "name two classes 'crane': 'crane (bird)', 'crane (machine)')")
        first[label] = n


def check_same_labels(named: Sequence[tuple[str, Sequence[str]]]) -> None:
    """ModelError when two models (name, labels) both name their classes and not in the same order:
    averaging their posteriors index by index (an ensemble, a fusion) would mix different classes.
    A model without labels cannot be checked: indices are all it has."""
    labelled = [(name, tuple(labels)) for name, labels in named if labels]
    for name, labels in labelled[1:]:
        first, theirs = labelled[0]
        if labels != theirs:
            at = next((i for i, (a, b) in enumerate(zip(labels, theirs, strict=False)) if a != b),
                      min(len(labels), len(theirs)))
            mine = labels[at] if at < len(labels) else "none"
            other = theirs[at] if at < len(theirs) else "none"
            raise ModelError(f"names class {at} '{mine}', and {first} names it '{other}': averaging the two "
                             "index by index would mix different classes", name,
                             "ensemble models trained on the same classes in the same order")
