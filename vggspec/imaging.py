"""Images, in one place: decoding, rescaling, cropping, normalising, and scanning image folders.

Training, evaluation, int8 calibration and prediction all call these functions, so a picture is seen
the same way everywhere: upright (EXIF orientation applied), in the same colour mode and bit depth,
rescaled with the same filter and rounding, normalised with the same float32 arithmetic.

Pixels stay uint8 H x W x C through rescaling, cropping and flipping (cheap, and what a model with
embedded preprocessing takes); `normalise` turns them into the network's float input last.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .errors import DataError
from .preprocessing import Preprocessing

# The one list of image file extensions: what the folder scanners pick up everywhere.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")

# Signatures of common formats: a file that starts like an image but does not decode is corrupt, not foreign.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

# The most pixels of any image vggspec builds: a rescaled image, or one used at its own size (`native`).
# 64 megapixels is 192 MB as uint8 RGB and 768 MB as the float32 input (twice that with its mirror): large
# enough for a modern camera's photo at its own size and for any rescale a sane aspect ratio gives, small
# enough that one image cannot take the machine. Without it, a valid 3 KB PNG of 1,000,000 x 1 pixels
# rescaled to Q=256 asks for 256,000,000 x 256 pixels. Decoding is bounded separately by Pillow's own
# PIL.Image.MAX_IMAGE_PIXELS (load_image refuses anything over it).
MAX_PIXELS = 64_000_000
# The largest scale (the short side after rescaling): every image rescaled to it is at least that square.
MAX_SCALE = math.isqrt(MAX_PIXELS)


def scale_problem(side: int) -> str | None:
    """Why rescaling every image's short side to `side` cannot work (over MAX_PIXELS), or None: training's
    --scale and testing's --scales ask it before the first image, not once per image."""
    if side > MAX_SCALE:
        return f"makes every image at least {side} x {side} pixels, over the {MAX_PIXELS // 1_000_000}-megapixel limit"
    return None


def _pil() -> Any:
    from PIL import Image, ImageOps

    return Image, ImageOps


