"""`vggspec export`: options, checkpoints, errors, and a run where torch cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import vggspec
from vggspec.cli import main
from vggspec.graph import Preprocessing
from vggspec.weights import Checkpoint, init_weights, save_checkpoint

ort = pytest.importorskip("onnxruntime")

SPEC = """name: clitiny
input: 32x32x3
classes: 4
conv3-8 maxpool conv3-8 maxpool
FC-16 FC-4 soft-max
"""


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture
def spec(tmp_path) -> Path:
    path = tmp_path / "clitiny.vgg"
    path.write_text(SPEC)
    return path


def test_export_prints_one_line_and_writes_a_checked_model(tmp_path, spec):
    out = tmp_path / "m.onnx"
    result = cli("export", spec, "--fully-conv", "--flip", "--scores", "-o", out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "opset 17" in lines[0] and "kB" in lines[0]
    onnx.checker.check_model(str(out), full_check=True)
    m = meta(out)
    assert (m["vggspec.fully_conv"], m["vggspec.flip"], m["vggspec.scores"]) == ("true", "true", "true")
    assert m["vggspec.spec"] == SPEC


def test_export_is_seeded_and_matches_the_library(tmp_path, spec):
    out = tmp_path / "m.onnx"
    assert cli("export", spec, "--seed", "4", "--opset", "18", "-o", out).exit_code == 0
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 18
    lib = vggspec.export_onnx(vggspec.load_spec(spec), seed=4, opset=18)
    assert {t.name: t.raw_data for t in model.graph.initializer} == {t.name: t.raw_data for t in lib.graph.initializer}


def test_set_overrides_apply(tmp_path, spec):
    out = tmp_path / "m.onnx"
    assert cli("export", spec, "--set", "classes=3", "--embed-preprocessing", "-o", out).exit_code == 0
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert s.get_inputs()[0].name == "image"
    assert s.run(None, {"image": np.zeros((3, 32, 32, 3), np.uint8)})[0].shape == (3, 3)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    graph = vggspec.loads_spec(SPEC)
    tensors = init_weights(graph, "kaiming", seed=7)
    pre = Preprocessing(1.0, (123.0, 117.0, 104.0), (1.0, 1.0, 1.0), "BGR")
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, Checkpoint(tensors, SPEC, pre, ("a", "b", "c", "d"), "test"))
    return path, tensors


def test_checkpoint_supplies_spec_weights_preprocessing_and_labels(tmp_path, checkpoint):
    path, tensors = checkpoint
    out = tmp_path / "m.onnx"
    result = cli("export", "--weights", path, "-o", out)
    assert result.exit_code == 0, result.output
    m = meta(out)
    assert json.loads(m["vggspec.labels"]) == ["a", "b", "c", "d"]
    assert json.loads(m["vggspec.preprocessing"])["channel_order"] == "BGR"
    assert json.loads(m["vggspec.preprocessing"])["mean"] == [123.0, 117.0, 104.0]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert np.array_equal(weights["fc4.weight"], tensors["fc4.weight"])


def test_checkpoint_with_an_explicit_spec(tmp_path, checkpoint, spec):
    out = tmp_path / "m.onnx"
    assert cli("export", spec, "--weights", checkpoint[0], "-o", out).exit_code == 0
    assert json.loads(meta(out)["vggspec.labels"])[0] == "a"


def test_mismatched_checkpoint_names_the_tensor_and_writes_nothing(tmp_path, checkpoint):
    other = tmp_path / "other.vgg"
    other.write_text(SPEC.replace("conv3-8 maxpool conv3-8", "conv3-8 maxpool conv3-12"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("export", other, "--weights", checkpoint[0], "-o", out_dir / "m.onnx")
    assert result.exit_code == 1
    assert "conv2_1.weight" in result.output and "ckpt.safetensors" in result.output
    assert "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--precision", "int8"], "calibration"),
    (["--precision", "int8", "--calibration", "NOPE"], "does not exist"),
    (["--precision", "int8", "--calibration", "EMPTY"], "no images"),
    (["--opset", "7"], "opset 7"),
])
def test_errors_are_one_message_and_no_file(tmp_path, spec, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("NOPE", "EMPTY") else a for a in args]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = cli("export", spec, *args, "-o", out_dir / "m.onnx")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_unknown_precision_and_missing_folder(tmp_path, spec):
    assert cli("export", spec, "--precision", "int4", "-o", tmp_path / "m.onnx").exit_code == 2
    result = cli("export", spec, "-o", tmp_path / "nope" / "m.onnx")
    assert result.exit_code == 1 and "does not exist" in result.output
    assert cli("export", "-o", tmp_path / "m.onnx").exit_code == 2  # neither SPEC nor --weights
    assert list(tmp_path.iterdir()) == [tmp_path / "clitiny.vgg"]


def test_int8_from_the_command_line(tmp_path, spec):
    from PIL import Image

    cal = tmp_path / "cal"
    cal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)).save(cal / f"{i}.jpg")
    out = tmp_path / "q.onnx"
    result = cli("export", spec, "--precision", "int8", "--calibration", cal, "-o", out)
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "pre-processing" not in result.output
    assert meta(out)["vggspec.precision"] == "int8"


def test_module_imports_neither_torch_nor_onnxruntime():
    code = ("import sys, vggspec.cli.export\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnxruntime'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_export_command_without_torch(vggspec_cli, tmp_path, spec):
    out = tmp_path / "m.onnx"
    result = vggspec_cli("export", str(spec), "--fully-conv", "--precision", "fp16", "-o", str(out), without_torch=True)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "wrote" in result.stdout


# --- A gray checkpoint (conftest's `gray`): its preprocessing, int8 at a static shape, the edge example.

ROOT = Path(__file__).resolve().parents[1]


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
