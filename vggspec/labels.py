"""Label files, read in one place: a spec's `labels:` and the command line's `--labels` alike.

One label per line (blank lines skipped), or a JSON list. Only regular files of a sane size are opened:
a device or a pipe given by mistake must not read forever or block.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

from .errors import DataError

MAX_BYTES = 16 * 2**20  # ImageNet-21k's 21,841 labels take under 1 MB


def read_labels(path: str | Path) -> tuple[str, ...]:
    """The labels in `path`; a DataError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise DataError(f"cannot read the label file ({exc.strerror or exc})", str(path)) from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError("the label file is not a regular file", str(path), "give a text file, one label per line")
    if info.st_size > MAX_BYTES:
        raise DataError(f"the label file is {info.st_size / 2**20:.0f} MB, more than {MAX_BYTES // 2**20} MB",
                        str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the label file ({exc})", str(path)) from None
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise DataError(f"the label file is not a valid JSON list ({exc})", str(path)) from None
        if not isinstance(values, list):
            raise DataError("the label file is not a JSON list", str(path))
        labels = tuple(str(v) for v in values)
    else:
        labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise DataError("the label file is empty", str(path))
    return labels
