"""One imaging pipeline: training's evaluation transform and the runtime's preprocessing see the same pixels.

The files are the awkward ones a real data set holds: a phone photo whose rotation lives in EXIF,
a 16-bit scan, a palette GIF-style PNG, an RGBA screenshot and a CMYK JPEG.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_runtime import conv_model

import vggspec.imaging
from vggspec.cli import main
from vggspec.errors import DataError, ModelError
from vggspec.imaging import (
    IMAGE_EXTENSIONS,
    MAX_PIXELS,
    center_crop,
    list_images,
    load_image,
    normalise,
    rescale,
    scan_image_folder,
)
from vggspec.preprocessing import Preprocessing
from vggspec.runtime import Member, Model, Protocol, Runner
from vggspec.runtime.evaluate import list_dataset
from vggspec.runtime.preprocess import preprocess
from vggspec.runtime.ray_eval import _Evaluator
from vggspec.runtime.session import ModelInfo
from vggspec.train.augment import CenterEval
from vggspec.train.data import ImageDataset, scan_folder

PREP = Preprocessing(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _awkward_files(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    files = []
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: training must not see it sideways
    files.append(folder / "phone.jpg")
    Image.fromarray(rgb).save(files[-1], exif=exif, quality=95)
    files.append(folder / "scan16.png")
    Image.fromarray(rng.integers(0, 65536, (36, 28), dtype=np.uint16)).save(files[-1])
    files.append(folder / "palette.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(files[-1])
    files.append(folder / "screenshot.png")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (30, 44), dtype=np.uint8)]), "RGBA").save(files[-1])
    files.append(folder / "print.jpg")
    Image.fromarray(rgb).convert("CMYK").save(files[-1])
    return files


@pytest.mark.parametrize("channels", [3, 1])
def test_training_eval_transform_equals_runtime_preprocessing(tmp_path: Path, channels: int) -> None:
    for name in ("a", "b"):
        _awkward_files(tmp_path / "train" / name)
        _awkward_files(tmp_path / "val" / name)
    prep = PREP if channels == 3 else Preprocessing(1 / 255, (0.5,), (0.25,))
    crop, q = (16, 16), 20
    _, val = scan_folder(tmp_path, 2)
    # Training's path: the dataset decodes, the evaluation transform rescales, crops and normalises.
    dataset = ImageDataset(val, CenterEval(crop=crop, size=q, preprocessing=prep), channels, seed=0)
    info = ModelInfo(path="m.onnx", name="m", classes=2, input_size=crop, channels=channels, preprocessing=prep)
    for index, path in enumerate(val.files):
        trained, _ = dataset[(0, index)]
        # The runtime's path: the whole image at Q, as a dense model takes it; the centre crop of it.
        runtime = preprocess(path, info, q)[0]
        top, left = (runtime.shape[1] - crop[0]) // 2, (runtime.shape[2] - crop[1]) // 2
        np.testing.assert_array_equal(trained, runtime[:, top:top + crop[0], left:left + crop[1]], err_msg=path.name)


def test_exif_rotation_reaches_training(tmp_path: Path) -> None:
    (phone,) = [p for p in _awkward_files(tmp_path) if p.name == "phone.jpg"]
    assert load_image(phone).size == (30, 44)  # upright: 44 tall, 30 wide
    pixels = center_crop(np.asarray(load_image(phone)), (40, 30))
    assert pixels.shape == (40, 30, 3)


def test_one_scanner_one_extension_list(tmp_path: Path) -> None:
    for ext in IMAGE_EXTENSIONS:
        (tmp_path / "cls").mkdir(exist_ok=True)
        (tmp_path / "cls" / f"x{ext.upper()}").write_bytes(b"")
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    (tmp_path / "cls" / ".hidden.png").write_bytes(b"")
    assert len(list_images(tmp_path)) == len(IMAGE_EXTENSIONS)
    folder = scan_image_folder(tmp_path)
    assert folder.classes == ("cls",) and len(folder) == len(IMAGE_EXTENSIONS)


def test_normalise_shift_is_in_scaled_units_before_the_mean() -> None:
    pixels = np.full((1, 2, 2, 3), 51, np.uint8)  # 0.2 after 1/255
    out = normalise(pixels, Preprocessing(1 / 255, (0.1, 0.1, 0.1), (0.5, 0.5, 0.5)), np.array([0.1, 0.0, -0.1]))
    np.testing.assert_allclose(out[0, :, 0, 0], [0.4, 0.2, 0.0], atol=1e-6)


# --- Hostile images: each costs one per-file line, never the batch, and never unbounded memory.
#
# A 3 KB PNG of 1,000,000 x 1 pixels (rescaled to Q it asks for Q,000,000 x Q pixels), an image over the
# pixel limit at its own size, onnxruntime or numpy failing on one image's input, dangling or looping symbolic
# links and pipes named like images, and an image in Pillow's decompression-bomb warning zone.

ROOT = Path(__file__).resolve().parents[1]


def _good_images(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def val(tmp_path: Path) -> Path:
    """Two class folders of three small good images each."""
    _good_images(tmp_path / "val" / "cat", seed=1)
    _good_images(tmp_path / "val" / "dog", seed=2)
    return tmp_path / "val"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return conv_model(tmp_path / "m.onnx")


def _wide_png(path: Path) -> Path:
    Image.new("RGB", (1_000_000, 1), (10, 200, 30)).save(path)
    return path


def _eval(*args: str) -> object:
    return CliRunner().invoke(main, ["eval", *args, "--json"])


# ---------------------------------------------------------------- the rescaled size


def test_rescale_refuses_a_huge_result_before_resizing(monkeypatch) -> None:
    def no_resize(*_):  # noqa: ANN002, ANN202
        raise AssertionError("resized before checking the size")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    with pytest.raises(DataError) as info:
        rescale(Image.new("L", (1_000_000, 1)), 256, "wide.png")
    assert info.value.path == "wide.png"
    assert info.value.message == ("too large: 1000000 x 1 pixels; rescaled to Q=256 it would be 256000000 x 256 "
                                  "pixels, over the 64-megapixel limit")
    with pytest.raises(DataError, match="8001 x 8000 pixels at its own size"):
        rescale(Image.new("L", (8001, 8000)), None)


def test_a_3kb_png_of_a_million_by_one_pixels_is_one_failed_file(tmp_path: Path, val: Path, model: Path) -> None:
    """In a fresh process capped at 3 GB of address space (rescaling it would take tens of GB)."""
    resource = pytest.importorskip("resource")
    wide = _wide_png(val / "cat" / "wide.png")
    assert wide.stat().st_size < 10_000
    cap = 3 * 2**30
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
        from vggspec.cli import main
        main(sys.argv[1:], prog_name="vggspec")
    """)
    assert resource  # imported only to skip where it is missing
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, "eval", str(model), "--data", str(val), "--scales", "16",
                        "--threads", "1", "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert time.perf_counter() - start < 60
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        f"{wide}: error: too large: 1000000 x 1 pixels; rescaled to Q=16 it would be 16000000 x 16 pixels, "
        "over the 64-megapixel limit",
        "1 of 7 images failed",
    ]
    report = json.loads(r.stdout)
    assert report["images"] == 6 and [f["image"] for f in report["failed"]] == [str(wide)]


