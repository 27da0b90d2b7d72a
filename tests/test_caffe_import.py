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


def _npz_with_header(path: Path, arrays: dict[str, np.ndarray], claimed: dict[str, tuple[int, ...]]) -> Path:
    """An .npz whose members `claimed` say a huge shape in their .npy header, followed by a few bytes: what
    a decompression bomb looks like before it unpacks."""
    import io
    import zipfile

    from numpy.lib import format as npy

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        for name, shape in claimed.items():
            buffer = io.BytesIO()
            npy.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", buffer.getvalue() + bytes(1 << 20))
    return path


def test_npz_headers_are_read_before_any_blob_is_unpacked(tmp_path: Path) -> None:
    import resource
    import time

    blobs = _release(tmp_path)
    good = tmp_path / "good.npz"
    np.savez(good, **blobs)
    args = ["weights", "import", "--from", "caffe", "--spec", "D", *SETS]
    result = CliRunner().invoke(main, [*args[:4], str(good), *args[4:], "-o", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 0, result.output
    bomb_blobs = {k: v for k, v in blobs.items() if k != "fc6.weight"}
    bomb = _npz_with_header(tmp_path / "bomb.npz", bomb_blobs, {"fc6.weight": (50_000, 10_000)})  # 2 GB said
    assert bomb.stat().st_size < 4 << 20
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    result = CliRunner().invoke(main, [*args[:4], str(bomb), *args[4:], "-o", str(tmp_path / "b.safetensors")])
    assert result.exit_code == 1, result.output
    assert "blob fc6.weight has shape (50000, 10000) (500,000,000 values); the spec's layer has" in result.output
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # kB: nothing near 2 GB
    extra = _npz_with_header(tmp_path / "extra.npz", blobs, {"stowaway": (50_000, 10_000)})
    result = CliRunner().invoke(main, [*args[:4], str(extra), *args[4:], "-o", str(tmp_path / "c.safetensors")])
    assert result.exit_code == 1 and "unexpected blob stowaway" in result.output, result.output
    assert not (tmp_path / "b.safetensors").exists() and not (tmp_path / "c.safetensors").exists()