# --- decoding ---------------------------------------------------------------------------------
def load_image(path: str | Path, channels: int = 3) -> Any:
    """Decode an image file into a Pillow image in mode RGB (or L for 1-channel models), upright.

    Every failure becomes a DataError naming the file and saying what is wrong with it. An image over
    Pillow's PIL.Image.MAX_IMAGE_PIXELS is refused (the size is read from the header, before decoding):
    Pillow would only warn up to twice that limit, a raw Python warning in the middle of a run.
    """
    Image, ImageOps = _pil()
    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: a truncated or corrupt file fails here, not later
                img = ImageOps.exif_transpose(img)  # cameras store rotation in EXIF, not in the pixels
                return to_mode(img, "L" if channels == 1 else "RGB")
    except Image.UnidentifiedImageError:
        if _looks_like_image(path):
            raise DataError("corrupt image (the header of a known format is unreadable)", str(path)) from None
        raise DataError("not an image (Pillow cannot identify the format)", str(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"too large to decode safely ({exc})", str(path)) from None
    except PermissionError:
        raise DataError("not readable (permission denied)", str(path)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise DataError(f"{reason} image ({exc})", str(path)) from None
    except (SyntaxError, ValueError, TypeError, IndexError, EOFError, struct.error) as exc:  # Pillow's plugins
        raise DataError(f"corrupt image ({type(exc).__name__}: {exc})", str(path)) from None


def _check_file(path: Path) -> None:
    problem = file_problem(path)
    if problem:
        raise DataError(problem, str(path))


def file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as an image file (dangling link, folder, pipe, empty...), or None.

    Checked before opening: a named pipe called x.jpg would block Image.open for ever.
    """
    problem = files.file_problem(path, "an image")
    if problem is None and Path(path).stat().st_size == 0:
        return "empty file (0 bytes)"
    return problem


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
    return to_array(rescale(load_image(path, channels), q, str(path)))


# --- geometry ---------------------------------------------------------------------------------
def rescale(img: Any, q: int | None, path: str | None = None) -> Any:
    """Isotropic rescale so that the smallest side is Q (the paper's S or Q); None keeps the size.

    DataError (naming `path`) when the result would be over MAX_PIXELS, checked before resizing.
    """
    check_pixels(img.size, q, path)
    size = rescaled_size(img.size, q)
    if size == img.size:
        return img
    Image, _ = _pil()
    return img.resize(size, Image.BILINEAR)


def rescaled_size(size: tuple[int, int], q: int | None) -> tuple[int, int]:
    """(width, height) after rescaling `size` so that its smallest side is Q (None: unchanged)."""
    w, h = size
    short = min(w, h)
    if q is None or short == q:
        return size
    return max(1, round(w * q / short)), max(1, round(h * q / short))


def check_pixels(size: tuple[int, int], q: int | None, path: str | None = None) -> None:
    """DataError when an image of `size` (width, height), rescaled to Q, would be over MAX_PIXELS."""
    w, h = rescaled_size(size, q)
    if w * h <= MAX_PIXELS:
        return
    limit = f"over the {MAX_PIXELS // 1_000_000}-megapixel limit"
    if q is None:
        raise DataError(f"too large: {w} x {h} pixels at its own size (--scales native), {limit}", path)
    raise DataError(f"too large: {size[0]} x {size[1]} pixels; rescaled to Q={q} it would be {w} x {h} pixels, "
                    f"{limit}", path)


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
    return _named_like_image(path) and path.is_file()


def _named_like_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files under `folder` (recursively, sorted), and the entries named like images that are not
    readable files (dangling or looping symbolic links, pipes...) with the reason: those are the user's
    files gone wrong, to be reported, not dropped."""
    files: list[Path] = []
    problems: list[tuple[Path, str]] = []
    for p in sorted(_walk(Path(folder))):
        if not _named_like_image(p):
            continue
        if p.is_file():
            files.append(p)
        elif not p.is_dir():  # a folder named x.jpg is a folder: the walk looks inside it
            problems.append((p, file_problem(p) or "not a regular file"))
    return files, problems


def _walk(root: Path) -> Iterator[Path]:
    """Every entry under `root`, following linked folders (a class folder may gather images by links, and
    Path.rglob would skip them silently), each real folder once: a link back up cannot loop."""
    seen: set[str] = set()
    for top, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        yield from (Path(top) / name for name in (*folders, *names))


def list_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, by extension, hidden files skipped), sorted."""
    return scan_images(folder)[0]


@dataclass(frozen=True)
class ImageFolder:
    """A labelled image folder, ROOT/<class>/**/<image>: file paths, class indices, class names."""

    root: Path
    files: tuple[Path, ...]
    targets: tuple[int, ...]
    classes: tuple[str, ...]
    # Entries named like images that cannot be read (dangling symbolic links...): (path, class index, reason).
    problems: tuple[tuple[Path, int, str], ...] = ()

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
        hint = "put each class's images in a folder named after the class"
        if any(_named_like_image(p) for p in root.iterdir()):  # DIR/<class> given for DIR: one level too low
            hint = (f"it holds images itself, so it looks like one class's folder (one level too low): give the "
                    f"folder above it, {root.resolve().parent}")
        raise DataError("no class folders (expected DIR/<class>/<images>)", str(root), hint)
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
    problems: list[tuple[Path, int, str]] = []
    index = {name: i for i, name in enumerate(names)}
    for name in found:  # files in path order, whatever the class order
        images, bad = scan_images(root / name)
        files += images
        targets += [index[name]] * len(images)
        problems += [(p, index[name], why) for p, why in bad]
    if not files and problems:
        raise DataError(f"no readable images in any class folder ({problems[0][0]}: {problems[0][2]}, and "
                        f"{len(problems) - 1} more)", str(root))
    if not files:
        raise DataError("no images in any class folder", str(root), f"image files end in {', '.join(IMAGE_EXTENSIONS)}")
    return ImageFolder(root, tuple(files), tuple(targets), names, tuple(problems))
