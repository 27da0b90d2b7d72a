"""`vggspec build`, `vggspec init` and `vggspec weights import|export`, run as a user runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import vggspec
from vggspec.backends.torch import render_source
from vggspec.weights import init_weights, load_checkpoint

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
