"""The training loop in one process: learning on digits, accumulation, NaN stop, resume, rank 0 only, the mean,
failed runs, bad validation sets, out-of-range settings, the spec's labels."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_train_data import image_folder, tiny_spec

from vggspec.errors import DataError, VggspecError, WeightsError
from vggspec.weights import load_checkpoint

torch = pytest.importorskip("torch")

from vggspec.train import TrainConfig, train  # noqa: E402
from vggspec.train import distributed as D  # noqa: E402
from vggspec.train.config import TrainingNote  # noqa: E402
from vggspec.train.data import channel_stats, scan_folder  # noqa: E402
from vggspec.train.loop import TrainingError  # noqa: E402
from vggspec.train.state import read_progress  # noqa: E402

# No `mean:`: training then subtracts the training set's mean (a spec's own mean is kept: see below).
DIGITS16 = """name: digits16
input: 16x16x1
classes: 10
norm: batch
dropout: 0
init: xavier
scale: 1/255
std: 0.5

conv3-8 maxpool
conv3-16 maxpool
FC-32 FC-10 soft-max
"""


def config(spec: Path, data: Path, rundir: Path, **kw) -> TrainConfig:
    base = dict(batch_size=8, lr=0.05, epochs=1, workers=0, scale=(10, 10), progress=False, deterministic=True)
    return TrainConfig(spec=str(spec), data=str(data), rundir=str(rundir), **{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=8, size=10)


def test_learns_digits(tmp_path: Path) -> None:
    from vggspec.datasets.digits import write_digits

    write_digits(tmp_path / "digits", size=16)
    spec = tmp_path / "d16.vgg"
    spec.write_text(DIGITS16)
    with pytest.warns(TrainingNote, match="the spec sets no `mean:`"):
        train(config(spec, tmp_path / "digits", tmp_path / "run", batch_size=32, lr=0.05, epochs=2, scale=(16, 18),
                     flip=False, deterministic=False))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"] < 2.5
    assert rows[1]["val_top1_err"] < 0.4  # chance is 0.9
    assert rows[1]["val_top5_err"] <= rows[1]["val_top1_err"]
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert ckpt.labels == tuple(str(d) for d in range(10))
    assert 0.05 < ckpt.preprocessing.mean[0] < 0.45 and ckpt.preprocessing.std == (0.5,)  # the training set's mean
    assert ckpt.extra["train.epoch"] == "2"


def test_accumulation_equals_the_full_batch(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    train(config(spec, folder, tmp_path / "full"))
    train(config(spec, folder, tmp_path / "acc", accumulate=4))
    a = load_checkpoint(tmp_path / "full" / "model.safetensors").tensors
    b = load_checkpoint(tmp_path / "acc" / "model.safetensors").tensors
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_fine_tuning_starts_from_the_weights(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    train(config(spec, folder, tmp_path / "a"))
    start = tmp_path / "a" / "model.safetensors"
    train(config(spec, folder, tmp_path / "b", weights=str(start), lr=0.0))
    a, b = load_checkpoint(start).tensors, load_checkpoint(tmp_path / "b" / "model.safetensors").tensors
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_init_from_a_shallower_net(tmp_path: Path, folder: Path) -> None:
    # Net A's shape in small: four convs, three FCs; the deeper net adds conv1_2 and conv3_3.
    layers = "conv3-4 maxpool\nconv3-4 maxpool\nconv3-8 conv3-8 maxpool\nFC-16 FC-16 FC-3 soft-max\n"
    shallow = tiny_spec(tmp_path / "tiny.vgg")
    shallow.write_text(shallow.read_text().split("conv3-4")[0] + layers)
    train(config(shallow, folder, tmp_path / "a"))
    deeper = tmp_path / "deeper.vgg"
    deeper.write_text(shallow.read_text().replace("conv3-4 maxpool\nconv3-4", "conv3-4 conv3-4 maxpool\nconv3-4")
                      .replace("conv3-8 conv3-8", "conv3-8 conv3-8 conv3-8"))
    train(config(deeper, folder, tmp_path / "b", init_from=str(tmp_path / "a" / "model.safetensors"), lr=0.0))
    a = load_checkpoint(tmp_path / "a" / "model.safetensors").tensors
    b = load_checkpoint(tmp_path / "b" / "model.safetensors").tensors
    for key in ("conv1_1.weight", "conv2_1.weight", "conv3_1.weight", "conv3_2.bias"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in ("fc4.weight", "fc5.weight", "fc6.weight", "fc6.bias"):  # the last three FCs
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert b["conv1_2.weight"].shape == (4, 4, 3, 3)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.train import config as train_config

    monkeypatch.setattr(train_config, "MAX_LR", float("inf"))  # the bound refuses 1e30: here it must overflow
    spec = tiny_spec(tmp_path / "tiny.vgg")
    with pytest.raises(TrainingError, match="the loss became (nan|inf).*last good checkpoint"):
        train(config(spec, folder, tmp_path / "run", lr=1e30, save_every=1, epochs=2))
    ckpt = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert all(np.isfinite(t).all() for t in ckpt.tensors.values())
    assert read_progress(tmp_path / "run")["global_step"] == int(ckpt.extra["train.step"]) >= 1


def test_resume_errors(tmp_path: Path, folder: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VggspecError, match="holds no training run"):
        train(config(spec, folder, tmp_path / "empty"), resume=True)
    train(config(spec, folder, tmp_path / "run"))
    with pytest.raises(VggspecError, match="already holds a training run"):
        train(config(spec, folder, tmp_path / "run"))
    other = tiny_spec(tmp_path / "other.vgg", dropout=0.25)
    with pytest.raises(VggspecError, match="another spec"):
        train(config(other, folder, tmp_path / "run"), resume=True)
    with pytest.raises(VggspecError, match="another spec"):
        train(TrainConfig(**{**config(spec, folder, tmp_path / "run").__dict__, "sets": ("dropout=0.1",)}), resume=True)
    # Resuming a finished run with more epochs continues it.
    last = train(config(spec, folder, tmp_path / "run"), resume=True, overrides={"epochs": 2})
    assert last["epoch"] == 2


def test_bad_data_fails_before_training(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path / "tiny.vgg", classes=4)
    data = image_folder(tmp_path / "data", classes=3, per_class=2)
    with pytest.raises(DataError, match="3 class folders but the spec has 4"):
        train(config(spec, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unreadable_images_do_not_stop_an_epoch(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=3, per_class=8, size=10)
    for i in range(3):
        (data / "train" / "class1" / f"bad{i}.png").write_bytes(b"\x89PNG broken")
    spec = tiny_spec(tmp_path / "tiny.vgg")
    with pytest.warns(UserWarning, match="unreadable training images"):
        last = train(config(spec, data, tmp_path / "run", batch_size=9))
    assert 0 < last["skipped"] <= 3


def test_only_rank_0_writes(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Rank 1 of 2 (without a process group): it validates on its own shard, the second half.
    monkeypatch.setattr(D, "setup", lambda device="auto": D.World(rank=1, size=2))
    spec = tiny_spec(tmp_path / "tiny.vgg")
    last = train(config(spec, folder, tmp_path / "run", save_every=1))
    assert last["epoch"] == 1 and not (tmp_path / "run").exists()


def test_gpu_options_run_on_the_cpu(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []

    def fake_compile(model, **kw):  # inductor needs a C++ toolchain and minutes; the path is what matters here
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = tiny_spec(tmp_path / "tiny.vgg", norm="batch")
    last = train(config(spec, folder, tmp_path / "run", bf16=True, channels_last=True, compile=True,
                        deterministic=False))
    assert compiled and np.isfinite(last["train_loss"])
    assert "conv1_1.weight" in load_checkpoint(tmp_path / "run" / "model.safetensors").tensors


def test_cli_data_digits_and_train_errors(tmp_path: Path) -> None:
    from vggspec.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["data", "digits", str(tmp_path / "d"), "--size", "12"])
    assert result.exit_code == 0, result.output
    assert "train 1258" in result.output
    result = runner.invoke(main, ["train", "examples/digits.vgg", "--data", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such data folder" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["train", "examples/digits.vgg", "--data", str(tmp_path / "d"),
                                  "--resume", str(tmp_path / "norun")])
    assert result.exit_code == 1 and "holds no training run" in result.output
    result = runner.invoke(main, ["train", "examples/digits.vgg", "--data", str(tmp_path / "d"), "--scale", "9:8"])
    assert result.exit_code == 2 and "--scale" in result.output


def test_resuming_a_finished_run_says_so(tmp_path: Path, folder: Path) -> None:
    from vggspec.cli import main

    spec = tiny_spec(tmp_path / "tiny.vgg")
    run = str(tmp_path / "run")

    def train(epochs: int, *more: str) -> object:
        return CliRunner().invoke(main, ["train", str(spec), "--data", str(folder), "--batch-size", "8", "--epochs",
                                         str(epochs), "--workers", "0", "--scale", "10", "--no-progress", *more])

    assert train(1, "-o", run).exit_code == 0
    result = train(1, "--resume", run)
    assert result.exit_code == 0, result.output
    assert "already finished its 1 epochs" in result.output and "--epochs 11" in result.output
    again = train(2, "--resume", run)
    assert again.exit_code == 0 and "epoch 2" in again.output, again.output


def test_lr_steps_cut_the_rate_after_the_named_epochs_and_survive_a_resume(tmp_path: Path, folder: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.cli import main
    from vggspec.train import loop

    # The tiny net's loss may sit at chance, from which the schedule would count: here every epoch counts.
    monkeypatch.setattr(loop.Trainer, "_chance", lambda self: (math.log(self.graph.meta.classes), 0.0))

    spec = tiny_spec(tmp_path / "tiny.vgg")
    run = tmp_path / "run"
    args = ["train", str(spec), "--data", str(folder), "--batch-size", "8", "--workers", "0", "--scale", "10",
            "--no-progress", "--lr", "0.05", "--lr-steps", "1,3"]
    assert CliRunner().invoke(main, [*args, "--epochs", "2", "-o", str(run)]).exit_code == 0
    resumed = CliRunner().invoke(main, ["train", "--resume", str(run), "--epochs", "4", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.005, 0.005, 0.0005])
    for bad in ("3,1", "0", "x", "1,1"):
        result = CliRunner().invoke(main, [*args[:-1], bad, "-o", str(tmp_path / "bad")])
        assert result.exit_code == 2 and "--lr-steps" in result.output and "Traceback" not in result.output
    with pytest.raises(VggspecError, match="--lr-steps 2,2 is not a rising list"):
        train(config(spec, folder, tmp_path / "lib", lr_steps=(2, 2)))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "lib").exists()


def test_a_trained_model_is_tested_as_it_was_trained(tmp_path: Path, folder: Path) -> None:
    """Training records its scale range and flip policy; export makes them the model's test scales (the paper's
    Q set for a jittered S) and flip; eval takes them by default and says so (issue 23: 17.9 % against 7.3 %)."""
    import onnx

    from vggspec.cli import main

    spec = tiny_spec(tmp_path / "tiny.vgg")
    run = tmp_path / "run"
    train(config(spec, folder, run, scale=(8, 11), flip=False))
    ckpt = run / "model.safetensors"
    assert load_checkpoint(ckpt).extra.items() >= {"train.scale": "8:11", "train.flip": "false"}.items()
    cli = CliRunner()
    model = tmp_path / "m_dense.onnx"
    result = cli.invoke(main, ["export", "--weights", str(ckpt), "--fully-conv", "-o", str(model)])
    assert result.exit_code == 0 and "tested at Q=8,10,11, without flip" in result.output, result.output
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["vggspec.test_scales"] == "[8, 10, 11]" and props["vggspec.test_flip"] == "false"
    note = "testing at the model's own Q=8,10,11 without flip (trained with scale jitter 8:11, no flip)"
    for evaluated in (model, ckpt):  # the exported model, and the checkpoint exported for the run
        result = cli.invoke(main, ["eval", str(evaluated), "--data", str(folder / "val"), "--json"])
        assert result.exit_code == 0, result.output
        assert note in result.stderr
        row = json.loads(result.stdout)["rows"][0]
        assert row["scales"] == [8, 10, 11] and row["flip"] is False and row["images"] == 24
    # Given explicitly (weights without a record, or a choice of one's own), and refused below the input side.
    result = cli.invoke(main, ["export", "--weights", str(ckpt), "--test-scales", "9", "--test-flip", "-o",
                               str(model)])
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["vggspec.test_scales"] == "[9]" and props["vggspec.test_flip"] == "true"
    result = cli.invoke(main, ["export", "--weights", str(ckpt), "--test-scales", "4", "-o", str(model)])
    assert result.exit_code == 1 and "test scale 4 is smaller than the input's shorter side 8" in result.output
    result = cli.invoke(main, ["export", "--weights", str(ckpt), "--test-scales", "a,9", "-o", str(model)])
    assert result.exit_code == 2 and "positive integers" in result.output


def test_a_rundir_inside_the_data_folder_is_refused(tmp_path):
    from vggspec.cli import main

    data = image_folder(tmp_path / "data", per_class=2)
    spec = tiny_spec(tmp_path / "t.vgg")
    for rundir in (data / "train" / "run", data, tmp_path / "data" / "x" / ".." / "run"):
        result = CliRunner().invoke(main, ["train", str(spec), "--data", str(data), "-o", str(rundir),
                                           "--device", "cpu", "--epochs", "1"])
        assert result.exit_code == 1 and "is inside the data folder --data" in result.output, result.output
    assert not (data / "train" / "run").exists() and not (data / "run").exists()


def test_a_one_class_run_plots_without_a_warning(tmp_path):
    import warnings

    from vggspec.train.plot import plot_metrics

    rows = [{"epoch": e, "train_loss": 0.0, "val_loss": 0.0, "val_top1_err": 0.0, "val_top5_err": 0.0,
             "train_top1_err": 0.0, "lr": 0.01} for e in (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_metrics(tmp_path, rows, "one class").is_file()


def test_too_few_file_descriptors_for_the_workers_is_a_clear_error_not_a_hang(tmp_path):
    import resource
    import subprocess
    import sys

    data = image_folder(tmp_path / "data", per_class=4)
    spec = tiny_spec(tmp_path / "t.vgg")

    def limit() -> None:  # `ulimit -n 16`, hard limit too: nothing to raise it to
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    result = subprocess.run([sys.executable, "-m", "vggspec", "train", str(spec), "--data", str(data), "-o",
                             str(tmp_path / "run"), "--workers", "2", "--epochs", "1", "--batch-size", "4",
                             "--device", "cpu", "--no-progress"], preexec_fn=limit, capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stderr
    assert "may open 16 files (ulimit -n)" in result.stderr and "--workers 0" in result.stderr
    assert "Traceback" not in result.stderr


def _warnings_of(run: object) -> list[str]:
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in seen if not issubclass(w.category, TrainingNote)]


def test_a_run_stuck_at_chance_says_so_once(tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.train import loop

    monkeypatch.setattr(loop, "STUCK_STEPS", 3)  # an epoch here is 3 steps
    spec = tiny_spec(tmp_path / "tiny.vgg")
    # Stuck by construction: the paper's N(0, 0.01) on a narrow net without batch norm gives scores of ~0, and
    # lr 0 keeps them there: the loss is ln 3 at every step.
    said = _warnings_of(lambda: train(config(spec, folder, tmp_path / "stuck", lr=0.0, epochs=2, sets=("init=paper",))))
    stuck = [w for w in said if "stayed at chance" in w]
    assert stuck == ["the training loss has stayed at chance, ln 3 = 1.099, for 3 steps: the net has not started to "
                     "learn (some leave chance late, and a note will say so); if it stays there, likely fixes: "
                     "--set init=xavier (Glorot's scheme keeps the signal's size), or a lower --lr, "
                     "or --set norm=batch"]
    assert [w for w in said if w.startswith("init: paper starts this net (no batch norm)")]  # said before epoch 1
    # A healthy run (Glorot's init) leaves chance at once: nothing said.
    said = _warnings_of(lambda: train(config(spec, folder, tmp_path / "ok", epochs=2, sets=("init=xavier",))))
    assert not [w for w in said if "chance" in w or w.startswith("init:")]


def test_a_net_that_leaves_chance_late_is_noted_after_the_warning(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from vggspec.graph.load import load_spec
    from vggspec.train import loop

    # The loss sequence of a late starter (the demo's narrow D sits at chance for ~400 steps): at ln 10 for
    # STUCK_STEPS steps, then clearly below it.
    trainer = object.__new__(loop.Trainer)
    trainer.graph = load_spec(tiny_spec(tmp_path / "tiny.vgg"), ("classes=10",))
    trainer.world = SimpleNamespace(main=True)
    trainer.progress = SimpleNamespace(global_step=0)
    trainer.at_chance, trainer.said_stuck, trainer.below_chance, trainer.said_left = 0, False, 0, False
    losses = [2.30] * loop.STUCK_STEPS + [2.25] * 5 + [2.0] * (loop.LEFT_STEPS + 30)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i, loss in enumerate(losses):
            trainer.progress.global_step = i + 1
            trainer._watch_chance(loss)
    said = [(w.category is TrainingNote, str(w.message)) for w in seen]
    assert [n for n, _ in said] == [False, True]  # the warning once, then the note once
    assert said[1][1] == (f"the training loss has left chance (below 2.203 for {loop.LEFT_STEPS} steps, at step "
                          f"{loop.STUCK_STEPS + 5 + loop.LEFT_STEPS}): the net is learning after all")


def test_the_plateau_schedule_waits_for_the_loss_to_leave_chance(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch

    from vggspec.graph.load import load_spec
    from vggspec.train import loop

    # A late starter's epochs: the val accuracy is flat at chance while the training loss sits at ln 10, which
    # torch's ReduceLROnPlateau alone reads as a plateau (it would cut the rate after `patience` epochs).
    trainer = object.__new__(loop.Trainer)
    trainer.graph = load_spec(tiny_spec(tmp_path / "tiny.vgg"), ("classes=10",))
    trainer.world = SimpleNamespace(main=True)
    trainer.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    trainer.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(trainer.optimizer, mode="max", factor=0.1,
                                                                   patience=1)
    trainer.config = SimpleNamespace(patience=1, lr_steps=(), wait_at_chance=0)
    trainer.epochs_at_chance = 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(6):
            trainer._schedule(2.29, 0.10)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.01
    assert [str(w.message) for w in seen] == [
        "the training loss has been at chance, ln 10, for 2 epochs: the learning rate stays at 0.01, since the "
        "plateau schedule counts from the epoch the net starts to learn"]
    for accuracy in (0.30, 0.30, 0.30):  # learning, then a plateau: the rate is cut after `patience` epochs
        trainer._schedule(2.0, accuracy)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.001)


def test_lr_steps_count_from_the_epoch_the_loss_leaves_chance(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import torch

    from vggspec.graph.load import load_spec
    from vggspec.train import loop

    trainer = object.__new__(loop.Trainer)
    trainer.graph = load_spec(tiny_spec(tmp_path / "tiny.vgg"), ("classes=10",))
    trainer.world = SimpleNamespace(main=True)
    trainer.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    trainer.scheduler = torch.optim.lr_scheduler.MultiStepLR(trainer.optimizer, [2, 3], gamma=0.1)
    trainer.config = SimpleNamespace(patience=5, lr_steps=(2, 3), wait_at_chance=0)
    trainer.epochs_at_chance = 0
    lrs = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for loss in (2.30, 2.30, 2.30, 2.0, 2.30, 1.5, 1.2):  # a late starter; back at chance once it has begun
            trainer._schedule(loss, 0.2)
            lrs.append(trainer.optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001, 0.0001, 0.0001])
    notes = [str(w.message) for w in seen if w.category is TrainingNote]
    assert len(notes) == 1 and "the fixed schedule counts from the epoch the net starts to learn" in notes[0]


def test_epochs_at_chance_add_to_the_budget_up_to_wait_at_chance_and_survive_a_resume(
        tmp_path: Path, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.cli import main
    from vggspec.train import loop

    # Every epoch reads as at chance (a band wider than any loss): each one, up to --wait-at-chance, is added.
    monkeypatch.setattr(loop.Trainer, "_chance", lambda self: (math.log(self.graph.meta.classes), 100.0))
    spec = tiny_spec(tmp_path / "tiny.vgg")
    args = ["train", str(spec), "--data", str(folder), "--batch-size", "8", "--workers", "0", "--scale", "10",
            "--no-progress", "--lr-steps", "1"]

    def epochs(run: Path) -> list[int]:
        return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    result = CliRunner().invoke(main, [*args, "--epochs", "2", "--wait-at-chance", "3", "-o", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert epochs(tmp_path / "a") == [1, 2, 3, 4, 5]  # 2 + 3 waited: the rate was never cut, as none learnt
    assert "--wait-at-chance adds these epochs to --epochs, up to 3" in result.output
    # Stopped after 1 + 1 epochs, resumed with a longer wait: the 2 epochs already at chance count, so the run
    # goes on to 1 + min(4, 3); a resume that forgot them would find the run finished.
    run = tmp_path / "b"
    assert CliRunner().invoke(main, [*args, "--epochs", "1", "--wait-at-chance", "1", "-o", str(run)]).exit_code == 0
    assert epochs(run) == [1, 2]
    resumed = CliRunner().invoke(main, ["train", "--resume", str(run), "--wait-at-chance", "3", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert epochs(run) == [1, 2, 3, 4]
    bad = CliRunner().invoke(main, [*args, "--wait-at-chance", "-1", "-o", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "--wait-at-chance" in bad.output and not (tmp_path / "c").exists()


def test_signal_gain_separates_the_inits_that_train_from_those_that_stay_at_chance() -> None:
    from vggspec.graph.load import load_spec
    from vggspec.train.loop import MIN_SIGNAL_GAIN
    from vggspec.weights.init import signal_gain

    a, d = load_spec("A"), load_spec("D")
    assert signal_gain(d) < signal_gain(a) < MIN_SIGNAL_GAIN < 60 * signal_gain(a)  # A on Caffe's raw pixels trains
    # Glorot's scheme, which the paper found to train D from scratch, keeps far above it.
    assert min(signal_gain(d, "xavier"), signal_gain(load_spec("examples/digits.vgg"))) > 100 * MIN_SIGNAL_GAIN


# --- Resume notes and class checks, the spec's mean, no empty run folder.

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
    assert taken.startswith("resumed run takes only --epochs, --wait-at-chance, --workers")


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


def test_a_failed_run_leaves_no_folder_it_created(tmp_path: Path, folder: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from vggspec.train import config as train_config

    monkeypatch.setattr(train_config, "MAX_LR", float("inf"))  # lr 1e30 below: a loss that overflows
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


# --- Made-up validation errors, torch's errors, unbounded sizes, the spec's labels

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
                                     {"lighting": float("nan")}, {"lr": float("inf")}, {"lr": 11.0},
                                     {"weight_decay": 1.5}])  # the CLI's own upper bounds (vggspec.limits)
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
