"""Training data: the folder checks, augmentation shapes, PCA lighting, the global-batch sampler, digits.

Also holds the small helpers (tiny specs, synthetic folders) the other test_train files import.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggspec.errors import DataError, VggspecError
from vggspec.imaging import rescale
from vggspec.preprocessing import Preprocessing
from vggspec.train.augment import Augment, CenterEval, Lighting, parse_scale
from vggspec.train.data import GlobalBatchSampler, ImageDataset, channel_stats, collate, scan_folder

# No batch norm, no dropout: a deterministic module, so 1 and 2 DDP processes can be compared.
TINY = """name: tiny
input: 8x8x{c}
classes: {k}
norm: {norm}
dropout: {dropout}
init: kaiming
scale: 1/255
mean: {mean}
std: {std}

conv3-4 maxpool
conv3-8 maxpool
FC-16 FC-{k} soft-max
"""


def tiny_spec(path: Path, channels: int = 3, classes: int = 3, norm: str = "none", dropout: float = 0.0) -> Path:
    mean, std = " ".join(["0.5"] * channels), " ".join(["0.25"] * channels)
    path.write_text(TINY.format(c=channels, k=classes, norm=norm, dropout=dropout, mean=mean, std=std))
    return path


def image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 10, channels: int = 3,
                 splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Path:
    """Class c: a bright band at row c * size / classes on noise; learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                a = rng.integers(0, 60, (size, size, channels)).astype(np.uint8)
                band = c * size // classes
                a[band:band + max(1, size // classes)] = 220
                Image.fromarray(a[..., 0] if channels == 1 else a).save(folder / f"{i}.png")
    return root


def test_scale_parsing() -> None:
    assert parse_scale("256") == (256, 256)
    assert parse_scale("256:512") == (256, 512)
    for bad in ("512:256", "0", "a:b", "1:2:3"):
        with pytest.raises(VggspecError):
            parse_scale(bad)


def test_rescale_is_isotropic() -> None:
    image = Image.new("RGB", (300, 200))
    assert rescale(image, 100).size == (150, 100)
    assert rescale(Image.new("RGB", (200, 300)), 100).size == (100, 150)


def test_jittered_scale_and_crop_shapes() -> None:
    aug = Augment(crop=(8, 8), scale=(10, 16), preprocessing=Preprocessing(1 / 255, (0.5,) * 3, (0.25,) * 3))
    image = Image.new("RGB", (40, 20), (128, 64, 32))
    seen = set()
    for i in range(40):
        rng = np.random.default_rng(i)
        s = int(np.random.default_rng(i).integers(10, 17))  # the first draw is S
        seen.add(s)
        out = aug(image, rng)
        assert out.shape == (3, 8, 8) and out.dtype == np.float32
    assert len(seen) > 4  # S is drawn afresh per image
    gray = Augment(crop=(8, 6), scale=(8, 8), preprocessing=Preprocessing(1 / 255, (0.5,), (0.5,)))
    assert gray(Image.new("L", (9, 30)), np.random.default_rng(0)).shape == (1, 8, 6)
    centre = CenterEval(crop=(8, 8), size=12, preprocessing=Preprocessing(1 / 255, (0.0,), (1.0,)))
    assert centre(Image.new("L", (30, 12))).shape == (1, 8, 8)


def test_augmentation_depends_only_on_the_seed() -> None:
    aug = Augment(crop=(8, 8), scale=(10, 14), preprocessing=Preprocessing(1 / 255, (0.5,) * 3, (0.25,) * 3),
                  lighting=Lighting(np.array([0.01, 0.02, 0.2]), np.eye(3)))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    a, b = aug(image, np.random.default_rng([0, 1, 2])), aug(image, np.random.default_rng([0, 1, 2]))
    np.testing.assert_array_equal(a, b)


def test_pca_lighting() -> None:
    # Pixels along one colour direction: the top eigenvector, and the shift lies along it.
    rng = np.random.default_rng(0)
    direction = np.array([0.8, 0.5, 0.33]) / np.linalg.norm([0.8, 0.5, 0.33])
    pixels = 0.5 + rng.normal(0, 0.1, (5000, 1)) * direction + rng.normal(0, 0.005, (5000, 3))
    cov = np.cov(pixels.T)
    eigval, eigvec = np.linalg.eigh(cov)
    light = Lighting(eigval, eigvec, std=0.1)
    shifts = np.stack([light.shift(np.random.default_rng(i)) for i in range(500)])
    # Shifts are mostly along the principal direction, with std = 0.1 * its eigenvalue.
    along = shifts @ direction
    assert abs(np.std(along) - 0.1 * eigval[-1]) < 0.2 * 0.1 * eigval[-1]
    assert np.linalg.norm(shifts - np.outer(along, direction), axis=1).mean() < 0.05 * np.abs(along).mean()
    # One channel: a brightness shift scaled by the variance.
    gray = Lighting(np.array([0.04]), np.eye(1), std=0.1)
    assert gray.shift(np.random.default_rng(0)).shape == (1,)


def test_channel_stats_on_a_folder(tmp_path: Path) -> None:
    root = image_folder(tmp_path, channels=3)
    train, _ = scan_folder(root, 3)
    mean, cov = channel_stats(train, 3, 1 / 255)
    pixels = np.concatenate([np.asarray(Image.open(f), np.float64).reshape(-1, 3) / 255 for f in train.files])
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(cov, np.cov(pixels.T, bias=True), atol=1e-9)


def test_bad_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data folder"):
        scan_folder(tmp_path / "missing", 3)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        scan_folder(tmp_path / "empty", 3)
    root = image_folder(tmp_path / "four", classes=4, per_class=2)
    with pytest.raises(DataError, match="4 class folders but the spec has 3 classes"):
        scan_folder(root, 3)
    root = image_folder(tmp_path / "noval", classes=3, per_class=2, splits=("train",))
    with pytest.raises(DataError, match="no such folder"):
        scan_folder(root, 3)


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = image_folder(tmp_path, per_class=3)
    (root / "train" / "class0" / "broken.png").write_bytes(b"not a png")
    (root / "train" / "class1" / "empty.jpg").write_bytes(b"")
    train, _ = scan_folder(root, 3)
    centre = CenterEval(crop=(8, 8), size=10, preprocessing=Preprocessing(1 / 255, (0.5,) * 3, (0.25,) * 3))
    dataset = ImageDataset(train, centre, 3, seed=0)
    x, y, skipped = collate([dataset[(0, i)] for i in range(len(train))])
    assert skipped == 2 and x.shape == (len(train) - 2, 3, 8, 8) and len(y) == len(train) - 2


def test_global_batch_is_the_same_for_any_world_size() -> None:
    def step_keys(world: int, accumulate: int) -> list[set]:
        steps: list[set] = []
        per_step = world * accumulate
        shares = [list(GlobalBatchSampler(50, 8, r, world, accumulate, seed=3, epoch=1)) for r in range(world)]
        n = len(shares[0])
        for s in range(n // accumulate):
            keys = set()
            for r in range(world):
                for micro in shares[r][s * accumulate:(s + 1) * accumulate]:
                    keys |= set(micro)
            steps.append(keys)
        assert all(len(k) == 8 for k in steps) and per_step > 0
        return steps

    one = step_keys(1, 1)
    assert len(one) == 6  # 50 // 8, the partial batch dropped
    assert step_keys(2, 1) == one == step_keys(2, 2) == step_keys(1, 4)
    resumed = list(GlobalBatchSampler(50, 8, 0, 1, 1, seed=3, epoch=1, start=4))
    assert [set(b) for b in resumed] == one[4:]
    assert step_keys(1, 1) != [set(b) for b in GlobalBatchSampler(50, 8, 0, 1, 1, seed=3, epoch=2)]


def test_batch_must_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not split"):
        GlobalBatchSampler(50, 6, 0, 4, 1, seed=0, epoch=0)
    with pytest.raises(DataError, match="fewer than one batch"):
        GlobalBatchSampler(5, 8, 0, 1, 1, seed=0, epoch=0)


def test_digits_folder(tmp_path: Path) -> None:
    from vggspec.datasets.digits import write_digits

    counts = write_digits(tmp_path / "d", size=16)
    assert sum(counts.values()) == 1797 and 0.69 < counts["train"] / 1797 < 0.71
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (tmp_path / "d" / split).iterdir()) == [str(d) for d in range(10)]
    image = Image.open(next((tmp_path / "d" / "val" / "7").iterdir()))
    assert image.mode == "L" and image.size == (16, 16) and np.asarray(image).max() > 200
    files = {split: {p.name for p in (tmp_path / "d" / split).rglob("*.png")} for split in ("train", "val", "test")}
    assert not files["train"] & files["val"] and not files["val"] & files["test"]
    with pytest.raises(DataError, match="already holds"):
        write_digits(tmp_path / "d")
    again = write_digits(tmp_path / "d", size=16, force=True)
    assert again == counts
    assert {p.name for p in (tmp_path / "d" / "val").rglob("*.png")} == files["val"]  # the split is seeded


def test_data_digits_and_train_help_need_no_torch(tmp_path: Path, vggspec_cli) -> None:
    result = vggspec_cli("data", "digits", str(tmp_path / "d"), "--size", "8", without_torch=True)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "d" / "test").rglob("*.png"))) == 1797 - 1258 - 269
    result = vggspec_cli("train", "--help", without_torch=True)
    assert result.returncode == 0 and "--accumulate" in result.stdout


