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

from vggspec.errors import DataError, VggspecError, WeightsError
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
    ignored, taken = notes[0].removeprefix("note: resuming with the run's own settings; ignoring ").split(" (a ")
    # Each with the run's own value; not --batch-size (the run's), --data, --workers, ...
    assert ignored.split(", ") == ["--lr 0.5 (the run's --lr 0.01)", "--momentum 0.0 (the run's --momentum 0.9)",
                                   "--seed 5 (the run's --seed 0)", "--scale 12 (the run's --scale 10)",
                                   "--lighting 0.5 (the run's --lighting 0.1)",
                                   "--weight-decay 0.1 (the run's --weight-decay 0.0005)",
                                   "--no-flip (the run's --flip)"]
    assert taken.startswith("resumed run takes only --epochs, --workers")


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


# --- second review: made-up validation errors, torch's errors, unbounded sizes, the spec's labels ----------------

# Its last batch-norm layer's output is 1 x 1: one image per micro-batch is one value per channel.
BN1 = ("input: 8x8x1\nclasses: 3\nnorm: batch\nscale: 1/255\nmean: 0.5\n"
       "conv3-4 maxpool conv3-4 maxpool conv3-4 maxpool conv3-4\nFC-3 soft-max\n")


def truncate(image: Path) -> None:
    """Cut a PNG in half: its header still says PNG, its pixels are gone."""
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])


def data_copy(folder: Path, to: Path) -> Path:
    return Path(shutil.copytree(folder, to))