def test_a_scale_too_large_for_every_image_is_refused_once(model: Path) -> None:
    q = int(MAX_PIXELS**0.5) + 1
    with pytest.raises(ModelError, match=f"Q={q} makes every image at least {q} x {q} pixels"):
        Runner([Member.of(Model(model, "cpu"))], [Protocol("dense", (q,))])


def test_native_scale_over_the_limit_is_a_per_file_error(monkeypatch, val: Path, model: Path) -> None:
    monkeypatch.setattr(vggspec.imaging, "MAX_PIXELS", 1_000)  # the small images are 480 pixels
    big = val / "dog" / "big.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(big)
    result = _eval(str(model), "--data", str(val), "--scales", "native")
    assert result.exit_code == 1
    assert f"{big}: error: too large: 40 x 30 pixels at its own size" in result.stderr
    assert json.loads(result.stdout)["images"] == 6
    good = val / "cat" / "0.png"
    result = CliRunner().invoke(main, ["predict", str(model), str(big), str(good), "--scales", "native"])
    assert result.exit_code == 1 and f"{big}: error: too large" in result.stderr
    assert f"{good}  (dense" in result.stdout and "1 of 2 images failed" in result.stderr


# ---------------------------------------------------------------- an error while running one image


def _odd_image(val: Path) -> Path:
    odd = val / "dog" / "odd.png"
    Image.new("RGB", (31, 29), (200, 10, 10)).save(odd)
    return odd


