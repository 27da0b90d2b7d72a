"""Image decoding and preprocessing with Pillow and numpy, as the model's metadata says.

Pixels stay uint8 HWC through rescaling, cropping and flipping (cheap, and what a model with
embedded preprocessing takes); `to_input` turns a batch into the normalised NCHW float tensor last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .session import ModelInfo, Preprocessing


def _pil() -> Any:
    from PIL import Image, ImageOps

    return Image, ImageOps


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


# Signatures of common formats: a file that starts like an image but does not decode is corrupt, not foreign.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


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


def rescale(img: Any, q: int | None) -> Any:
    """Isotropic rescale so that the smallest side is Q (the paper's test scale); None keeps the size."""
    if q is None:
        return img
    Image, _ = _pil()
    w, h = img.size
    short = min(w, h)
    if short == q:
        return img
    size = (max(1, round(w * q / short)), max(1, round(h * q / short)))
    return img.resize(size, Image.BILINEAR)


def to_array(img: Any) -> np.ndarray:
    """uint8 H x W x C."""
    a = np.asarray(img, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def check_size(pixels: np.ndarray, minimum: tuple[int, int], path: str | None, q: int | None) -> None:
    """An image smaller than the model's input (crop size, or a dense model's minimum) cannot run."""
    h, w = pixels.shape[:2]
    if h < minimum[0] or w < minimum[1]:
        at = f"after rescaling to Q={q}" if q is not None else "at its own size"
        raise DataError(
            f"too small: {h}x{w} pixels {at}; the model needs at least {minimum[0]}x{minimum[1]}",
            path, "use a larger --scales value" if q is not None else None,
        )


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


def normalise(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 N x H x W x C -> float32 in the model's layout: (pixel * scale - mean) / std, mean in model order."""
    x = batch.astype(np.float32)
    if prep.channel_order == "BGR" and x.shape[-1] == 3:
        x = x[..., ::-1]
    mean = np.asarray(prep.mean, dtype=np.float32)
    std = np.asarray(prep.std, dtype=np.float32)
    x = (x * np.float32(prep.scale) - mean) / std
    return x if prep.layout == "NHWC" else x.transpose(0, 3, 1, 2)


def to_input(batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """What the model's input takes: raw uint8 NHWC when it embeds preprocessing, else normalised floats."""
    if info.embedded_preprocessing:
        return np.ascontiguousarray(batch, dtype=np.uint8)
    return np.ascontiguousarray(normalise(batch, info.preprocessing), dtype=info.input_dtype)


def preprocess(path: str | Path, info: ModelInfo, q: int | None) -> np.ndarray:
    """One image file to a 1-image input batch for `info`'s model at scale Q (the dense form)."""
    pixels = to_array(rescale(load_image(path, info.channels), q))
    check_size(pixels, info.input_size, str(path), q)
    return to_input(pixels[None], info)
