"""Killed writes leave nothing that the next write to the same place does not clean up."""

from __future__ import annotations

import os
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
