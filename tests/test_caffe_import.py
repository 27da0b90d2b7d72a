"""`weights import --from caffe X.caffemodel`: Caffe's protobuf read with the protobuf library, both layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

from vggspec import load_spec
from vggspec.cli import main
from vggspec.weights import init_weights, load_checkpoint
from vggspec.weights.caffe import PREPROCESSING, to_caffe
from vggspec.weights.caffe_proto import messages, read_caffemodel, write_caffemodel

SETS = ["--set", "width=1/16", "--set", "input=32x32x3", "--set", "classes=10"]


def _release(tmp_path: Path) -> dict[str, np.ndarray]:
    """D's tensors (narrowed), as the Caffe release would hold them: BGR first conv, blob names."""
    graph = load_spec("D", ["width=1/16", "input=32x32x3", "classes=10"])
    return to_caffe(graph, init_weights(graph, "kaiming", seed=3))


@pytest.mark.parametrize("legacy", [True, False])
def test_a_caffemodel_imports_like_the_same_blobs_from_safetensors(tmp_path: Path, legacy: bool) -> None:
    blobs = _release(tmp_path)
    model = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    write_caffemodel(model, blobs, legacy=legacy)
    read = read_caffemodel(model)
    assert set(read) == {k.replace(".weight", ".0").replace(".bias", ".1") for k in blobs}
    save_file(blobs, str(tmp_path / "blobs.safetensors"))
    runner = CliRunner()
    for name, source in (("a", model), ("b", tmp_path / "blobs.safetensors")):
        result = runner.invoke(main, ["weights", "import", "--from", "caffe", str(source), "--spec", "D", *SETS,
                                      "-o", str(tmp_path / f"{name}.safetensors")])
        assert result.exit_code == 0, result.output
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "b.safetensors")
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        np.testing.assert_array_equal(a.tensors[key], b.tensors[key], err_msg=key)
    assert a.preprocessing == PREPROCESSING and a.preprocessing.scale == 1.0  # 0..255 minus the mean pixel
    # The first convolution now reads RGB: its input channels are the release's, reversed.
    np.testing.assert_array_equal(a.tensors["conv1_1.weight"], blobs["conv1_1.weight"][:, ::-1])


def test_legacy_blobs_keep_their_4d_shapes_and_fc_weights_are_flattened(tmp_path: Path) -> None:
    blobs = _release(tmp_path)
    blobs["fc6.weight"] = blobs["fc6.weight"].reshape(blobs["fc6.weight"].shape[0], -1, 1, 1)  # a conv kernel
    path = tmp_path / "m.caffemodel"
    write_caffemodel(path, blobs, legacy=True)
    net = messages()["NetParameter"]()
    net.ParseFromString(path.read_bytes())
    assert len(net.layers) > 0 and len(net.layer) == 0 and net.layers[0].blobs[0].num > 0
    result = CliRunner().invoke(main, ["weights", "import", "--from", "caffe", str(path), "--spec", "D", *SETS,
                                       "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02garbage" * 10, b"\x0a\x05short"])
def test_a_broken_caffemodel_is_a_named_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["weights", "import", "--from", "caffe", str(path), "--spec", "D", *SETS,
                                       "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1 and "Traceback" not in result.output and "internal error" not in result.output
    assert "bad.caffemodel" in result.output and not (tmp_path / "x.safetensors").exists()
