"""int8 export: static QDQ quantization with onnxruntime's tools, calibrated on a folder of images.

The calibration images are preprocessed as the model's metadata says: decoded with Pillow,
converted to RGB (L for one-channel specs), rescaled isotropically so the image covers the
spec's input size, centre-cropped, then (pixel * scale - mean) / std in NCHW, unless the
preprocessing is embedded in the graph, when the reader feeds the uint8 NHWC crop itself.
(Self-contained on purpose: vggspec/runtime/preprocess.py does the same for inference and the two may be unified.)
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from ..errors import DataError, VggspecError
from ..graph import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# The network's compute ops; the head (spatial mean, soft-max, flip average) stays float32.
QUANTIZED_OPS = ["Conv", "Gemm", "Relu", "MaxPool", "Flatten"]


def calibration_images(folder: str | Path | None) -> list[Path]:
    """The image files of a calibration folder, sorted; a DataError when there are none."""
    if folder is None:
        raise DataError("int8 needs calibration images", hint="give --calibration DIR, a folder of images")
    path = Path(folder)
    if not path.is_dir():
        what = "calibration path is not a folder" if path.exists() else "calibration folder does not exist"
        raise DataError(what, str(path))
    images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        hint = f"put some {', '.join(IMAGE_SUFFIXES[:3])} files in it"
        raise DataError("calibration folder has no images", str(path), hint)
    return images


def load_crop(path: Path, hw: tuple[int, int], channels: int) -> np.ndarray:
    """uint8 (H, W, C): decoded, isotropically rescaled to cover `hw`, centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            h, w = hw
            s = max(h / im.height, w / im.width)
            size = (max(w, round(im.width * s)), max(h, round(im.height * s)))
            im = im.resize(size, Image.BILINEAR)
            left, top = (size[0] - w) // 2, (size[1] - h) // 2
            arr = np.asarray(im.crop((left, top, left + w, top + h)), np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot decode calibration image ({exc})", str(path)) from None
    return arr.reshape(h, w, channels)


def normalise(crop: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """float32 (1, C, H, W) = (pixel * scale - mean) / std, in the network's channel order."""
    x = crop.astype(np.float32)
    if pre.channel_order.upper() == "BGR":
        x = x[..., ::-1]
    x = (x * np.float32(pre.scale) - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _reader(images: list[Path], input_name: str, hw: tuple[int, int], channels: int, pre: Preprocessing,
            embed: bool) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    class ImageFolderReader(CalibrationDataReader):
        """One image per batch, decoded lazily so a large folder is not held in memory."""

        def __init__(self) -> None:
            self._it = self._feeds()

        def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
            for path in images:
                crop = load_crop(path, hw, channels)
                yield {input_name: crop[None] if embed else normalise(crop, pre)}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._feeds()

    return ImageFolderReader()


def quantize(model: onnx.ModelProto, calibration: str | Path | None, hw: tuple[int, int], pre: Preprocessing,
             embed: bool) -> onnx.ModelProto:
    """Static QDQ quantization: per-channel int8 weights, int8 activations, MinMax calibration."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    except ImportError:
        raise VggspecError("int8 export needs onnxruntime", hint="pip install 'vggspec[cpu]'") from None
    images = calibration_images(calibration)
    graph_input = model.graph.input[0]
    channels = graph_input.type.tensor_type.shape.dim[3 if embed else 1].dim_value
    reader = _reader(images, graph_input.name, hw, channels, pre, embed)
    with tempfile.TemporaryDirectory(prefix="vggspec-int8-") as tmp, _quiet_preprocessing_advice():
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            model, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
            use_external_data_format=_large(model),
        )
        return onnx.load_model(str(out))


def _large(model: onnx.ModelProto) -> bool:
    from .onnx import EXTERNAL_DATA_BYTES, initializer_bytes

    return initializer_bytes(model) >= EXTERNAL_DATA_BYTES


class _DropAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextmanager
def _quiet_preprocessing_advice() -> Iterator[None]:
    """Silence quantize_static's advice to run its pre-processing (shape inference, BN folding): the graph
    built here already has its shapes and folded batch norm, so the advice is noise on the CLI."""
    root, advice = logging.getLogger(), _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)
