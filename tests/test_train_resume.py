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


def _cli(*args: str) -> object:
    from click.testing import CliRunner

    from vggspec.cli import main

    return CliRunner().invoke(main, ["train", *args])


@pytest.fixture()
def started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-epoch run started with relative paths and a --set, from tmp_path/start."""
    start = tmp_path / "start"
    start.mkdir()
    tiny_spec(start / "tiny.vgg")
    image_folder(start / "data", classes=3, per_class=8, size=10)
    monkeypatch.chdir(start)
    result = _cli("tiny.vgg", "--data", "data", "-o", "run", "--set", "dropout=0.25", "--batch-size", "8",
                  "--epochs", "1", "--scale", "10", "--workers", "0", "--no-progress")
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)  # elsewhere: the run's relative paths no longer lead anywhere from here
    return start / "run"


def test_resume_rundir_alone_continues_the_run(started: Path) -> None:
    config = json.loads(next((started / "state").glob("*/state.json")).read_text())["config"]
    assert config["spec"] == str(started.parent / "tiny.vgg") and config["data"] == str(started.parent / "data")
    result = _cli("--resume", str(started), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert "epoch 2" in result.stdout and "note:" not in result.stderr
    assert load_checkpoint(started / "model.safetensors").overrides == ("dropout=0.25",)


def test_resume_takes_matching_options_and_names_the_runs_own(started: Path) -> None:
    spec, data = str(started.parent / "tiny.vgg"), str(started.parent / "data")
    # The command that started the run, with --resume: everything matches, so nothing is said.
    same = _cli(spec, "--data", data, "--resume", str(started), "--set", "dropout=0.25", "--batch-size", "8",
                "--scale", "10", "--workers", "0", "--no-progress")
    assert same.exit_code == 0 and same.stderr == "", same.output
    other = _cli(spec, "--resume", str(started), "--set", "dropout=0.5", "--epochs", "2")
    assert other.exit_code == 1 and "--set dropout=0.25" in other.stderr and spec in other.stderr, other.output
    assert f"vggspec train --resume {started}` alone" in other.stderr
    changed = _cli("--resume", str(started), "--lr", "0.5", "--batch-size", "8", "--no-flip", "--epochs", "2")
    assert changed.exit_code == 0, changed.output
    note = [line for line in changed.stderr.splitlines() if line.startswith("note: resuming")]
    assert note == ["note: resuming with the run's own settings; ignoring --lr 0.5 (the run's --lr 0.01), --no-flip "
                    "(the run's --flip) (a resumed run takes only --epochs, --wait-at-chance, --workers, --threads, "
                    "--save-every, --compile, --progress, --data, --device)"]


def test_a_new_run_still_needs_spec_and_data(tmp_path: Path) -> None:
    assert "Missing argument 'SPEC'" in _cli("--data", str(tmp_path)).output
    assert "Missing option '--data'" in _cli("A").output
