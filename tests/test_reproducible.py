"""Builds an edge box can trust: the same inputs give the same bytes in any folder; pictures keep their text."""

from __future__ import annotations

import shutil
from pathlib import Path

from click.testing import CliRunner

from vggspec.cli import main

SPEC = "name: tiny\ninput: 32x32x3\nclasses: 3\nconv3-4 maxpool conv3-8 maxpool FC-16 FC-3 soft-max\n"


def _export(folder: Path, *flags: str) -> tuple[bytes, str]:
    folder.mkdir(parents=True)
    (folder / "tiny.vgg").write_text(SPEC)
    result = CliRunner().invoke(main, ["export", str(folder / "tiny.vgg"), "-o", str(folder / "t.onnx"), *flags])
    assert result.exit_code == 0, result.output
    return (folder / "t.onnx").read_bytes(), result.output


def test_the_same_export_is_the_same_bytes_in_any_folder(tmp_path: Path) -> None:
    a, _ = _export(tmp_path / "one")
    b, _ = _export(tmp_path / "some" / "other" / "place")
    assert a == b
    assert str(tmp_path).encode() not in a  # no absolute path of the build machine inside


def test_export_says_what_the_file_is(tmp_path: Path) -> None:
    _, out = _export(tmp_path / "d", "--fully-conv", "--flip", "--scores", "--embed-preprocessing")
    for trait in ("fully convolutional", "flips in-graph", "score map output", "uint8 NHWC input"):
        assert trait in out


def test_svg_and_pdf_keep_text_as_text(tmp_path: Path) -> None:
    for suffix in ("svg", "pdf"):
        out = tmp_path / f"a.{suffix}"
        result = CliRunner().invoke(main, ["graph", "A", "-o", str(out)])
        assert result.exit_code == 0, result.output
        data = out.read_bytes()
        if suffix == "svg":
            assert b"<text" in data and b"conv3_1" in data
        else:
            assert b"/FontFile2" in data or b"/TrueType" in data  # embedded TrueType: selectable text
    shutil.rmtree(tmp_path)