def metrics(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_unreadable_validation_images_are_counted_not_scored(tmp_path: Path, folder: Path) -> None:
    spec, data = tiny_spec(tmp_path / "tiny.vgg"), data_copy(folder, tmp_path / "data")
    val = sorted((data / "val").rglob("*.png"))
    for image in val[:5]:
        truncate(image)
    with pytest.warns(UserWarning, match="epoch 1: 5 unreadable validation images skipped"):
        train(config(spec, data, tmp_path / "part"))
    row = metrics(tmp_path / "part")[0]
    assert row["val_skipped"] == 5
    # The error is over the 19 readable images: a multiple of 1/19, not of 1/24.
    assert abs(row["val_top1_err"] * 19 - round(row["val_top1_err"] * 19)) < 1e-6
    for image in val[5:]:
        truncate(image)
    with pytest.raises(DataError, match="no validation image could be used: all 24") as info:
        train(config(spec, data, tmp_path / "none"))
    assert info.value.path == str(data / "val") and info.value.hint
    assert not (tmp_path / "none" / "model.safetensors").exists()


def test_cli_unreadable_validation_set_is_an_error(tmp_path: Path, folder: Path) -> None:
    spec, data = tiny_spec(tmp_path / "tiny.vgg"), data_copy(folder, tmp_path / "data")
    for image in (data / "val").rglob("*.png"):
        truncate(image)
    result = cli(str(spec), "--data", str(data), "-o", str(tmp_path / "run"), "--batch-size", "8", "--epochs", "1",
                 "--workers", "0", "--scale", "10", "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"{data / 'val'}: error: no validation image could be used" in result.stderr
    assert "top-1 error" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("option", [("--lr", "-1"), ("--lr", "0"), ("--lr", "nan"), ("--momentum", "-1"),
                                    ("--momentum", "1"), ("--weight-decay", "-1"), ("--weight-decay", "inf"),
                                    ("--lighting", "nan"), ("--lighting", "-0.5")])
def test_cli_refuses_out_of_range_optimiser_options(tmp_path: Path, folder: Path, option: tuple[str, str]) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    result = cli(str(spec), "--data", str(folder), "-o", str(tmp_path / "run"), "--batch-size", "8", "--workers", "0",
                 "--scale", "10", "--no-progress", *option)
    assert result.exit_code == 2, result.output
    assert option[0] in result.output and "Traceback" not in result.output and "internal error" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("setting", [{"lr": -1.0}, {"momentum": 1.0}, {"weight_decay": -1.0},
                                     {"lighting": float("nan")}, {"lr": float("inf")}])
def test_library_refuses_out_of_range_settings(tmp_path: Path, folder: Path, setting: dict) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    option = "--" + next(iter(setting)).replace("_", "-")
    with pytest.raises(VggspecError, match=f"^{option} .* is out of range$") as info:
        train(config(spec, folder, tmp_path / "run", **setting))
    assert info.value.hint and not (tmp_path / "run").exists()


def gray_folder(root: Path, per_class: int = 4) -> Path:
    return image_folder(root, classes=3, per_class=per_class, size=8, channels=1)


@pytest.mark.parametrize("sizes", [("4", "4"), ("1", "1")])
def test_batch_norm_over_one_value_is_refused_before_training(tmp_path: Path, sizes: tuple[str, str]) -> None:
    spec, data = tmp_path / "bn1.vgg", gray_folder(tmp_path / "data")
    spec.write_text(BN1)
    batch, accumulate = sizes
    result = cli(str(spec), "--data", str(data), "-o", str(tmp_path / "run"), "--batch-size", batch,
                 "--accumulate", accumulate, "--scale", "8", "--workers", "0", "--no-progress")
    assert result.exit_code == 1, result.output
    assert f"{spec}: error: batch norm layer bn4_1 would normalise a single value per channel" in result.stderr
    assert "--accumulate" in result.stderr and "norm=none" in result.stderr and "internal error" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_micro_batch_left_with_one_image_by_skips_is_skipped(tmp_path: Path) -> None:
    spec, data = tmp_path / "bn1.vgg", gray_folder(tmp_path / "data")
    spec.write_text(BN1)
    truncate(data / "train" / "class0" / "0.png")  # its micro-batch of 2 keeps one image
    with pytest.warns(UserWarning, match="epoch 1: 2 unreadable training images skipped"):
        train(config(spec, data, tmp_path / "run", batch_size=2, scale=(8, 8)))
    assert metrics(tmp_path / "run")[0]["skipped"] == 2


def test_training_scale_is_bounded_and_named(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    with pytest.raises(VggspecError, match="training scale 100000 makes every image .* over the 64-megapixel") as info:
        train(config(spec, folder, tmp_path / "big", scale=(10, 100000)))
    assert info.value.hint == "use --scale of at most 8000" and not (tmp_path / "big").exists()
    result = cli(str(spec), "--data", str(folder), "-o", str(tmp_path / "small"), "--scale", "4", "--workers", "0")
    assert result.exit_code == 1
    assert f"{spec}: error: training scale 4 is smaller than the spec's input crop 8x8" in result.stderr
    assert "hint: use --scale 8 or more" in result.stderr


def test_an_epoch_without_a_usable_training_image_is_an_error(tmp_path: Path, folder: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.train import augment

    def too_large(self: object, image: object, rng: object) -> None:
        raise DataError("too large")

    monkeypatch.setattr(augment.Augment, "__call__", too_large)
    spec = tiny_spec(tmp_path / "tiny.vgg")
    with pytest.raises(DataError, match="no training image of epoch 1 could be used: all 24") as info:
        train(config(spec, folder, tmp_path / "run"))
    assert info.value.path == str(folder / "train") and "--scale" in (info.value.hint or "")
    assert not (tmp_path / "run").exists()


def labelled_spec(tmp_path: Path, names: tuple[str, ...]) -> Path:
    (tmp_path / "lz.txt").write_text("".join(f"{n}\n" for n in names))
    spec = tiny_spec(tmp_path / "tiny.vgg")
    spec.write_text(spec.read_text().replace("init: kaiming", "init: kaiming\nlabels: lz.txt"))
    return spec


def test_class_folders_named_after_the_spec_labels_follow_their_order(tmp_path: Path, folder: Path) -> None:
    labels = ("zero", "one", "two")
    spec, data = labelled_spec(tmp_path, labels), data_copy(folder, tmp_path / "data")
    for split in ("train", "val"):
        for i, name in enumerate(labels):
            (data / split / f"class{i}").rename(data / split / name)
    assert notes(lambda: train(config(spec, data, tmp_path / "run"))) == []
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").labels == labels  # not sorted: one two zero
    split, _ = scan_folder(data, 3, labels)
    assert {split.files[i].parent.name: t for i, t in enumerate(split.targets)} == {"zero": 0, "one": 1, "two": 2}


def test_class_folders_not_named_after_the_labels_replace_them_with_a_note(tmp_path: Path, folder: Path) -> None:
    spec = labelled_spec(tmp_path, ("zero", "one", "two"))
    said = notes(lambda: train(config(spec, folder, tmp_path / "run")))
    assert [n for n in said if "not named after the spec's labels ('zero', 'one', 'two')" in n], said
    assert load_checkpoint(tmp_path / "run" / "model.safetensors").labels == ("class0", "class1", "class2")


def test_weights_and_init_from_together_are_a_usage_error(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    result = cli(str(spec), "--data", str(folder), "-o", str(tmp_path / "run"), "--weights", "a.safetensors",
                 "--init-from", "b.safetensors")
    assert result.exit_code == 2 and "--weights and --init-from are alternatives" in result.output, result.output
    with pytest.raises(VggspecError, match="alternatives"):
        train(config(spec, folder, tmp_path / "run", weights="a.safetensors", init_from="b.safetensors"))


def test_data_sizes_are_bounded(tmp_path: Path) -> None:
    from vggspec.cli import main
    from vggspec.datasets.digits import write_digits

    for family in ("digits", "scenes"):
        result = CliRunner().invoke(main, ["data", family, str(tmp_path / family), "--size", "100000"])
        assert result.exit_code == 2 and "--size" in result.output, result.output
        assert not (tmp_path / family).exists()
    with pytest.raises(DataError, match="image size 100000 is outside 8..4096"):
        write_digits(tmp_path / "lib", size=100000)


def test_data_force_names_a_linked_split(tmp_path: Path) -> None:
    from vggspec.cli import main

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train").symlink_to(tmp_path / "elsewhere")
    for family in ("digits", "scenes"):
        result = CliRunner().invoke(main, ["data", family, str(tmp_path / "d"), "--force"])
        assert result.exit_code == 1, result.output
        assert f"{tmp_path / 'd' / 'train'}: error: is not a folder (a symbolic link" in result.stderr
        assert "rmtree" not in result.output and (tmp_path / "elsewhere").is_dir()


def test_scenes_preview_may_go_into_the_folder_the_command_creates(tmp_path: Path) -> None:
    from vggspec.cli import main

    out = tmp_path / "s3"
    result = CliRunner().invoke(main, ["data", "scenes", str(out), "--size", "16", "--train", "2", "--val", "1",
                                       "--test", "1", "--min-digit", "8", "--max-digit", "12",
                                       "--preview", str(out / "p.png")])
    assert result.exit_code == 0, result.output
    assert (out / "p.png").is_file()
    missing = CliRunner().invoke(main, ["data", "scenes", str(tmp_path / "s4"), "--preview",
                                        str(tmp_path / "nowhere" / "p.png")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
