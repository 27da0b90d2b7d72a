"""DDP: two CPU processes (gloo) launched by torchrun end with the weights of one process on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_data import image_folder, tiny_spec

from vggspec.weights import load_checkpoint

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # One thread per process: two ranks on two cores, and the same kernels in both runs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _train_args(spec: Path, data: Path, rundir: Path) -> list[str]:
    # Flips, jitter and PCA lighting stay on: their draws are seeded per image, not per process.
    return ["-m", "vggspec", "train", str(spec), "--data", str(data), "-o", str(rundir), "--batch-size", "8",
            "--epochs", "2", "--lr", "0.05", "--scale", "10:12", "--workers", "0", "--no-progress", "--deterministic"]


@pytest.mark.slow
def test_two_gloo_processes_equal_one(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")  # no batch norm, no dropout: per-rank statistics would differ
    data = image_folder(tmp_path / "data", classes=3, per_class=8, size=12)
    one = subprocess.run([sys.executable, *_train_args(spec, data, tmp_path / "one")], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, *_train_args(spec, data, tmp_path / "two")], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr + two.stdout
    a = load_checkpoint(tmp_path / "one" / "model.safetensors")
    b = load_checkpoint(tmp_path / "two" / "model.safetensors")
    assert int(a.extra["train.step"]) == int(b.extra["train.step"]) == 2 * (24 // 8)
    assert (a.extra["train.world_size"], b.extra["train.world_size"]) == ("1", "2")
    for key in a.tensors:
        np.testing.assert_allclose(a.tensors[key], b.tensors[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert a.preprocessing == b.preprocessing
    # Rank 0 alone reported and wrote: one summary line, one row per epoch.
    assert two.stdout.count("val top-1 error") == 1
    assert len((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()) == 2


def test_one_process_under_torchrun_joins_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 1 takes the real path (a process group, DDP), as nccl does on one GPU."""
    import socket

    import torch.distributed as dist

    from vggspec.train import distributed as D

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    world = D.setup("cpu")
    try:
        assert world.distributed and world.size == 1 and dist.get_backend() == "gloo"
        assert D.all_sum(world, 2.0, 3.0) == [2.0, 3.0]
    finally:
        D.teardown(world)
    assert not dist.is_initialized()
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key)
    assert not D.setup("cpu").distributed  # a plain run stays alone


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], cwd: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *(launcher or []), *args], cwd=cwd, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-9000:] + run.stdout[-2000:]
    return run


def _distance(a: Path, b: Path) -> float:
    """Relative L2 distance between two checkpoints' weights, over all tensors."""
    x, y = load_checkpoint(a).tensors, load_checkpoint(b).tensors
    num = sum(float(np.sum((x[k].astype(np.float64) - y[k]) ** 2)) for k in x if "num_batches" not in k)
    den = sum(float(np.sum(x[k].astype(np.float64) ** 2)) for k in x if "num_batches" not in k)
    return (num / den) ** 0.5


@pytest.mark.slow
def test_sync_bn_makes_two_processes_train_what_one_does(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "bn.vgg", norm="batch")  # no dropout: ranks draw different masks
    data = image_folder(tmp_path / "data", classes=3, per_class=8, size=12)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _train(_train_args(spec, data, tmp_path / "one"), tmp_path)
    _train([*_train_args(spec, data, tmp_path / "sync"), "--sync-bn"], tmp_path, torchrun)
    _train(_train_args(spec, data, tmp_path / "local"), tmp_path, torchrun)
    one = tmp_path / "one" / "model.safetensors"
    synced, local = _distance(one, tmp_path / "sync" / "model.safetensors"), _distance(
        one, tmp_path / "local" / "model.safetensors")
    assert synced < 1e-5, synced
    assert local > 100 * synced and local > 1e-3, (local, synced)  # per-process statistics: another network
    a, b = load_checkpoint(one), load_checkpoint(tmp_path / "sync" / "model.safetensors")
    assert a.tensors.keys() == b.tensors.keys()  # the converted module keeps the checkpoint's names
    for key in (k for k in a.tensors if "running" in k):
        np.testing.assert_allclose(a.tensors[key], b.tensors[key], rtol=1e-4, atol=1e-6, err_msg=key)
