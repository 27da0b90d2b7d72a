"""Atomic file output: write beside the target, then rename, so no reader sees half a file.

An output that exists and is not a regular file (a device such as /dev/null, a pipe, a socket, a terminal,
or a link to one, or to a stream of this process such as /dev/stdout) is refused: the rename would replace
the device or the link with a regular file, and writing through it instead would give up atomicity for one
case. Write to a file and copy or print that. A link to a regular file is replaced by the new file, as every
rename-based writer does (the file it pointed to is untouched): files inside a run folder never write through
a link to somewhere outside it.

A write that fails (full disk, file-size limit, read-only file system) is an error naming the output, not
the hidden temporary; the temporary is removed and the previous file stays as it was.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import resource
import shutil
import socket
import stat
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
    check_replaceable(path)
    for option, source in inputs:
        if source is not None and same_file(path, source):
            raise VggspecError(f"is also this command's input ({option}); writing it would destroy that input",
                               str(path), "choose another output name")
    return path


def check_replaceable(path: Path) -> None:
    """A VggspecError when `path` exists and is not a regular file, or is a link to one or to a stream of this
    process: the atomic rename would replace it (as root, /dev/null itself) with a regular file."""
    what = _not_regular(path)
    if what:
        raise VggspecError(f"is {what}; vggspec writes a new file and renames it into place, which would replace "
                           "it with a regular file", str(path),
                           "give the name of a regular file (write to a file, then copy or print it)")


def _not_regular(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (through any links), else None."""
    hop, hops = path, 0
    while hops < 40 and hop.is_symlink():  # /dev/stdout -> /proc/self/fd/1 -> whatever stdout is now
        if _is_proc(hop):
            return "a link to a stream of this process"
        hop, hops = hop.parent / os.readlink(hop), hops + 1
    if _is_proc(hop):
        return "a file of /proc (a stream or a kernel file)"
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, a dangling link or a loop: nothing to replace but the name
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a folder is check_output_path's own error
        return None
    kind = ("a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"{kind}{' (through a link)' if path.is_symlink() else ''}, not a regular file"


def _is_proc(path: Path) -> bool:
    parts = Path(os.path.abspath(path)).parts
    return parts[1:2] == ("proc",) or parts[1:3] == ("dev", "fd")


def check_writable(path: str | Path) -> None:
    """Before long work whose result goes to `path`: create (and remove) a temporary beside it, so a folder
    that cannot be written to is an error now, not after the work is lost."""
    path = check_output_path(path)
    with naming_output(path):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)


# Errors of writing, by errno: what to say and what to do.
_WRITE_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space or write to another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space or write to another disk"),
    errno.EFBIG: ("the file is larger than this process may write (a file-size limit, `ulimit -f`)",
                  "raise the limit (ulimit -f unlimited) or write a smaller file"),
    errno.EROFS: ("the file system is read-only", "write to another folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write to"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to"),
}
_RUST_ERRNO = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust's io::Error) reports one


def write_error(path: str | Path, exc: BaseException, written: Path | None = None) -> VggspecError | None:
    """`exc`, raised while writing `path` (through the temporary `written`), as an error naming `path` and
    saying what ran out; None when it is not an I/O error (a bug, or an error of its own to report)."""
    if isinstance(exc, VggspecError):
        return None
    if isinstance(exc, OSError) and not _about(Path(path), exc.filename, written):
        return None  # about another file (an input read while writing): its own error
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and not isinstance(exc, OSError):
        match = _RUST_ERRNO.search(str(exc))
        code = int(match.group(1)) if match else _diagnose(written)
        if code is None:
            return None
    what, hint = _WRITE_ERRORS.get(code or 0, (getattr(exc, "strerror", None) or str(exc), None))
    unchanged = "; the previous file is unchanged" if Path(path).exists() else ""
    return VggspecError(f"cannot write: {what}{unchanged}", str(path), hint)


def _about(path: Path, filename: object, written: Path | None = None) -> bool:
    """Whether an OSError's file name is `path` (or inside it, for a folder written in place), its folder, one
    of its temporaries or inside the temporary `written` (or is not given)."""
    if filename is None:
        return True
    other = Path(os.fsdecode(filename)) if isinstance(filename, (str, bytes)) else None
    return other is not None and (other == path.parent or other.is_relative_to(path) or (  # (a folder's files)
        other.parent == path.parent and other.name.startswith(f".{path.name}.{_MARK}-")) or (
        written is not None and other.is_relative_to(written)))


def _diagnose(written: Path | None) -> int | None:
    """Why a writer that hides its OSError (torch's zip writer says "unexpected pos") failed: the disk is
    full, or the temporary reached the file-size limit; None when neither."""
    if written is None:
        return None
    try:
        if os.statvfs(written.parent).f_bavail == 0:
            return errno.ENOSPC
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written.exists() and written.stat().st_size >= limit - 4096:
            return errno.EFBIG
    except OSError:
        return None
    return None


@contextmanager
def naming_output(path: str | Path, written: Path | None = None) -> Iterator[None]:
    """Turn an I/O error of writing `path` (through the temporary `written`) into a VggspecError naming
    `path`; other exceptions pass unchanged."""
    try:
        yield
    except Exception as exc:
        error = write_error(path, exc, written)
        if error is None:
            raise
        raise error from None


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
    with naming_output(path):
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with naming_output(path, tmp_path):
            yield tmp_path
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            check_replaceable(path)  # made a device or a pipe while the file was written
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


LOCK = ".vggspec.lock"


@contextmanager
def folder_lock(folder: str | Path, hint: str = "wait for it to finish, or use another folder") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if missing) while the body runs: a second process (a second
    `train -o` or `--resume` of a running run, a second `data scenes` into one folder) is refused with
    "is in use by process N" instead of the two deleting each other's files.

    The lock is flock(2) on FOLDER/.vggspec.lock, holding the owner's pid: the kernel drops it when the process
    ends, however it ends, so a killed run never leaves a stale lock (only a file that the next run takes).
    """
    import fcntl  # POSIX: imported here so the runtime's modules still import where it is missing

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise VggspecError("is not a folder (a file, a device or a pipe)", str(folder), "give a folder's name")
    with naming_output(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        with naming_output(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise VggspecError(f"is in use by process {owner}", str(folder), hint) from None
        if _same_inode(fd, path):  # not removed by the owner that just released it: ours
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield folder
    finally:
        if _same_inode(fd, path):  # removed while held, so that a finished run leaves no lock file
            path.unlink(missing_ok=True)
        os.close(fd)


def _same_inode(fd: int, path: Path) -> bool:
    try:
        mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)