def _failing_ort(monkeypatch) -> None:  # noqa: ANN001
    """onnxruntime cannot allocate for the odd image's input (29 pixels high); every other input runs."""
    import onnxruntime

    real = onnxruntime.InferenceSession.run

    def run(self, names, feed, *args):  # noqa: ANN001, ANN002, ANN202
        if next(iter(feed.values())).shape[2] == 29:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")
        return real(self, names, feed, *args)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", run)


def _failing_numpy(monkeypatch) -> None:  # noqa: ANN001
    """The odd image's float input does not fit in memory; every other image's does."""
    import vggspec.runtime.protocols as protocols

    real = protocols.to_input

    def to_input(batch, info):  # noqa: ANN001, ANN202
        if batch.shape[1] == 29:
            raise MemoryError
        return real(batch, info)

    monkeypatch.setattr(protocols, "to_input", to_input)


@pytest.mark.parametrize("inject,reason", [
    (_failing_ort, "onnxruntime failed on an input of shape [2, 3, 29, 31]: [ONNXRuntimeError] : 6 : "
                   "RUNTIME_EXCEPTION : Failed to allocate memory (model "),
    (_failing_numpy, "out of memory while evaluating this image"),
])
def test_an_error_running_one_image_fails_that_image_only(monkeypatch, val: Path, model: Path, inject,
                                                          reason: str) -> None:
    odd = _odd_image(val)
    inject(monkeypatch)
    result = _eval(str(model), "--data", str(val), "--scales", "native")
    assert result.exit_code == 1, result.output
    assert f"{odd}: error: {reason}" in result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 6 and [f["image"] for f in report["failed"]] == [str(odd)]
    good = val / "cat" / "1.png"
    result = CliRunner().invoke(main, ["predict", str(model), str(odd), str(good), "--scales", "native"])
    assert result.exit_code == 1 and f"{odd}: error: {reason}" in result.stderr
    assert f"{good}  (dense" in result.stdout


def test_the_ray_evaluator_reports_a_failing_image_per_file(monkeypatch, val: Path, model: Path) -> None:
    """_Evaluator.__call__ as a Ray actor runs it, without starting Ray."""
    odd = _odd_image(val)
    _failing_ort(monkeypatch)
    evaluator = object.__new__(_Evaluator)
    evaluator.runner = Runner([Member.of(Model(model, "cpu"))], [Protocol("dense", (None,))])
    paths = [str(val / "cat" / "0.png"), str(odd), str(val / "cat" / "1.png")]
    out = evaluator({"index": np.arange(3), "path": np.array(paths, dtype=object)})
    assert list(out["fatal"]) == ["", "", ""]
    assert out["error"][0] == out["error"][2] == "" and "Failed to allocate memory" in out["error"][1]
    assert out["posteriors"][0].sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- entries that are not image files


