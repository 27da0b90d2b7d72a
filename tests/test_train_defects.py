"""Training defects found in review: resume notes and class checks, the spec's mean, no empty run folder."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_data import image_folder, tiny_spec
from test_train_loop import config

from vggspec.errors import DataError, WeightsError
from vggspec.weights import load_checkpoint

torch = pytest.importorskip("torch")

from vggspec.train import train  # noqa: E402
from vggspec.train.config import TrainingNote  # noqa: E402
from vggspec.train.data import channel_stats, scan_folder  # noqa: E402
from vggspec.train.loop import TrainingError  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=10)


def cli(*args: str) -> object:
    from vggspec.cli import main

    return CliRunner().invoke(main, ["train", *args])


def notes(run: Callable[[], object]) -> list[str]:
    """The TrainingNotes `run()` gives."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in seen if issubclass(w.category, TrainingNote)]


def without_mean(spec: Path) -> Path:
    spec.write_text("".join(line for line in spec.read_text().splitlines(True) if not line.startswith("mean:")))
    return spec


def test_resume_names_every_ignored_option(tmp_path: Path, folder: Path) -> None:
    spec, run = tiny_spec(tmp_path / "tiny.vgg"), str(tmp_path / "run")
    common = [str(spec), "--data", str(folder), "--batch-size", "8", "--workers", "0", "--no-progress"]
    assert cli(*common, "-o", run, "--epochs", "1", "--scale", "10").exit_code == 0
    result = cli(*common, "--resume", run, "--epochs", "1", "--lr", "0.5", "--momentum", "0", "--seed", "5",
                 "--scale", "12", "--lighting", "0.5", "--weight-decay", "0.1", "--no-flip")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: resuming")]
    assert len(notes) == 1, result.stderr
    ignored, taken = notes[0].removeprefix("note: resuming with the run's own settings; ignoring ").split(" (")
    assert ignored.split(", ") == ["--batch-size", "--lr", "--momentum", "--seed", "--scale", "--lighting",
                                   "--weight-decay", "--no-flip"]  # in --help order; not --data, --workers, ...
    assert taken.startswith("a resumed run takes only --epochs, --workers")


def test_resume_refuses_other_class_folders(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    train(config(spec, folder, tmp_path / "run"))
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    train(config(spec, moved, tmp_path / "run"), resume=True, overrides={"data": str(moved), "epochs": 2})
    for split in ("train", "val"):
        (moved / split / "class2").rename(moved / split / "two")
    with pytest.raises(DataError, match=r"differ from the run's \(missing 'class2'; new 'two'\)") as info:
        train(config(spec, moved, tmp_path / "run"), resume=True, overrides={"data": str(moved), "epochs": 3})
    assert info.value.path == str(moved / "train") and "--weights" in (info.value.hint or "")
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").labels == ("class0", "class1", "class2")


def test_the_spec_mean_is_used_when_it_sets_one(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")  # mean: 0.5 0.5 0.5
    assert notes(lambda: train(config(spec, folder, tmp_path / "set"))) == []
    assert load_checkpoint(tmp_path / "set" / "model.safetensors").preprocessing.mean == (0.5, 0.5, 0.5)
    # --set mean=... is the user's choice as well.
    train(config(without_mean(spec), folder, tmp_path / "override", sets=("mean=0.25 0.5 0.75",)))
    assert load_checkpoint(tmp_path / "override" / "model.safetensors").preprocessing.mean == (0.25, 0.5, 0.75)


def test_the_training_set_mean_is_used_and_said_when_the_spec_sets_none(tmp_path: Path, folder: Path) -> None:
    spec = without_mean(tiny_spec(tmp_path / "tiny.vgg"))
    with pytest.warns(TrainingNote, match="the spec sets no `mean:`.*mean, [0-9.]+ [0-9.]+ [0-9.]+$"):
        train(config(spec, folder, tmp_path / "run"))
    want, _ = channel_stats(scan_folder(folder, 3)[0], 3, 1 / 255)
    got = load_checkpoint(tmp_path / "run" / "model.safetensors").preprocessing.mean
    np.testing.assert_allclose(got, want)
    assert not np.allclose(got, 0.5)
    # A resume keeps the mean the run started with, without the note again.
    assert notes(lambda: train(config(spec, folder, tmp_path / "run"), resume=True, overrides={"epochs": 2})) == []
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").preprocessing.mean == got


def test_cli_prints_the_mean_note_and_help_says_it(tmp_path: Path, folder: Path) -> None:
    spec = without_mean(tiny_spec(tmp_path / "tiny.vgg"))
    result = cli(str(spec), "--data", str(folder), "-o", str(tmp_path / "run"), "--batch-size", "8", "--epochs", "1",
                 "--workers", "0", "--scale", "10", "--no-progress")
    assert result.exit_code == 0, result.output
    assert [line for line in result.stderr.splitlines() if line.startswith("note: the spec sets no `mean:`")]
    assert "warning:" not in result.stderr
    help_text = " ".join(cli("--help").output.split())
    assert "the spec's `mean:` when it sets one" in help_text and "training set's mean" in help_text


def test_a_failed_run_leaves_no_folder_it_created(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError):
        train(config(spec, folder, tmp_path / "runs" / "r", weights=str(bad)))
    assert not (tmp_path / "runs").exists()
    # Training that fails before its first checkpoint removes the folder too (nothing was written).
    with pytest.raises(TrainingError, match="no checkpoint had been written yet"):
        train(config(spec, folder, tmp_path / "nan", lr=1e30))
    assert not (tmp_path / "nan").exists()
    # A folder that was there before stays, with what it holds.
    for name in ("empty", "full"):
        (tmp_path / name).mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for name in ("empty", "full"):
        with pytest.raises(WeightsError):
            train(config(spec, folder, tmp_path / name, weights=str(bad)))
    assert (tmp_path / "empty").is_dir() and (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_cli_failed_run_leaves_no_folder(tmp_path: Path, folder: Path) -> None:
    spec, bad = tiny_spec(tmp_path / "tiny.vgg"), tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = cli(str(spec), "--data", str(folder), "-o", str(tmp_path / "run"), "--weights", str(bad),
                 "--batch-size", "8", "--workers", "0", "--scale", "10")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()
