"""Images, in one place: decoding, rescaling, cropping, normalising, and scanning image folders.

Training, evaluation, int8 calibration and prediction all call these functions, so a picture is seen
the same way everywhere: upright (EXIF orientation applied), in the same colour mode and bit depth,
rescaled with the same filter and rounding, normalised with the same float32 arithmetic.

Pixels stay uint8 H x W x C through rescaling, cropping and flipping (cheap, and what a model with
embedded preprocessing takes); `normalise` turns them into the network's float input last.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .preprocessing import Preprocessing

# The one list of image file extensions: what the folder scanners pick up everywhere.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Signatures of common formats: a file that starts like an image but does not decode is corrupt, not foreign.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _pil() -> Any:
    from PIL import Image, ImageOps

    return Image, ImageOps


# --- decoding ---------------------------------------------------------------------------------
def load_image(path: str | Path, channels: int = 3) -> Any:
    """Decode an image file into a Pillow image in mode RGB (or L for 1-channel models), upright.

    Every failure becomes a DataError naming the file and saying what is wrong with it.
    """
    Image, ImageOps = _pil()
    path = Path(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated or corrupt file fails here, not later
            img = ImageOps.exif_transpose(img)  # cameras store rotation in EXIF, not in the pixels
            return to_mode(img, "L" if channels == 1 else "RGB")
    except Image.UnidentifiedImageError:
        if _looks_like_image(path):
            raise DataError("corrupt image (the header of a known format is unreadable)", str(path)) from None
        raise DataError("not an image (Pillow cannot identify the format)", str(path)) from None
    except Image.DecompressionBombError as exc:
        raise DataError(f"too large to decode safely ({exc})", str(path)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise DataError(f"{reason} image ({exc})", str(path)) from None
    except (SyntaxError, ValueError, TypeError, IndexError, EOFError) as exc:  # Pillow's plugins raise these
        raise DataError(f"corrupt image ({type(exc).__name__}: {exc})", str(path)) from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("no such file", str(path))
    if path.is_dir():
        raise DataError("is a folder, not an image", str(path))
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", str(path))


def _looks_like_image(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith(_MAGIC)


def to_mode(img: Any, mode: str) -> Any:
    """Convert any Pillow mode to RGB or L. 16-bit and 32-bit grey are scaled to 8 bits, not clipped."""
    Image, _ = _pil()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img)), "L")
    # RGBA/LA/PA drop alpha like torchvision's loader does, so inference sees what training saw.
    if img.mode != mode:
        img = img.convert(mode)
    return img


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Deep grey images to 0..255: 16-bit range when values exceed 8 bits, 0..1 floats scaled up."""
    a = a.astype(np.float64)
    top = float(a.max()) if a.size else 0.0
    if top > 255:
        a = a / 257.0  # 65535 -> 255
    elif 0 < top <= 1.0:
        a = a * 255.0
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


def to_array(img: Any) -> np.ndarray:
    """uint8 H x W x C."""
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def load_pixels(path: str | Path, channels: int = 3, q: int | None = None) -> np.ndarray:
    """Decode and rescale in one call: uint8 H x W x C with the smallest side Q (None: as stored)."""
    return to_array(rescale(load_image(path, channels), q))


# --- geometry ---------------------------------------------------------------------------------
def rescale(img: Any, q: int | None) -> Any:
    """Isotropic rescale so that the smallest side is Q (the paper's S or Q); None keeps the size."""
    if q is None:
        return img
    Image, _ = _pil()
    w, h = img.size
    short = min(w, h)
    if short == q:
        return img
    size = (max(1, round(w * q / short)), max(1, round(h * q / short)))
    return img.resize(size, Image.BILINEAR)


def center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """The centre crop (H, W) of H x W x C pixels; the odd pixel goes to the bottom and the right."""
    top, left = (pixels.shape[0] - crop[0]) // 2, (pixels.shape[1] - crop[1]) // 2
    return pixels[top:top + crop[0], left:left + crop[1]]