def test_dangling_links_loops_and_pipes_are_reported_per_file(tmp_path: Path, val: Path, model: Path) -> None:
    gone = val / "cat" / "gone.jpg"
    gone.symlink_to(tmp_path / "moved" / "gone.jpg")
    loop = val / "dog" / "loop.png"
    loop.symlink_to(loop)
    entries = [(gone, f"dangling symbolic link (to {tmp_path / 'moved' / 'gone.jpg'})"), (loop, "symbolic link loop")]
    if hasattr(os, "mkfifo"):  # a pipe named like an image would block Image.open for ever
        os.mkfifo(val / "dog" / "pipe.jpg")
        entries.append((val / "dog" / "pipe.jpg", "not a regular file (a device, pipe or socket)"))
    folder = scan_image_folder(val)
    assert len(folder.files) == 6 and sorted((p, why) for p, _, why in folder.problems) == sorted(entries)
    items, _ = list_dataset(val)
    assert len(items) == 6 + len(entries) and items == sorted(items)
    result = _eval(str(model), "--data", str(val))
    assert result.exit_code == 1
    for path, why in entries:
        assert f"{path}: error: {why}" in result.stderr.splitlines()
    assert f"{len(entries)} of {6 + len(entries)} images failed" in result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 6 and sorted(f["image"] for f in report["failed"]) == sorted(str(p) for p, _ in entries)
    with pytest.raises(DataError, match="dangling symbolic link"):
        load_image(gone)


def test_a_folder_of_only_dangling_links_says_so(tmp_path: Path) -> None:
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "a.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DataError, match="no readable images in any class folder .*a.jpg: dangling symbolic link"):
        scan_image_folder(tmp_path / "val")


def test_training_scan_warns_once_per_dangling_link(tmp_path: Path) -> None:
    for split in ("train", "val"):
        _good_images(tmp_path / split / "cat")
        _good_images(tmp_path / split / "dog")
    gone = tmp_path / "train" / "dog" / "gone.png"
    gone.symlink_to(tmp_path / "nowhere.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train, _ = scan_folder(tmp_path, 2)
    assert [str(w.message) for w in caught] == [f"{gone}: dangling symbolic link (to {tmp_path / 'nowhere.png'}); "
                                                "skipped"]
    assert len(train) == 6


# ---------------------------------------------------------------- decompression bombs


@pytest.mark.parametrize("side", [40, 60])  # 1,600 pixels: Pillow's warning zone; 3,600: over twice the limit
def test_a_decompression_bomb_is_a_data_error_not_a_warning(monkeypatch, tmp_path: Path, side: int) -> None:
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError, match=r"too large to decode safely \(Image size"):
            load_image(path)
    assert not caught


def test_eval_prints_a_bomb_as_one_line_without_a_raw_warning(tmp_path: Path, val: Path, model: Path) -> None:
    bomb = val / "cat" / "bomb.png"
    Image.new("RGB", (40, 40)).save(bomb)  # over the limit set below, under twice it: Pillow would only warn
    code = textwrap.dedent("""
        import sys
        from PIL import Image
        Image.MAX_IMAGE_PIXELS = 1_000
        from vggspec.cli import main
        main(sys.argv[1:], prog_name="vggspec")
    """)
    r = subprocess.run([sys.executable, "-W", "default", "-c", code, "eval", str(model), "--data", str(val)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{bomb}: error: too large to decode safely (Image size (1600 pixels) exceeds limit of 1000 pixels, "
        "could be decompression bomb DOS attack.)",
        "1 of 7 images failed",
    ]


def test_calibration_names_a_dangling_link(tmp_path: Path) -> None:
    import warnings

    from vggspec.backends.onnx_quant import calibration_images

    folder = tmp_path / "calib"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert calibration_images(folder) == [folder / "a.png"]
    assert any("gone.png" in str(w.message) and "not used for calibration" in str(w.message) for w in caught)


# --- Folders met by the scan.

def test_a_linked_folder_inside_a_class_folder_is_scanned(tmp_path: Path, gray_images) -> None:
    gray_images(tmp_path / "train" / "a", 2)
    gray_images(tmp_path / "elsewhere", 3, seed=1)
    (tmp_path / "train" / "a" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "train")  # a link back up is walked once
    assert len(scan_image_folder(tmp_path / "train").files) == 5
