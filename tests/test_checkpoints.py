"""vggspec.checkpoints: the user-level checkpoint operations, and one way of naming a broken checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vggspec import checkpoints
from vggspec.cli import main
from vggspec.errors import WeightsError
from vggspec.weights import load_checkpoint, save_checkpoint

SPEC = """name: tiny
input: 16x16x3
classes: 3
scale: 1/255

conv3-4 maxpool
conv3-8 maxpool
FC-16 FC-3 soft-max
"""


@pytest.fixture()
def made(tmp_path: Path) -> Path:
    (tmp_path / "tiny.vgg").write_text(SPEC)
    result = checkpoints.init_checkpoint(tmp_path / "tiny.vgg", "xavier", seed=1)
    save_checkpoint(tmp_path / "good.safetensors", result.checkpoint)
    for cls in ("a", "b", "c"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 40 * len(cls), np.uint8)).save(tmp_path / "data" / cls / "0.png")
    return tmp_path


def test_every_command_names_a_broken_checkpoint_the_same_way(made: Path) -> None:
    good = load_checkpoint(made / "good.safetensors")
    tensors = {**good.tensors, "conv1_1.bias": good.tensors["conv1_1.bias"][:2]}  # the spec needs 4
    save_checkpoint(made / "partial.safetensors", replace(good, tensors=tensors))
    (made / "garbage.safetensors").write_bytes(b"not a checkpoint")
    for name, problem in (("partial.safetensors", "conv1_1.bias has shape (2,), the spec needs (4,)"),
                          ("garbage.safetensors", "not a safetensors checkpoint")):
        path = str(made / name)
        for args in (["export", "--weights", path, "-o", str(made / "x.onnx")],
                     ["predict", path, str(made / "data" / "a" / "0.png")],
                     ["eval", path, "--data", str(made / "data")]):
            result = CliRunner().invoke(main, args)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.startswith(f"{path}: error: ") and problem in result.stderr, (args, result.stderr)
    with pytest.raises(WeightsError, match="the spec needs") as info:
        checkpoints.export_forms(made / "partial.safetensors", made)
    assert info.value.path == str(made / "partial.safetensors")


def test_the_operations_are_reachable_from_python(made: Path) -> None:
    standard, dense = checkpoints.export_forms(made / "good.safetensors", made)
    assert standard.is_file() and dense.is_file()
    checkpoints.export_checkpoint("caffe", made / "good.safetensors", made / "blobs.npz")
    back = checkpoints.import_checkpoint("caffe", made / "blobs.npz", made / "tiny.vgg")
    good = load_checkpoint(made / "good.safetensors")
    for key, value in good.tensors.items():
        np.testing.assert_array_equal(back.checkpoint.tensors[key], value, err_msg=key)
    ckpt, graph = checkpoints.open_checkpoint(made / "good.safetensors")
    assert graph.meta.name == "tiny" and ckpt.source == "init:xavier:seed=1"
