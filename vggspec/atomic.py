"""Atomic file output: write beside the target, then rename, so no reader sees half a file."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import VggspecError


def check_output_path(path: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Path:
    """The output path, or a VggspecError when its folder is missing, it names a folder, or it is one of
    the command's `inputs` ((option, path) pairs): writing it would destroy that input."""
    path = Path(path)
    if path.is_dir():
        raise VggspecError("is a folder; give a file name", str(path))
    if not path.parent.is_dir():
        raise VggspecError(f"folder {path.parent} does not exist", str(path), "create it first")
    for option, source in inputs:
        if source is not None and same_file(path, source):
            raise VggspecError(f"is also this command's input ({option}); writing it would destroy that input",
                               str(path), "choose another output name")
    return path


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file: the same inode (links, other spellings) or the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:  # a link loop, a permission: not provably the same
        return False


# Temporaries are named after the target, this host and this process: `.d.onnx.vggspec-tmp-HOST-PID-xyz`.
# A write killed mid-way leaves one behind; the next write to the same target removes those whose
# process is gone (on this host only: on a shared file system another host's writer may be alive).
_MARK = "vggspec-tmp"


def temp_prefix(path: Path) -> str:
    """The prefix of this process's temporaries for `path` (files or folders, beside it)."""
    return f".{path.name}.{_MARK}-{socket.gethostname()}-{os.getpid()}-"


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporaries of killed writers of `path`; returns what was removed."""
    return _sweep(path.parent, f".{path.name}.{_MARK}-{socket.gethostname()}-")


def _sweep(folder: Path, head: str) -> list[Path]:
    """Remove the entries of `folder` named `HEAD<pid>-...` whose process is gone."""
    removed = []
    for entry in folder.glob(glob.escape(head) + "*"):
        pid = entry.name[len(head):].split("-", 1)[0]
        if pid.isascii() and pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else remove it."""
    path = check_output_path(path)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def scratch_folder(tag: str) -> Path:
    """A private folder in the system's temp folder, for files that live as long as this process.

    Named `vggspec-TAG-HOST-PID-xyz`; creating one removes those of the same tag left by processes of
    this host that are gone (killed before they could clean up: a checkpoint's exported models are
    hundreds of MB).
    """
    root = Path(tempfile.gettempdir())
    head = f"vggspec-{tag}-{socket.gethostname()}-"
    _sweep(root, head)
    return Path(tempfile.mkdtemp(prefix=f"{head}{os.getpid()}-", dir=root))
