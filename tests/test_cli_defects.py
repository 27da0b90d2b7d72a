"""What a newcomer's and a hostile user's first hour found in the compiler's commands: outputs that would
destroy an input, options ignored in silence, crashes on odd specs and files, outputs that were not the
same bytes twice."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vggspec.cli import main
from vggspec.graph import Preprocessing
from vggspec.graph.load import load_spec
from vggspec.weights import Checkpoint, init_weights, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GRAY = ("name: gray\ninput: 16x16x1\nclasses: 3\nmean: 0.5\nstd: 0.25\n"
        "conv3-4 maxpool conv3-4 maxpool FC-8 FC-3 soft-max\n")


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def gray(tmp_path: Path) -> tuple[Path, Path]:
    """A one-channel spec and a checkpoint of it."""
    spec = tmp_path / "gray.vgg"
    spec.write_text(GRAY)
    graph = load_spec(spec)
    ckpt = tmp_path / "gray.safetensors"
    save_checkpoint(ckpt, Checkpoint(init_weights(graph), GRAY, graph.meta.preprocessing))
    return spec, ckpt


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path: Path, gray) -> None:
    spec, ckpt = gray
    before = {p: _digest(p) for p in (spec, ckpt)}
    for args, option, victim in [
        (["export", "--weights", ckpt, "-o", ckpt], "--weights", ckpt),
        (["export", spec, "-o", spec], "SPEC", spec),
        (["build", spec, "-o", spec], "SPEC", spec),
        (["build", spec, "--target", "onnx", "-o", tmp_path / "." / spec.name], "SPEC", spec),
        (["graph", spec, "-o", spec], "SPEC", spec),
        (["init", spec, "--init-from", ckpt, "-o", ckpt], "--init-from", ckpt),
        (["weights", "export", "--to", "torchvision", ckpt, "-o", ckpt], "CKPT", ckpt),
        (["weights", "import", "--from", "caffe", ckpt, "--spec", spec, "-o", ckpt], "FILE", ckpt),
    ]:
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert f"is also this command's input ({option})" in result.output and "Traceback" not in result.output
        assert _digest(victim) == before[victim], args
    os.link(ckpt, tmp_path / "hard.safetensors")  # another name of the same file
    result = cli("export", "--weights", ckpt, "-o", tmp_path / "hard.safetensors")
    assert result.exit_code == 1 and "is also this command's input" in result.output


def test_set_preprocessing_against_a_checkpoint_is_refused_unless_it_agrees(tmp_path: Path, gray) -> None:
    spec, ckpt = gray
    out = tmp_path / "m.onnx"
    result = cli("export", "--weights", ckpt, "--set", "mean=0.7", "-o", out)
    assert result.exit_code == 1 and "--set mean: the model takes the checkpoint's own preprocessing" in result.output
    assert not out.exists()
    assert cli("export", "--weights", ckpt, "--set", "mean=0.5", "-o", out).exit_code == 0  # no change: fine


@pytest.mark.parametrize("static", ["1x24x24", "3x16x16"])
def test_int8_with_a_static_shape_calibrates_at_that_shape(tmp_path: Path, gray, static: str) -> None:
    import onnxruntime as ort
    from PIL import Image

    _, ckpt = gray
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 26), np.uint8)).save(calib / f"{i}.png")
    out = tmp_path / "q.onnx"
    result = cli("export", "--weights", ckpt, "--fully-conv", "--precision", "int8", "--calibration", calib,
                 "--static-shape", static, "-o", out)
    assert result.exit_code == 0, result.output
    n, h, w = map(int, static.split("x"))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [n, 1, h, w]
    probs = session.run(["probs"], {"input": np.zeros((n, 1, h, w), np.float32)})[0]
    assert probs.shape == (n, 3) and np.allclose(probs.sum(1), 1, atol=1e-2)


def test_two_lrn_layers_in_one_stage_are_a_located_error(tmp_path: Path) -> None:
    spec = tmp_path / "lrn2.vgg"
    spec.write_text("input: 32x32x3\nconv3-8 LRN conv3-8 LRN maxpool conv3-8 LRN FC-10 soft-max\n")
    result = cli("summary", spec)
    assert result.exit_code == 1 and "internal error" not in result.output
    assert f"{spec}:2:21: error: a second LRN in stage 1" in result.output and "norm1" in result.output


def test_a_pipe_where_a_spec_or_checkpoint_goes_is_named_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = ("import sys; from vggspec.cli import main; main(sys.argv[1:], prog_name='vggspec')")
    for args in (["summary", fifo], ["export", "--weights", fifo, "-o", tmp_path / "x.onnx"],
                 ["weights", "import", "--from", "caffe", fifo, "--spec", "A", "-o", tmp_path / "x.safetensors"]):
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 1 and f"{fifo}: error: not a regular file" in out.stderr, (args, out.stderr)


def test_a_folder_named_like_a_shipped_spec_does_not_hide_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A").mkdir()
    result = cli("summary", "A", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["name"] == "vgg_a"
    result = cli("summary", tmp_path / "A")  # a path, not a bare name: the folder was meant
    assert result.exit_code == 1 and "is a folder, not a spec file" in result.output


def test_torchvision_weights_for_a_gray_spec_take_the_spec_preprocessing(tmp_path: Path, gray) -> None:
    spec, ckpt = gray
    pth = tmp_path / "tv.pth"
    assert cli("weights", "export", "--to", "torchvision", ckpt, "-o", pth).exit_code == 0
    back = tmp_path / "back.safetensors"
    result = cli("weights", "import", "--from", "torchvision", pth, "--spec", spec, "-o", back)
    assert result.exit_code == 0 and "note: torchvision's preprocessing is for RGB images" in result.output
    assert load_checkpoint(back).preprocessing == Preprocessing(mean=(0.5,), std=(0.25,))
    rgb_stats = tmp_path / "rgb_stats.safetensors"  # what the import wrote before: ImageNet's three means
    save_checkpoint(rgb_stats, Checkpoint(load_checkpoint(ckpt).tensors, GRAY, Preprocessing()))
    result = cli("export", "--weights", rgb_stats, "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "needs 1 mean and std values, one per input channel" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoints_and_pictures_are_the_same_bytes_every_time(tmp_path: Path) -> None:
    code = ("import sys; from vggspec.cli import main; main(sys.argv[1:], prog_name='vggspec')")
    digests = set()
    for i in range(3):  # separate processes: safetensors' metadata order changed from process to process
        out = tmp_path / f"c{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, "init", "A", "--set", "width=1/16", "-o", str(out)],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        digests.add(_digest(out))
    assert len(digests) == 1
    for fmt, stamp in (("svg", b"<dc:date>"), ("pdf", b"/CreationDate")):
        paths = [tmp_path / f"g{i}.{fmt}" for i in range(2)]
        for p in paths:
            assert cli("graph", "A", "--set", "width=1/16", "-o", p).exit_code == 0
        assert stamp not in paths[0].read_bytes() and _digest(paths[0]) == _digest(paths[1])


@pytest.mark.parametrize("args,message", [
    (["summary", "A", "--set", "classes"], "--set classes has no value"),
    (["summary", "A", "--set", "classes=99999999999999999999"], "is more than the 1,048,576 outputs"),
    (["summary", "A", "--set", "classes=1048577"], "is more than the 1,048,576 outputs"),
    (["summary", "A", "--set", "input=32x32x4"], "input has 4 channels; vggspec reads images as 1"),
    (["summary", "A", "--input", "100000x100000"], "is larger than 16384 on a side"),
    (["export", "A", "--static-shape", "1x99999x99999", "-o", "x.onnx"], "is larger than 16384 on a side"),
    (["export", "A", "--static-shape", "1x\u00b2x3", "-o", "x.onnx"], "is not NxHxW in positive integers"),
])
def test_odd_numbers_are_named_errors(args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "internal error" not in result.output and "did you mean 'classes'" not in result.output


def test_full_width_digits_are_not_numbers(tmp_path: Path) -> None:
    spec = tmp_path / "u.vgg"
    spec.write_text("input: 32x32x3\nconv3-\uff18 FC-10 soft-max\n")
    result = cli("summary", spec)
    assert result.exit_code == 1 and "channel count '\uff18' is not a number" in result.output


def test_the_edge_example_runs_a_gray_model_and_says_how_to_call_it(tmp_path: Path, gray) -> None:
    from PIL import Image

    _, ckpt = gray
    model = tmp_path / "gray.onnx"
    assert cli("export", "--weights", ckpt, "--fully-conv", "-o", model).exit_code == 0
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)).save(image)
    run = [sys.executable, str(ROOT / "examples" / "edge_deploy.py")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*run, str(model), str(image), "24"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    halves = out.stdout.split("onnxruntime only")
    assert halves[0].split("CPUExecutionProvider")[1].strip() == halves[1].strip()
    out = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("usage:") and "Traceback" not in out.stderr


def test_a_labels_file_given_by_set_is_blamed_on_the_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    result = cli("summary", "A", "--set", "labels=two.txt")
    assert result.exit_code == 1 and "<--set>:1:8: error: labels file" in result.output
    assert "has 2 labels for 1000 classes" in result.output and "A.vgg" not in result.output


TINY = "input: 16x16x1\nclasses: 3\nscale: 1/255\nconv3-4 maxpool conv3-4 maxpool FC-8 FC-3 soft-max\n"


def _gray_images(folder: Path, n: int = 2, seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (18, 20), np.uint8)).save(p)
    return paths


def test_members_that_order_their_classes_differently_are_not_averaged(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.vgg").write_text(TINY)
    (tmp_path / "ab.txt").write_text("a\nb\nc\n")
    (tmp_path / "ba.txt").write_text("c\nb\na\n")
    for name, labels in (("x", "ab.txt"), ("y", "ba.txt"), ("z", "ab.txt")):
        assert cli("export", "t.vgg", "--set", f"labels={labels}", "--fully-conv", "-o", f"{name}.onnx").exit_code == 0
    for label in "abc":
        _gray_images(tmp_path / "val" / label)
    result = cli("fuse", "x.onnx", "y.onnx", "-o", "xy.onnx")
    assert result.exit_code == 1 and "y.onnx: error: names class 0 'c', and x.onnx names it 'a'" in result.output
    assert not (tmp_path / "xy.onnx").exists()
    result = cli("eval", "x.onnx", "--ensemble", "y.onnx", "--data", "val")
    assert result.exit_code == 1 and "names class 0 'c'" in result.output
    assert cli("fuse", "x.onnx", "z.onnx", "-o", "xz.onnx").exit_code == 0  # the same order: fine


def test_file_names_that_are_not_utf8_are_reported_not_fatal(tmp_path: Path) -> None:
    spec = tmp_path / "t.vgg"
    spec.write_text(TINY)
    model = tmp_path / "m.onnx"
    assert cli("export", spec, "--fully-conv", "-o", model).exit_code == 0
    for label in "abc":
        _gray_images(tmp_path / "val" / label)
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path / "val" / "a")) + b"/x\xff.png"))
    odd.write_bytes((tmp_path / "val" / "a" / "0.png").read_bytes())
    result = cli("eval", model, "--data", tmp_path / "val", "--predictions", tmp_path / "p.csv")
    assert result.exit_code == 0 and "internal error" not in result.output, result.output
    assert "x\\xff.png,a," in (tmp_path / "p.csv").read_text(encoding="utf-8")
    result = cli("predict", model, odd, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["image"].endswith("x\\xff.png")


def test_a_linked_folder_inside_a_class_folder_is_scanned(tmp_path: Path) -> None:
    from vggspec.imaging import scan_image_folder

    _gray_images(tmp_path / "train" / "a", 2)
    _gray_images(tmp_path / "elsewhere", 3, seed=1)
    (tmp_path / "train" / "a" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "train")  # a link back up is walked once
    assert len(scan_image_folder(tmp_path / "train").files) == 5


def test_init_from_a_net_with_other_fc_layers_names_the_file(tmp_path: Path) -> None:
    spec = tmp_path / "t.vgg"
    spec.write_text(TINY)
    deeper = tmp_path / "a.safetensors"
    assert cli("init", "A", "--set", "width=1/16", "-o", deeper).exit_code == 0
    result = cli("init", spec, "--init-from", deeper, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and f"{deeper}: error: " in result.output and "hint:" in result.output
