"""DDP: two CPU processes (gloo) launched by torchrun end with the weights of one process on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train_data import image_folder, tiny_spec

from vggspec.weights import load_checkpoint

torch = pytest.importorskip("torch")

from vggspec.train.state import read_progress  # noqa: E402

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
    assert synced < 1e-6, synced  # measured 1.9e-8
    assert local > 1e-3, local  # measured 1.5e-2: per-process statistics train another network
    a, b = load_checkpoint(one), load_checkpoint(tmp_path / "sync" / "model.safetensors")
    assert a.tensors.keys() == b.tensors.keys()  # the converted module keeps the checkpoint's names
    for key in (k for k in a.tensors if "running" in k):
        np.testing.assert_allclose(a.tensors[key], b.tensors[key], rtol=1e-4, atol=1e-6, err_msg=key)


# Runs the CLI, but the worker with RANK == KILL_RANK SIGKILLs itself right after optimizer step KILL_AT:
# one node dies one step after the checkpoint of step 10 (--save-every 2), in the middle of epoch 4.
NODE_KILLER = """
import os, signal, sys
from vggspec.train import loop
step = loop.Trainer._optimizer_step
def killing_step(self, *args):
    step(self, *args)
    if os.environ.get("RANK") == os.environ["KILL_RANK"] and self.progress.global_step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
loop.Trainer._optimizer_step = killing_step
from vggspec.cli import main
main(sys.argv[1:], prog_name="vggspec")
"""


def _two_nodes(args: list[str], cwd: Path, code: str | None = None) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents on this machine acting as two nodes of one process each (c10d rendezvous)."""
    port = _free_port()
    program = ["--no-python", sys.executable, "-c", code] if code else ["-m", "vggspec"]
    env = {**_env(), "KILL_RANK": "1", "KILL_AT": "11"}
    # Node 0 serves the rendezvous store, as the node the endpoint names does on real machines; left to
    # torchrun, both agents here match 127.0.0.1 and whichever binds first serves it.
    env["PYTHONFAULTHANDLER"] = "1"  # SIGABRT then prints every thread's stack: a hung agent says where
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-conf", f"is_host={int(node == 0)}", "--rdzv-id", f"vggspec-{port}", *program, *args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = []
    for node, p in enumerate(procs):
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # a survivor stuck in a collective with a dead peer
            p.send_signal(signal.SIGABRT)
            try:
                out, err = p.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            err = f"node {node}'s agent hung and was stopped; its stacks:\n{err}"
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, and two single-process nodes, on the same global batch."""
    root = tmp_path_factory.mktemp("nodes")
    spec = tiny_spec(root / "tiny.vgg")  # no batch norm, no dropout: per-rank statistics would differ
    data = image_folder(root / "data", classes=3, per_class=8, size=12)
    (root / "args").write_text(json.dumps([str(spec), str(data)]))
    _train(_train_args(spec, data, root / "one"), root)
    nodes = _two_nodes(_train_args(spec, data, root / "nodes")[2:], root)
    assert [r.returncode for r in nodes] == [0, 0], "\n".join(r.stderr[-6000:] for r in nodes)
    return root


@pytest.mark.slow
def test_two_nodes_equal_one_process(two_node_runs: Path) -> None:
    a = load_checkpoint(two_node_runs / "one" / "model.safetensors")
    b = load_checkpoint(two_node_runs / "nodes" / "model.safetensors")
    assert (a.extra["train.world_size"], b.extra["train.world_size"]) == ("1", "2")
    assert a.extra["train.step"] == b.extra["train.step"] == str(2 * (24 // 8))
    for key in a.tensors:
        np.testing.assert_allclose(a.tensors[key], b.tensors[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_a_node_killed_mid_run_resumes_on_both_nodes_exactly(two_node_runs: Path) -> None:
    root = two_node_runs
    spec, data = json.loads((root / "args").read_text())
    longer = ["--save-every", "2", "--epochs", "4"]  # 12 steps of 3 per epoch
    whole = _two_nodes([*_train_args(Path(spec), Path(data), root / "whole")[2:], *longer], root)
    assert [r.returncode for r in whole] == [0, 0], whole[0].stderr[-4000:]
    killed = _two_nodes([*_train_args(Path(spec), Path(data), root / "killed")[2:], *longer], root, NODE_KILLER)
    assert all(r.returncode != 0 for r in killed)  # one node died; the other could not go on alone
    progress = read_progress(root / "killed")
    assert progress == {**progress, "epoch": 3, "step": 1, "global_step": 10}
    resumed = _two_nodes(["train", spec, "--resume", str(root / "killed"), "--data", data, "--workers", "0",
                          "--no-progress"], root)
    assert [r.returncode for r in resumed] == [0, 0], resumed[0].stderr[-4000:] + resumed[1].stderr[-4000:]
    a = load_checkpoint(root / "whole" / "model.safetensors")
    b = load_checkpoint(root / "killed" / "model.safetensors")
    assert a.extra["train.step"] == b.extra["train.step"] == str(4 * (24 // 8))
    for key in a.tensors:
        np.testing.assert_array_equal(a.tensors[key], b.tensors[key], err_msg=key)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "abc"}, "RANK='abc' is not a whole number"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set"),
    ({"RANK": "1"}, "RANK=1 is set without WORLD_SIZE"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "RANK=3 is outside WORLD_SIZE=2"),
])
def test_a_broken_torchrun_environment_is_named_before_training(tmp_path, monkeypatch, env, message):
    from click.testing import CliRunner

    from vggspec.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    spec = tiny_spec(tmp_path / "t.vgg")
    result = CliRunner().invoke(main, ["train", str(spec), "--data", str(tmp_path / "data"), "-o",
                                       str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "torchrun" in result.output and "internal" not in result.output
    assert not (tmp_path / "run").exists()