def test_data_sets_are_written_whole_or_not_at_all_by_one_writer(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from click.testing import CliRunner

    from vggspec.atomic import folder_lock
    from vggspec.cli import main

    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "vggspec", "data", "digits", str(out), "--size", "8"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def interrupted(*extra: str) -> subprocess.CompletedProcess:
        p = subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline and not list(out.glob(".digits.vggspec-tmp-*/train/*/*.png")):
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)  # as Ctrl-C: the half-written set is removed on the way out
        _, err = p.communicate(timeout=60)
        return subprocess.CompletedProcess(p.args, p.returncode, "", err)

    result = interrupted()
    assert result.returncode == 143 and "terminated" in result.stderr, result.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # no partial set that `train` would take for a data set
    assert CliRunner().invoke(main, ["data", "digits", str(out), "--size", "8"]).exit_code == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    result = interrupted("--force", "--seed", "1")
    assert result.returncode == 143 and sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    # A second writer into the same folder is refused, not allowed to delete the first one's set.
    with folder_lock(out):
        for command in (["digits", "--force"], ["scenes", "--force", "--train", "1", "--val", "1", "--test", "1"]):
            result = CliRunner().invoke(main, ["data", command[0], str(out), *command[1:]])
            assert result.exit_code == 1, result.output
            assert result.output.startswith(f"{out}: error: is in use by process {os.getpid()}"), result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # the lock file is gone too
