"""The run state: safetensors plus JSON (no pickle), checksums, verification and fallback on resume."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_data import image_folder, tiny_spec

from vggspec.errors import VggspecError
from vggspec.weights import load_checkpoint

torch = pytest.importorskip("torch")

from vggspec.train import TrainConfig, train  # noqa: E402
from vggspec.train.state import (  # noqa: E402
    capture_rng,
    has_run,
    latest_state,
    read_progress,
    save_state,
)

FILES = {"tensors.safetensors", "state.json", "MANIFEST.json"}


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 2 epochs of 6 steps, saved every 4 steps: state/00000008 and state/00000012 remain."""
    root = tmp_path_factory.mktemp("state")
    spec = tiny_spec(root / "tiny.vgg", norm="batch", dropout=0.5)  # buffers, momentum and dropout RNG matter
    data = image_folder(root / "data", classes=3, per_class=8, size=12)
    train(TrainConfig(spec=str(spec), data=str(data), rundir=str(root / "whole"), batch_size=4, lr=0.05, epochs=2,
                      scale=(10, 12), save_every=4, workers=0, progress=False, deterministic=True))
    return root


def _copy(whole: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(whole / "whole", run)
    (run / "model.safetensors").unlink()  # a resume that trained writes it again
    return run


def _resume(whole: Path, run: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    from vggspec.cli import main

    def no_unpickling(*args: object, **kw: object) -> None:
        raise AssertionError("the run state must not be unpickled")

    monkeypatch.setattr(torch, "load", no_unpickling)
    return CliRunner().invoke(main, ["train", str(whole / "tiny.vgg"), "--data", str(whole / "data"), "--resume",
                                     str(run), "--workers", "0", "--no-progress"])


def _flip(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x5A
    path.write_bytes(bytes(data))


def _assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_checkpoint(a), load_checkpoint(b)
    assert x.extra["train.step"] == y.extra["train.step"] == "12"
    for key in x.tensors:
        np.testing.assert_array_equal(x.tensors[key], y.tensors[key], err_msg=key)


def test_the_state_is_safetensors_and_json_only(whole: Path) -> None:
    folders = sorted(p.name for p in (whole / "whole" / "state").iterdir())
    assert folders == ["00000008", "00000012"]  # the newest two; 4 and 6 were deleted
    for name in folders:
        folder = whole / "whole" / "state" / name
        assert {p.name for p in folder.iterdir()} == FILES
        for path in folder.iterdir():
            assert not path.read_bytes().startswith(b"\x80")  # a pickle's protocol opcode
        json.loads((folder / "state.json").read_text())
        manifest = json.loads((folder / "MANIFEST.json").read_text())["files"]
        assert set(manifest) == {"tensors.safetensors", "state.json"}
    assert not list((whole / "whole").glob("*.pt")) and read_progress(whole / "whole")["global_step"] == 12


def test_the_state_round_trips_exactly(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    random.random()
    np.random.random()
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "progress": {"epoch": 1, "step": 2, "global_step": 8, "sums": {"loss": 0.1 + 0.2}}, "rng": capture_rng(),
               "spec_text": "x", "stats": {"mean": [0.5]}}
    save_state(tmp_path, payload)
    folder, state = latest_state(tmp_path)
    assert folder == tmp_path / "state" / "00000008"
    for key, value in payload["model"].items():
        assert torch.equal(state["model"][key], value) and state["model"][key].dtype == value.dtype, key
    for i, s in optimizer.state_dict()["state"].items():
        assert torch.equal(state["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
    assert state["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]
    assert state["scheduler"] == scheduler.state_dict() and math.isinf(state["scheduler"]["best"])
    assert state["progress"] == payload["progress"]
    assert torch.equal(state["rng"]["torch"], payload["rng"]["torch"])
    assert state["rng"]["python"][1] == list(payload["rng"]["python"][1])
    fresh = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh.load_state_dict(state["optimizer"])  # takes the int keys back


def test_two_are_kept_and_a_newer_leftover_is_dropped(tmp_path: Path) -> None:
    def payload(step: int) -> dict:
        return {"progress": {"global_step": step}, "w": torch.full((2,), float(step))}

    for step in (4, 8, 12):
        save_state(tmp_path, payload(step))
    (tmp_path / "state" / ".tmp-00000016-1").mkdir()  # a kill during a save
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [".tmp-00000016-1", "00000008", "00000012"]
    save_state(tmp_path, payload(10))  # after a fallback to 8: 12 belongs to an abandoned timeline
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["00000008", "00000010"]
    save_state(tmp_path, payload(10))  # the same step again replaces it
    assert latest_state(tmp_path)[1]["w"].tolist() == [10.0, 10.0]


def test_a_fallback_damaged_since_it_was_written_is_replaced_by_an_older_good_one(tmp_path: Path) -> None:
    for step in (4, 8):
        save_state(tmp_path, {"progress": {"global_step": step}, "w": torch.full((2,), float(step))})
    _flip(tmp_path / "state" / "00000008" / "tensors.safetensors")  # the disk, after its save
    damaged = "00000008: tensors.safetensors does not match its sha256 .*removed, the fallback is now .*00000004"
    with pytest.warns(UserWarning, match=damaged):
        save_state(tmp_path, {"progress": {"global_step": 12}, "w": torch.full((2,), 12.0)})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["00000004", "00000012"]
    shutil.rmtree(tmp_path / "state" / "00000012")  # the latest lost too: the kept fallback still resumes
    assert latest_state(tmp_path)[1]["w"].tolist() == [4.0, 4.0]


def test_flipped_bytes_in_the_latest_fall_back_to_the_previous(whole: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(whole, tmp_path)
    _flip(run / "state" / "00000012" / "tensors.safetensors")
    result = _resume(whole, run, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "00000012: tensors.safetensors does not match its sha256" in result.output
    assert "resuming from the previous checkpoint" in result.output and "00000008" in result.output
    assert "epoch 2, val top-1 error" in result.output
    _assert_same_weights(whole / "whole" / "model.safetensors", run / "model.safetensors")
    assert read_progress(run)["global_step"] == 12  # written again, whole
    assert sorted(p.name for p in (run / "state").iterdir()) == ["00000008", "00000012"]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_bad_manifest_falls_back(whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   damage: str) -> None:
    run = _copy(whole, tmp_path)
    manifest = run / "state" / "00000012" / "MANIFEST.json"
    if damage == "missing":
        manifest.unlink()
    else:
        manifest.write_bytes(manifest.read_bytes()[:40])
    result = _resume(whole, run, monkeypatch)
    assert result.exit_code == 0, result.output
    assert "warning: " in result.output and "MANIFEST.json" in result.output and "00000008" in result.output
    _assert_same_weights(whole / "whole" / "model.safetensors", run / "model.safetensors")


def test_all_checkpoints_corrupt_is_a_clear_error(whole: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(whole, tmp_path)
    _flip(run / "state" / "00000012" / "tensors.safetensors")
    _flip(run / "state" / "00000008" / "state.json", at=30)
    result = _resume(whole, run, monkeypatch)
    assert result.exit_code == 1, result.output
    assert "error: no run checkpoint passes verification" in result.output and "hint:" in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


def test_an_old_state_pt_run_is_refused(whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "old"
    run.mkdir()
    (run / "state.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle; it must not be opened
    assert has_run(run)
    result = _resume(whole, run, monkeypatch)
    assert result.exit_code == 1, result.output
    assert "written by an older vggspec" in result.output and "Traceback" not in result.output
    with pytest.raises(VggspecError, match="older vggspec"):
        latest_state(run)
    fresh = CliRunner().invoke(main_cli(), ["train", str(whole / "tiny.vgg"), "--data", str(whole / "data"), "-o",
                                            str(run), "--workers", "0", "--no-progress"])
    assert fresh.exit_code == 1 and "written by an older vggspec, which cannot be resumed" in fresh.output
    assert "--resume" not in fresh.output


def main_cli() -> object:
    from vggspec.cli import main

    return main


def test_one_process_per_run_folder(whole: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from vggspec.train.state import lock_run

    run = _copy(whole, tmp_path)
    fresh = tmp_path / "fresh"
    train_fresh = ["train", str(whole / "tiny.vgg"), "--data", str(whole / "data"), "-o", str(fresh), "--workers",
                   "0", "--no-progress", "--epochs", "1"]
    with lock_run(run), lock_run(fresh):  # as a run still training there would
        result = _resume(whole, run, monkeypatch)
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"{run}: error: is in use by process {os.getpid()}\n"), result.output
        assert "hint: wait for that run to finish" in result.output
        result = CliRunner().invoke(main_cli(), train_fresh)
        assert result.exit_code == 1 and f"{fresh}: error: is in use by process" in result.output, result.output
        assert sorted(p.name for p in fresh.iterdir()) == [".vggspec.lock"]  # nothing of the refused run's
    assert not fresh.exists() or not list(fresh.iterdir())
    # A run killed with its lock file in place left no lock: the kernel dropped it with the process.
    (run / ".vggspec.lock").write_text("99999999\n")
    result = _resume(whole, run, monkeypatch)
    assert result.exit_code == 0 and "already finished" in result.output, result.output
    assert not (run / ".vggspec.lock").exists()


def test_metrics_of_a_new_run_start_afresh_and_never_follow_a_link(whole: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"epoch": 1, "val_top1_err": 0.5}\n{"epoch": 7}\n')  # an earlier run's rows
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(outside)
    result = CliRunner().invoke(main_cli(), ["train", str(whole / "tiny.vgg"), "--data", str(whole / "data"), "-o",
                                             str(run), "--workers", "0", "--no-progress", "--epochs", "1",
                                             "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert outside.read_text() == '{"epoch": 1, "val_top1_err": 0.5}\n{"epoch": 7}\n'
    assert not (run / "metrics.jsonl").is_symlink()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]


LIMITED_SAVE = """
import resource, sys, torch
from vggspec.errors import VggspecError
from vggspec.train.state import save_state
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_state(__import__("pathlib").Path(sys.argv[1]), {"progress": {"global_step": 8}, "w": torch.zeros(50_000)})
except VggspecError as exc:
    print(exc.format())
"""


def test_a_checkpoint_that_cannot_be_written_names_itself_and_keeps_the_last(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    save_state(tmp_path, {"progress": {"global_step": 4}, "w": torch.ones(4)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", LIMITED_SAVE, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.startswith(f"{tmp_path / 'state' / '00000008'}: error: cannot write: the file is larger "
                                    "than this process may write"), result.stdout + result.stderr
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["00000004"]  # no temporaries
    assert latest_state(tmp_path)[1]["w"].tolist() == [1.0] * 4
