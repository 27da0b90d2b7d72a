"""Killed writes leave nothing that the next write to the same place does not clean up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vggspec.atomic import atomic_path, sweep_stale, temp_prefix

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporaries_of_dead_writers_are_swept_live_ones_kept(tmp_path: Path) -> None:
    target = tmp_path / "d.onnx"
    dead = temp_prefix(target).replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    (tmp_path / f"{dead}abc.onnx").write_bytes(b"x" * 100)
    (tmp_path / f"{dead}folder").mkdir()
    (tmp_path / f"{dead}folder" / "d.onnx.data").write_bytes(b"y")
    mine = tmp_path / f"{temp_prefix(target)}keep.onnx"  # this process is alive: another writer's file
    mine.write_bytes(b"z")
    other = tmp_path / ".e.onnx.vggspec-tmp-host-1-abc"  # another target, and another host: not ours
    other.write_bytes(b"w")
    with atomic_path(target, ".onnx") as tmp:
        tmp.write_bytes(b"model")
    assert target.read_bytes() == b"model"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d.onnx", mine.name, other.name])
    assert sweep_stale(target) == []


@pytest.mark.slow
def test_an_export_killed_mid_write_is_cleaned_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "d.onnx"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vggspec", "export", "D", "--set", "width=1/2", "-o", str(out)]
    for _ in range(3):  # killed while the temporary exists
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".d.onnx.vggspec-tmp-*")):
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert list(tmp_path.glob(".d.onnx.vggspec-tmp-*")), "no write was caught mid-way"
    assert not out.exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    assert [p.name for p in tmp_path.iterdir()] == ["d.onnx"]


def test_scratch_folders_of_dead_processes_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket
    import tempfile

    from vggspec.atomic import scratch_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"vggspec-models-{socket.gethostname()}-{_dead_pid()}-abc"
    (stale / "d.onnx").parent.mkdir()
    (stale / "d.onnx").write_bytes(b"x")
    other_tag = tmp_path / f"vggspec-ray-{socket.gethostname()}-{_dead_pid()}-abc"
    other_tag.mkdir()
    mine = scratch_folder("models")
    assert mine.is_dir() and not stale.exists() and other_tag.exists()
    assert scratch_folder("models").exists() and mine.exists()  # a live process's folder stays


# --- outputs that are not regular files -------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from vggspec.atomic import check_output_path
    from vggspec.cli import main
    from vggspec.errors import VggspecError

    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "null").symlink_to("/dev/null")  # as root, a rename over /dev/null itself would replace the device
    (tmp_path / "to-pipe").symlink_to(tmp_path / "pipe")
    (tmp_path / "out").symlink_to("/proc/self/fd/1")  # /dev/stdout's own link
    cases = {"pipe": "a named pipe", "null": "a character device (through a link)", "to-pipe": "a named pipe",
             "out": "a link to a stream of this process"}
    for name, what in cases.items():
        with pytest.raises(VggspecError, match="is " + re.escape(what)) as info:
            check_output_path(tmp_path / name)
        assert info.value.path == str(tmp_path / name) and info.value.hint
    for path in ("/dev/null", "/dev/stdout", "/proc/self/fd/2"):
        with pytest.raises(VggspecError, match="not a regular file|stream"):
            check_output_path(path)
    result = CliRunner().invoke(main, ["init", "A", "--set", "width=1/64", "-o", str(tmp_path / "null")])
    assert result.exit_code == 1 and "null: error: is a character device" in result.output, result.output
    assert (tmp_path / "null").is_symlink() and Path("/dev/null").is_char_device()
    assert (tmp_path / "pipe").is_fifo() and (tmp_path / "out").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null", "out", "pipe", "to-pipe"]  # no temporaries
    # A link to a regular file is replaced by the new file; the file it named is left as it was.
    (tmp_path / "old.txt").write_text("old")
    (tmp_path / "link.txt").symlink_to(tmp_path / "old.txt")
    with atomic_path(tmp_path / "link.txt") as tmp:
        tmp.write_text("new")
    assert not (tmp_path / "link.txt").is_symlink() and (tmp_path / "link.txt").read_text() == "new"
    assert (tmp_path / "old.txt").read_text() == "old"


# --- full disk, file-size limit ---------------------------------------------------------------------------
LIMITED = """
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))  # Python ignores SIGXFSZ: writes raise EFBIG
sys.argv = ["vggspec", *sys.argv[1:]]
runpy.run_module("vggspec", run_name="__main__")
"""


def _limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", LIMITED.format(limit=limit), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _only(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names), "temporaries left behind"


def test_a_file_size_limit_names_the_output_and_keeps_the_previous_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "a.safetensors"
    spec = ["A", "--set", "width=1/16"]  # 3 MB of weights
    assert _limited(2**30, "init", *spec, "-o", str(ckpt)).returncode == 0
    before = ckpt.read_bytes()
    result = _limited(100_000, "init", *spec, "--seed", "1", "-o", str(ckpt))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"{ckpt}: error: cannot write: the file is larger than this process may "
                                    "write"), result.stderr
    assert "the previous file is unchanged" in result.stderr and "hint:" in result.stderr
    assert "vggspec-tmp" not in result.stderr and "Traceback" not in result.stderr
    assert ckpt.read_bytes() == before
    for target, name in (("torchvision", "a.pth"), ("caffe", "a.npz")):  # torch's zip writer hides the errno
        result = _limited(100_000, "weights", "export", "--to", target, str(ckpt), "-o", str(tmp_path / name))
        assert result.returncode == 1 and result.stderr.startswith(f"{tmp_path / name}: error: cannot write"), \
            result.stderr
    _only(tmp_path, "a.safetensors")


# --- eval --predictions, SIGTERM -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny spec's ONNX model and checkpoint, and a labelled folder of 2 x 3 images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    (root / "s.vgg").write_text("input: 32x32\nclasses: 2\nconv3-4 maxpool FC-2 soft-max\n")
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * i, 100 * c, 30)).save(root / "data" / f"c{c}" / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in ("export", "init"):
        out = root / ("m.onnx" if command == "export" else "m.safetensors")
        subprocess.run([sys.executable, "-m", "vggspec", command, str(root / "s.vgg"), "-o", str(out)], env=env,
                       check=True, capture_output=True, timeout=120)
    return root


def test_eval_prints_its_report_before_a_csv_that_cannot_be_written(tiny: Path, tmp_path: Path) -> None:
    csv = tmp_path / "p.csv"
    result = _limited(64, "eval", str(tiny / "m.onnx"), "--data", str(tiny / "data"), "--json", "--predictions",
                      str(csv))
    assert result.returncode == 1, result.stderr
    assert json.loads(result.stdout)["images"] == 6  # the results are there
    assert result.stderr.strip().splitlines()[0] == (f"{csv}: error: cannot write: the file is larger than this "
                                                     "process may write (a file-size limit, `ulimit -f`)")
    _only(tmp_path)


def test_eval_checks_that_its_csv_can_be_written_before_evaluating(tiny: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    from click.testing import CliRunner

    import vggspec.runtime
    from vggspec.cli import main

    real = tempfile.mkstemp

    def read_only(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
        if dir is not None and Path(dir) == tmp_path:  # as root, chmod cannot make a folder read-only
            raise PermissionError(13, "Permission denied", str(tmp_path / ".p.csv.vggspec-tmp-x"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(vggspec.runtime, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    result = CliRunner().invoke(main, ["eval", str(tiny / "m.onnx"), "--data", str(tiny / "data"), "--predictions",
                                       str(tmp_path / "p.csv")])
    assert result.exit_code == 1
    assert result.output.startswith(f"{tmp_path / 'p.csv'}: error: cannot write: permission denied"), result.output


def test_sigterm_is_an_interrupt_and_a_checkpoint_eval_leaves_no_models(tiny: Path, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(scratch)}
    p = subprocess.Popen([sys.executable, "-m", "vggspec", "eval", str(tiny / "m.safetensors"), "--data",
                          str(tiny / "data"), "--scales", "32,48,64,96,128,160,192,256"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not list(scratch.glob("vggspec-models-*/*")):
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    assert not list(scratch.glob("vggspec-*"))  # (a library keeps a 51-byte session id there, .ses)


def test_a_folder_lock_admits_one_holder_and_leaves_nothing(tmp_path: Path) -> None:
    from vggspec.atomic import LOCK, folder_lock
    from vggspec.errors import VggspecError

    with folder_lock(tmp_path / "run") as run:
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(VggspecError, match=f"is in use by process {os.getpid()}") as info:
            with folder_lock(run, "wait"):
                pass
        assert info.value.path == str(run) and info.value.hint == "wait"
    assert list(run.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(VggspecError, match="is not a folder"):
        with folder_lock(tmp_path / "file"):
            pass
