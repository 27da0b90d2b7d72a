"""Label files are read in one place, and only regular files of a sane size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import vggspec
from vggspec.errors import DataError, SpecError
from vggspec.labels import MAX_BYTES, read_labels


def test_lines_and_json(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert read_labels(tmp_path / "a.txt") == read_labels(tmp_path / "b.json") == ("cat", "dog")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_devices_pipes_and_huge_files_are_refused_without_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    for path in ("/dev/zero", tmp_path / "pipe", tmp_path):
        with pytest.raises(DataError, match="not a regular file"):
            read_labels(path)
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(MAX_BYTES + 1)
    with pytest.raises(DataError, match="MB"):
        read_labels(big)
    spec = tmp_path / "s.vgg"
    spec.write_text("labels: /dev/zero\ninput: 32x32\nconv3-4 maxpool FC-2 soft-max\n")
    with pytest.raises(SpecError, match="not a regular file"):
        vggspec.load_spec(spec)


def test_empty_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("\n\n")
    (tmp_path / "j.txt").write_text("[1, 2")
    with pytest.raises(DataError, match="empty"):
        read_labels(tmp_path / "e.txt")
    with pytest.raises(DataError, match="JSON"):
        read_labels(tmp_path / "j.txt")
