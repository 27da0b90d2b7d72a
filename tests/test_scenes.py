"""The scenes data set: byte-identical reruns, disjoint source scans, the documented sizes, right labels, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vggspec.datasets import scenes
from vggspec.errors import DataError

pytest.importorskip("sklearn")

COUNTS = {"train": 40, "val": 20, "test": 30}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _meta(folder: Path) -> dict:
    return json.loads((folder / "scenes.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "s"
    assert scenes.write_scenes(out, counts=COUNTS) == COUNTS
    return out


def test_same_seed_same_bytes_other_seed_other_bytes(written: Path, tmp_path: Path) -> None:
    scenes.write_scenes(tmp_path / "again", counts=COUNTS)
    files = _files(written)
    assert len(files) == sum(COUNTS.values()) + 1 and _files(tmp_path / "again") == files
    scenes.write_scenes(tmp_path / "other", counts=COUNTS, seed=1)
    other = _files(tmp_path / "other")
    assert other.keys() == files.keys()  # the same layout: image i has class i % 10 whatever the seed
    assert all(other[name] != data for name, data in files.items())


def test_an_image_does_not_depend_on_the_counts(written: Path, tmp_path: Path) -> None:
    scenes.write_scenes(tmp_path / "few", counts={"train": 5, "val": 0, "test": 3})
    few, files = _files(tmp_path / "few"), _files(written)
    assert len(few) == 9 and all(few[name] == files[name] for name in few if name.endswith(".png"))


def test_splits_use_disjoint_scans(written: Path) -> None:
    splits = _meta(written)["splits"]
    pools = {name: set(split["pool"]) for name, split in splits.items()}
    assert not pools["train"] & pools["val"] and not pools["val"] & pools["test"] and not pools["train"] & pools["test"]
    assert set().union(*pools.values()) == set(range(1797))
    assert 0.59 < len(pools["train"]) / 1797 < 0.61 and 0.24 < len(pools["test"]) / 1797 < 0.26
    for name, split in splits.items():
        assert len(split["images"]) == COUNTS[name]
        for record in split["images"]:
            assert record["scan"] in pools[name] and set(record["fragments"]) <= pools[name]
            assert len(record["fragments"]) <= 4
    assert sum(len(r["fragments"]) >= 1 for split in splits.values() for r in split["images"]) >= 0.95 * 90


def test_labels_folders_and_images(written: Path) -> None:
    from sklearn.datasets import load_digits

    targets = load_digits().target
    meta = _meta(written)
    for name, split in meta["splits"].items():
        for i, record in enumerate(split["images"]):
            label = record["label"]
            assert record["file"] == f"{name}/{label}/{i:05d}.png" and label == i % 10 == targets[record["scan"]]
            x, y, side = record["box"]
            assert 20 <= side <= 64 and 0 <= x <= 96 - side and 0 <= y <= 96 - side
    image = Image.open(written / meta["splits"]["val"]["images"][3]["file"])
    assert image.mode == "RGB" and image.size == (96, 96)
    assert meta["seed"] == 0 and meta["digit_range"] == [20, 64] and meta["counts"] == COUNTS
    assert not list(written.glob(".scenes-tmp-*"))


def test_digit_sizes_span_the_range() -> None:
    digits, _ = scenes.load_scans()
    sides = []
    windows = scenes.fragment_windows(digits[:500])
    for i in range(300):
        image, info = scenes.render_scene(np.random.default_rng([7, 0, i]), digits[i], digits[:500], 64, (12, 40),
                                          windows)
        x, y, side = info["box"]
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert 12 <= side <= 40 and 0 <= x <= 64 - side and 0 <= y <= 64 - side
        sides.append(side)
    assert max(sides) / min(sides) >= 2.5
    assert np.median(sides) < (12 + 40) / 2  # log-uniform: as many small digits as large ones, by ratio


def test_digit_colour_contrasts_with_its_background() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        under = rng.uniform(0, 1, (50, 3)) * 40 + rng.uniform(0, 215, 3)  # a patch of varied but related colours
        colour = scenes.pick_colour(rng, under)
        assert np.all((colour >= 0) & (colour <= 255))
        assert np.percentile(np.abs(under @ scenes.LUMA - colour @ scenes.LUMA), 10) >= scenes.MIN_CONTRAST - 1e-6


def test_fragments_are_partial_strokes() -> None:
    digits, _ = scenes.load_scans()
    windows = scenes.fragment_windows(digits)
    assert len(windows) > 10000 and set(windows[:, 3] * windows[:, 4]) <= {9, 12}  # at most 12 of 64 cells
    rng = np.random.default_rng(0)
    for _ in range(200):
        cell = float(rng.uniform(2.5, 8))
        found = scenes.fragment(rng, digits, windows, cell)
        assert found is not None
        _, mask = found
        assert max(mask.shape) <= round(7 * cell) and mask.min() >= 0 and mask.max() <= 1
        assert not scenes._has_hole(mask > 0.1)  # no loop that reads as a 0


def test_existing_folder_needs_force_and_failures_leave_nothing(written: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="already holds"):
        scenes.write_scenes(written, counts=COUNTS)
    out = tmp_path / "s"
    scenes.write_scenes(out, counts={"train": 3, "val": 1, "test": 1})
    before = _files(out)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(scenes, "render_scene", broken)
    with pytest.raises(RuntimeError):
        scenes.write_scenes(out, counts={"train": 4, "val": 1, "test": 1}, force=True)
    assert _files(out) == before and not list(out.glob(".scenes-tmp-*"))
    monkeypatch.undo()
    assert scenes.write_scenes(out, counts={"train": 4, "val": 1, "test": 1}, force=True)["train"] == 4
    assert len(list((out / "train").rglob("*.png"))) == 4


@pytest.mark.parametrize(("size", "digit_range"), [(15, (8, 12)), (96, (20, 20)), (96, (7, 20)), (32, (8, 33))])
def test_bad_options(tmp_path: Path, size: int, digit_range: tuple[int, int]) -> None:
    with pytest.raises(DataError):
        scenes.write_scenes(tmp_path / "s", size=size, digit_range=digit_range, counts={"train": 1})
    assert not (tmp_path / "s").exists()


def test_missing_scikit_learn_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match="scikit-learn is not installed") as info:
        scenes.write_scenes(tmp_path / "s")
    assert "vggspec[train]" in info.value.hint


def test_preview(written: Path, tmp_path: Path) -> None:
    path = scenes.preview(written, tmp_path / "grid.png", rows=2, cols=3)
    assert Image.open(path).format == "PNG"
    digits, _ = scenes.load_scans()
    image, _ = scenes.render_scene(np.random.default_rng(0), digits[0], digits)
    assert Image.open(scenes.preview([(image, 0)], tmp_path / "one.png", rows=1, cols=2)).size[0] > 100
    with pytest.raises(DataError, match="scenes.json"):
        scenes.preview(tmp_path, tmp_path / "none.png")


def test_cli(tmp_path: Path) -> None:
    from vggspec.cli import main

    runner = CliRunner()
    args = ["data", "scenes", str(tmp_path / "s"), "--size", "32", "--train", "20", "--val", "10", "--test", "10",
            "--min-digit", "10", "--max-digit", "30", "--seed", "3", "--preview", str(tmp_path / "p.png")]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output == (f"wrote {tmp_path / 's'}: train 20, val 10, test 10 images, 32x32 RGB, digits 10-30 px; "
                             f"preview in {tmp_path / 'p.png'}\n")
    assert (tmp_path / "p.png").is_file() and len(list((tmp_path / "s" / "test").rglob("*.png"))) == 10
    result = runner.invoke(main, args[:3])
    assert result.exit_code == 1 and "already holds" in result.output and "--force" in result.output
    for bad in (["--min-digit", "40", "--max-digit", "30"], ["--max-digit", "100"], ["--size", "8"]):
        result = runner.invoke(main, ["data", "scenes", str(tmp_path / "t"), *bad])
        assert result.exit_code == 2 and "Traceback" not in result.output and "Error" in result.output, result.output
    assert not (tmp_path / "t").exists()
    result = runner.invoke(main, ["data", "scenes", "--help"])
    assert "vggspec data scenes" in result.output


def test_clutter_scales_texture_fragments_and_noise(tmp_path: Path) -> None:
    few = {"train": 30, "val": 10, "test": 10}
    scenes.write_scenes(tmp_path / "plain", counts=few, clutter=0.0)
    plain = _meta(tmp_path / "plain")
    assert plain["clutter"] == 0.0
    assert all(not r["fragments"] for s in plain["splits"].values() for r in s["images"])
    scenes.write_scenes(tmp_path / "usual", counts=few)
    scenes.write_scenes(tmp_path / "busy", counts=few, clutter=2.0)

    def roughness(name: str) -> float:  # neighbouring pixels differ more with texture and noise
        files = sorted((tmp_path / name / "train").rglob("*.png"))
        return float(np.mean([np.median(np.abs(np.diff(np.asarray(Image.open(f), np.float64), axis=1)))
                              for f in files]))

    assert roughness("plain") < 0.5 * roughness("usual") < 0.5 * roughness("busy")
    count = lambda m: sum(len(r["fragments"]) for s in m["splits"].values() for r in s["images"])  # noqa: E731
    assert count(_meta(tmp_path / "busy")) > count(_meta(tmp_path / "usual")) > 0
