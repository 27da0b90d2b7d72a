"""Whether a path the user gave can be opened as a file to read, asked before opening it: a named pipe
given where a file goes would block the reader for ever, and "no such file" is wrong for one that exists."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import VggspecError


def file_problem(path: str | Path, kind: str = "a file") -> str | None:
    """Why `path` cannot be read as `kind` (missing, a dangling or looping link, a folder, a pipe, device
    or socket, no permission), or None when it can."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        return _stat_problem(path, exc)
    if stat.S_ISDIR(info.st_mode):
        return f"is a folder, not {kind}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file (a device, pipe or socket)"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def require_file(path: str | Path, error: type[VggspecError], kind: str = "a file") -> Path:
    """`path`, or `error` (naming it) saying why it cannot be read as `kind`."""
    problem = file_problem(path, kind)
    if problem:
        raise error(problem, str(path))
    return Path(path)


def _stat_problem(path: Path, exc: OSError) -> str:
    if path.is_symlink():
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        return f"dangling symbolic link (to {os.readlink(path)})"
    if exc.errno == errno.ENOENT:
        return "no such file"
    return f"cannot read ({exc.strerror or exc})"


def printable(name: str | Path) -> str:
    """A file name as valid UTF-8 text for reports (JSON, CSV): bytes that are not UTF-8, which Python keeps
    as lone surrogates, shown as \\xNN escapes instead of making the whole output unwritable or invalid."""
    return str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
