"""`vggspec build`, `vggspec init` and `vggspec weights import|export`, run as a user runs them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import vggspec
from vggspec.backends.torch import render_source
from vggspec.cli import main
from vggspec.graph import Preprocessing
from vggspec.weights import Checkpoint, init_weights, load_checkpoint, save_checkpoint

TINY_A = (Path(__file__).parent / "data" / "tiny_a.vgg").read_text()
TINY_B = TINY_A.replace("tiny_a", "tiny_b").replace("conv3-8 ", "conv3-8 conv3-8 ").replace(
    "conv3-16 ", "conv3-16 conv3-16 ")


@pytest.fixture
def specs(tmp_path):
    (tmp_path / "a.vgg").write_text(TINY_A)
    (tmp_path / "b.vgg").write_text(TINY_B)
    return tmp_path


def _one_line_error(result) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and "error:" in lines[0], result.stderr
    assert all(line.startswith("  ") for line in lines[1:]), result.stderr  # the message, then its hint


def test_build_torch(specs, vggspec_cli):
    printed = vggspec_cli("build", "a.vgg", "--set", "norm=batch", cwd=specs, without_torch=True)
    assert printed.returncode == 0, printed.stderr
    expected = render_source(vggspec.load_spec(specs / "a.vgg", ("norm=batch",)))
    assert printed.stdout == expected
    written = vggspec_cli("build", "a.vgg", "--set", "norm=batch", "--target", "torch", "-o", "net.py", cwd=specs)
    assert written.returncode == 0, written.stderr
    assert (specs / "net.py").read_text() == expected  # byte-identical, by stdout or by file


def test_build_errors_leave_no_file(specs, vggspec_cli):
    (specs / "bad.vgg").write_text(TINY_A.replace("conv3-16", "conv3-x16"))
    _one_line_error(vggspec_cli("build", "bad.vgg", "-o", "bad.py", cwd=specs))
    _one_line_error(vggspec_cli("build", "a.vgg", "--set", "norm=maybe", "-o", "bad.py", cwd=specs))
    _one_line_error(vggspec_cli("build", "a.vgg", "-o", "missing/bad.py", cwd=specs))
    assert sorted(p.name for p in specs.iterdir()) == ["a.vgg", "b.vgg", "bad.vgg"]


def test_build_onnx(specs, vggspec_cli):
    pytest.importorskip("vggspec.backends.onnx")
    result = vggspec_cli("build", "a.vgg", "--target", "onnx", "-o", "a.onnx", cwd=specs, without_torch=True)
    assert result.returncode == 0, result.stderr
    assert (specs / "a.onnx").stat().st_size > 1000


def test_init_and_init_from(specs, vggspec_cli):
    result = vggspec_cli("init", "a.vgg", "--init", "xavier", "--seed", "3", "-o", "a.safetensors", cwd=specs,
                         without_torch=True)
    assert result.returncode == 0, result.stderr
    a = load_checkpoint(specs / "a.safetensors")
    expected = init_weights(vggspec.load_spec(specs / "a.vgg"), "xavier", 3)
    assert a.tensors.keys() == expected.keys()
    assert all(np.array_equal(a.tensors[k], v) for k, v in expected.items())
    assert a.source == "init:xavier:seed=3" and a.spec == TINY_A

    result = vggspec_cli("init", "b.vgg", "--init-from", "a.safetensors", "-o", "b.safetensors", cwd=specs)
    assert result.returncode == 0, result.stderr
    assert "conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8" in result.stdout
    b = load_checkpoint(specs / "b.safetensors")
    fresh = init_weights(vggspec.load_spec(specs / "b.vgg"), "paper", 0)
    copied = {"conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"}
    for key, value in b.tensors.items():
        want = a.tensors[key] if key.split(".")[0] in copied else fresh[key]
        assert np.array_equal(value, want), key

    (specs / "wide.vgg").write_text(TINY_B.replace("conv3-32", "conv3-48"))
    result = vggspec_cli("init", "wide.vgg", "--init-from", "a.safetensors", "-o", "w.safetensors", cwd=specs)
    _one_line_error(result)
    assert "conv3_1" in result.stderr and not (specs / "w.safetensors").exists()


def test_weights_export_import_round_trip(specs, vggspec_cli):
    pytest.importorskip("torch")
    assert vggspec_cli("init", "b.vgg", "--set", "norm=batch", "-o", "b.safetensors", cwd=specs).returncode == 0
    result = vggspec_cli("weights", "export", "--to", "torchvision", "b.safetensors", "-o", "b.pth", cwd=specs)
    assert result.returncode == 0, result.stderr
    result = vggspec_cli("weights", "import", "--from", "torchvision", "b.pth", "--spec", "b.vgg",
                         "--set", "norm=batch", "-o", "back.safetensors", cwd=specs)
    assert result.returncode == 0, result.stderr
    original, back = load_checkpoint(specs / "b.safetensors"), load_checkpoint(specs / "back.safetensors")
    assert back.tensors.keys() == original.tensors.keys()
    assert all(np.array_equal(back.tensors[k], v) for k, v in original.tensors.items())
    assert back.preprocessing.mean == (0.485, 0.456, 0.406) and back.preprocessing.scale == pytest.approx(1 / 255)
    assert back.overrides == ("norm=batch",) and back.source == "torchvision:b.pth"

    # a file that is not a checkpoint: one line, no output (bad .pth files: tests/test_weights.py)
    (specs / "junk.safetensors").write_bytes(b"junk")
    _one_line_error(vggspec_cli("weights", "export", "--to", "torchvision", "junk.safetensors", "-o", "x.pth",
                                cwd=specs))
    assert not (specs / "x.safetensors").exists() and not (specs / "x.pth").exists()


# --- Outputs that would destroy an input, checkpoints of gray specs, the same bytes twice (the `gray` spec and
# checkpoint are conftest's).

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


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


def test_torchvision_weights_for_a_gray_spec_take_the_spec_preprocessing(tmp_path: Path, gray) -> None:
    spec, ckpt = gray
    pth = tmp_path / "tv.pth"
    assert cli("weights", "export", "--to", "torchvision", ckpt, "-o", pth).exit_code == 0
    back = tmp_path / "back.safetensors"
    result = cli("weights", "import", "--from", "torchvision", pth, "--spec", spec, "-o", back)
    assert result.exit_code == 0 and "note: torchvision's preprocessing is for RGB images" in result.output
    assert load_checkpoint(back).preprocessing == Preprocessing(mean=(0.5,), std=(0.25,))
    rgb_stats = tmp_path / "rgb_stats.safetensors"  # what the import wrote before: ImageNet's three means
    save_checkpoint(rgb_stats, Checkpoint(load_checkpoint(ckpt).tensors, spec.read_text(), Preprocessing()))
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


def test_init_from_a_net_with_other_fc_layers_names_the_file(tmp_path: Path, tiny_gray_spec: Path) -> None:
    spec = tiny_gray_spec
    deeper = tmp_path / "a.safetensors"
    assert cli("init", "A", "--set", "width=1/16", "-o", deeper).exit_code == 0
    result = cli("init", spec, "--init-from", deeper, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and f"{deeper}: error: " in result.output and "hint:" in result.output
