"""Fault tolerance: a run SIGKILLed mid-epoch and resumed ends with the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_train_data import image_folder, tiny_spec

from vggspec.weights import load_checkpoint

torch = pytest.importorskip("torch")

from vggspec.train.state import read_progress  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI, but SIGKILLs its own process right after optimizer step KILL_AT: two steps after the
# checkpoint of step 8 (--save-every 4), in the middle of epoch 2 (steps 7 to 12).
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from vggspec.train import loop
    step = loop.Trainer._optimizer_step
    def killing_step(self, *args):
        step(self, *args)
        if self.progress.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    loop.Trainer._optimizer_step = killing_step
    from vggspec.cli import main
    main(sys.argv[1:], prog_name="vggspec")
    """
)


def _run(args: list[str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "KILL_AT": "10"}
    head = ["-c", code] if code else ["-m", "vggspec"]
    return subprocess.run([sys.executable, *head, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    # Batch norm and dropout on: buffers, optimizer momentum and the dropout RNG must all come back.
    spec = tiny_spec(tmp_path / "tiny.vgg", norm="batch", dropout=0.5)
    data = image_folder(tmp_path / "data", classes=3, per_class=8, size=12)

    def args(rundir: str, workers: str) -> list[str]:
        return ["train", str(spec), "--data", str(data), "-o", rundir, "--batch-size", "4", "--epochs", "2",
                "--lr", "0.05", "--scale", "10:12", "--save-every", "4", "--deterministic", "--no-progress",
                "--workers", workers]

    whole = _run(args("whole", "0"), tmp_path)
    assert whole.returncode == 0, whole.stderr
    killed = _run(args("killed", "1"), tmp_path, KILLER)
    assert killed.returncode == -9, killed.stderr
    progress = read_progress(tmp_path / "killed")
    assert progress == {**progress, "epoch": 1, "step": 2, "global_step": 8}
    resumed = _run(["train", str(spec), "--data", str(data), "--resume", "killed", "--workers", "0",
                    "--no-progress"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr

    a = load_checkpoint(tmp_path / "whole" / "model.safetensors")
    b = load_checkpoint(tmp_path / "killed" / "model.safetensors")
    assert a.extra["train.step"] == b.extra["train.step"] == "12"
    for key in a.tensors:
        np.testing.assert_array_equal(a.tensors[key], b.tensors[key], err_msg=key)
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("whole", "killed")]
    assert [r["epoch"] for r in rows[1]] == [1, 2]
    for x, y in zip(rows[0], rows[1], strict=True):
        for key in ("train_loss", "train_top1_err", "val_loss", "val_top1_err", "lr"):
            assert x[key] == y[key], key
