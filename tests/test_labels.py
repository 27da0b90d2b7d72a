"""Label files are read in one place, and only regular files of a sane size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import vggspec
from vggspec.cli import main
from vggspec.errors import DataError, SpecError
from vggspec.files import file_problem
from vggspec.labels import MAX_BYTES, check_label_count, read_labels


def test_lines_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("\ufeff cat \r\ndog\n\n  \n")  # BOM, CRLF, spaces, trailing blank lines
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert read_labels(tmp_path / "a.txt") == read_labels(tmp_path / "b.json") == ("cat", "dog")


def test_a_blank_line_before_the_last_label_is_an_error(tmp_path: Path) -> None:
    # Skipping it would shift every later label onto the wrong class.
    for text, line in (("cat\n\ndog\n", 2), ("\ncat\ndog\n", 1), ("cat\ndog\n \nemu", 3)):
        (tmp_path / "a.txt").write_text(text)
        with pytest.raises(DataError, match=f"line {line} is blank") as info:
            read_labels(tmp_path / "a.txt")
        assert info.value.path == str(tmp_path / "a.txt") and info.value.hint
    (tmp_path / "b.json").write_text('["cat", " ", "dog"]')
    with pytest.raises(DataError, match="label 2 of the JSON list is empty"):
        read_labels(tmp_path / "b.json")


def test_duplicate_labels_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("cat\ndog\n cat\n")
    with pytest.raises(DataError, match="line 3 repeats the label 'cat' of line 1") as info:
        read_labels(tmp_path / "a.txt")
    assert info.value.path == str(tmp_path / "a.txt") and info.value.hint
    (tmp_path / "b.json").write_text('["cat", "dog", "dog"]')
    with pytest.raises(DataError, match="label 3 repeats the label 'dog' of label 2"):
        read_labels(tmp_path / "b.json")
    # A spec's `labels:` goes through the same reader: a located SpecError.
    spec = tmp_path / "s.vgg"
    spec.write_text("labels: a.txt\ninput: 32x32\nclasses: 3\nconv3-4 maxpool FC-3 soft-max\n")
    with pytest.raises(SpecError, match="repeats the label 'cat'"):
        vggspec.load_spec(spec)


def test_label_count_against_the_classes(tmp_path: Path) -> None:
    check_label_count(("cat", "dog"), 2, "a.txt")
    with pytest.raises(DataError, match="3 labels for 2 classes") as info:
        check_label_count(("cat", "dog", "emu"), 2, "a.txt")
    assert info.value.path == "a.txt" and info.value.hint


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_devices_pipes_and_huge_files_are_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/zero", tmp_path / "pipe"):
        with pytest.raises(DataError, match="not a regular file"):
            read_labels(path)
    with pytest.raises(DataError, match="is a folder, not a label file"):
        read_labels(tmp_path)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(DataError, match="MB"):
        read_labels(big)
    spec = tmp_path / "s.vgg"
    spec.write_text("labels: pipe\ninput: 32x32\nconv3-4 maxpool FC-2 soft-max\n")
    with pytest.raises(SpecError, match="not a regular file"):
        vggspec.load_spec(spec)


SPEC = "input: 32x32\nlabels: {}\nconv3-4 maxpool FC-2 soft-max\n"


@pytest.mark.parametrize("name", ["/etc/passwd", "/proc/self/environ", "../secret.txt", "sub/../../secret.txt",
                                  "out", "out/secret.txt", "dev"])
def test_a_specs_labels_stay_in_its_folder(tmp_path: Path, name: str) -> None:
    # A shared spec must not carry another file's lines into a model's metadata as class names.
    (tmp_path / "secret.txt").write_text("alpha\nbeta\n")
    folder = tmp_path / "spec"
    (folder / "sub").mkdir(parents=True)
    (folder / "out").symlink_to(tmp_path / "secret.txt")  # a link leading out, to a file or through a folder
    if name == "out/secret.txt":
        (folder / "out").unlink()
        (folder / "out").symlink_to(tmp_path)
    (folder / "dev").symlink_to("/dev/zero")
    (folder / "s.vgg").write_text(SPEC.format(name))
    with pytest.raises(SpecError) as info:
        vggspec.load_spec(folder / "s.vgg")
    message = info.value.format()
    assert f"{folder / 's.vgg'}:2:9: error: labels file" in message, message
    assert "absolute path" in message or "leads out of the spec's folder" in message
    assert "hint:" in message and "alpha" not in message
    result = CliRunner().invoke(main, ["summary", str(folder / "s.vgg")])
    assert result.exit_code == 1 and "s.vgg:2:9: error: labels file" in result.output, result.output
    assert "Traceback" not in result.output


def test_labels_inside_the_folder_through_links_and_on_the_command_line(tmp_path: Path) -> None:
    folder = tmp_path / "linked"
    (tmp_path / "real" / "sub").mkdir(parents=True)
    folder.symlink_to(tmp_path / "real")  # the spec reached through a linked folder finds its own files
    (tmp_path / "real" / "sub" / "l.txt").write_text("cat\ndog\n")
    (tmp_path / "real" / "l.txt").symlink_to("sub/l.txt")  # a link that stays inside
    for name in ("l.txt", "sub/l.txt", "sub/../l.txt", "./sub/l.txt"):
        (folder / "s.vgg").write_text(SPEC.format(name))
        assert vggspec.load_spec(folder / "s.vgg").meta.labels == ("cat", "dog")
    # --set labels= is typed by the user: read where it is, and an error blames the --set, not the spec.
    (tmp_path / "other.txt").write_text("emu\nyak\n")
    graph = vggspec.load_spec(folder / "s.vgg", ["labels=" + str(tmp_path / "other.txt")])
    assert graph.meta.labels == ("emu", "yak")
    with pytest.raises(SpecError, match="not a regular file") as info:
        vggspec.load_spec(folder / "s.vgg", ["labels=/dev/zero"])
    assert info.value.format().startswith("<--set>:1:")


def test_empty_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("\n\n")
    (tmp_path / "j.txt").write_text("[1, 2")
    with pytest.raises(DataError, match="empty"):
        read_labels(tmp_path / "e.txt")
    with pytest.raises(DataError, match="JSON"):
        read_labels(tmp_path / "j.txt")


def _unreadable(tmp_path: Path) -> dict[str, Path]:
    """A label file that is missing, a folder, a pipe, a dangling link and a link loop."""
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone.txt")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return {"missing": tmp_path / "missing.txt", "folder": tmp_path / "folder", "pipe": tmp_path / "pipe",
            "dangling": tmp_path / "dangling", "loop": tmp_path / "loop"}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_unreadable_label_file_is_said_as_for_every_input_file(tmp_path: Path) -> None:
    # files.require_file is asked first: the same words as a missing checkpoint, model or image.
    expected = {"missing": "no such file", "folder": "is a folder, not a label file",
                "pipe": "not a regular file (a device, pipe or socket)",
                "dangling": f"dangling symbolic link (to {tmp_path / 'gone.txt'})", "loop": "symbolic link loop"}
    for name, path in _unreadable(tmp_path).items():
        with pytest.raises(DataError) as info:
            read_labels(path)
        assert (info.value.message, info.value.path) == (expected[name], str(path))
        assert info.value.message == file_problem(path, "a label file")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_unreadable_label_file_in_a_spec_and_on_the_command_line(tmp_path: Path) -> None:
    paths = _unreadable(tmp_path)
    spec = tmp_path / "s.vgg"
    spec.write_text(SPEC.format("missing.txt"))
    with pytest.raises(SpecError, match="labels file .*missing.txt: no such file"):
        vggspec.load_spec(spec)
    spec.write_text(SPEC.format("pipe"))
    with pytest.raises(SpecError, match="labels file .*pipe: not a regular file"):
        vggspec.load_spec(spec)
    with pytest.raises(SpecError, match="labels file .*dangling: dangling symbolic link"):
        vggspec.load_spec(spec, ["labels=" + str(paths["dangling"])])
    result = CliRunner().invoke(main, ["summary", str(spec), "--set", "labels=" + str(paths["loop"])])
    assert result.exit_code == 1 and f"labels file {paths['loop']}: symbolic link loop" in result.output
    assert "Traceback" not in result.output