def random_crop(pixels: np.ndarray, crop: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A crop at a uniformly random position (section 3.1: one random crop per rescaled image)."""
    top = int(rng.integers(0, pixels.shape[0] - crop[0] + 1))
    left = int(rng.integers(0, pixels.shape[1] - crop[1] + 1))
    return pixels[top:top + crop[0], left:left + crop[1]]


def crop_positions(side: int, crop: int, n: int = 5) -> list[int]:
    """Offsets of an n-point crop grid along one axis: round(linspace(0, side - crop, n))."""
    return [int(v) for v in np.round(np.linspace(0, side - crop, n))]


def grid_crops(pixels: np.ndarray, crop: tuple[int, int], n: int = 5, flip: bool = True) -> np.ndarray:
    """The n x n crops (row-major), followed by their mirror images when `flip`: N x h x w x C uint8."""
    ch, cw = crop
    ys = crop_positions(pixels.shape[0], ch, n)
    xs = crop_positions(pixels.shape[1], cw, n)
    crops = np.stack([pixels[y:y + ch, x:x + cw] for y in ys for x in xs])
    return np.concatenate([crops, crops[:, :, ::-1]]) if flip else crops


def mirror(batch: np.ndarray) -> np.ndarray:
    """Horizontal flip of an N x H x W x C batch."""
    return batch[:, :, ::-1]


# --- normalising ------------------------------------------------------------------------------
def normalise(batch: np.ndarray, prep: Preprocessing, shift: np.ndarray | None = None) -> np.ndarray:
    """N x H x W x C pixels -> float32 in the model's layout: (pixel * scale + shift - mean) / std.

    `shift` is training's colour shift (AlexNet's PCA lighting), per channel in RGB order and in
    pixel * scale units; inference passes none. `mean` and `std` are in the model's channel order.
    """
    x = batch.astype(np.float32) * np.float32(prep.scale)
    if shift is not None:
        x = x + np.asarray(shift, dtype=np.float32)
    if prep.channel_order == "BGR" and x.shape[-1] == 3:
        x = x[..., ::-1]
    x = (x - np.asarray(prep.mean, dtype=np.float32)) / np.asarray(prep.std, dtype=np.float32)
    return x if prep.layout == "NHWC" else x.transpose(0, 3, 1, 2)


def model_input(batch: np.ndarray, prep: Preprocessing, embedded: bool = False, dtype: Any = np.float32) -> np.ndarray:
    """What a model's input takes: raw uint8 NHWC when it embeds preprocessing, else normalised `dtype`."""
    if embedded:
        return np.ascontiguousarray(batch, dtype=np.uint8)
    return np.ascontiguousarray(normalise(batch, prep), dtype=dtype)


# --- folders ----------------------------------------------------------------------------------
def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def list_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, by extension, hidden files skipped), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if is_image_file(p))


@dataclass(frozen=True)
class ImageFolder:
    """A labelled image folder, ROOT/<class>/**/<image>: file paths, class indices, class names."""

    root: Path
    files: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.files)

    def items(self) -> list[tuple[Path, int]]:
        return list(zip(self.files, self.targets, strict=True))


def class_folders(root: str | Path) -> list[str]:
    """The sorted names of ROOT's class folders (hidden folders skipped); DataError when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("no such folder (expected DIR/<class>/<images>)", str(root))
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError("no class folders (expected DIR/<class>/<images>)", str(root),
                        "put each class's images in a folder named after the class")
    return found


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None,
                      unknown_hint: str | None = None) -> ImageFolder:
    """List a labelled image folder. `classes` fixes the class order (the training split's, or the model's
    labels); without it the order is the sorted folder names, torchvision's ImageFolder convention."""
    root = Path(root)
    found = class_folders(root)
    names = tuple(classes) if classes is not None else tuple(found)
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"class folder '{unknown[0]}' is not among the {len(names)} classes", str(root / unknown[0]),
                        unknown_hint)
    files: list[Path] = []
    targets: list[int] = []
    index = {name: i for i, name in enumerate(names)}
    for name in found:  # files in path order, whatever the class order
        images = list_images(root / name)
        files += images
        targets += [index[name]] * len(images)
    if not files:
        raise DataError("no images in any class folder", str(root), f"image files end in {', '.join(IMAGE_EXTENSIONS)}")
    return ImageFolder(root, tuple(files), tuple(targets), names)
