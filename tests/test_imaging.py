"""One imaging pipeline: training's evaluation transform and the runtime's preprocessing see the same pixels.

The files are the awkward ones a real data set holds: a phone photo whose rotation lives in EXIF,
a 16-bit scan, a palette GIF-style PNG, an RGBA screenshot and a CMYK JPEG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggspec.imaging import (
    IMAGE_EXTENSIONS,
    center_crop,
    list_images,
    load_image,
    normalise,
    scan_image_folder,
)
from vggspec.preprocessing import Preprocessing
from vggspec.runtime.preprocess import preprocess
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
