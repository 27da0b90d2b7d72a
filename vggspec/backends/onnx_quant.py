"""int8 export: static QDQ quantization with onnxruntime's tools, calibrated on a folder of images.

The calibration images go through vggspec.imaging, the pipeline training and the runtime use, with the
model's own preprocessing: the quantizer calibrates on exactly what inference feeds.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import DataError, VggspecError
from ..imaging import IMAGE_EXTENSIONS, center_crop, load_pixels, model_input, scan_images
from ..preprocessing import Preprocessing

# The network's compute ops; the head (spatial mean, soft-max, flip average) stays float32.
QUANTIZED_OPS = ["Conv", "Gemm", "Relu", "MaxPool", "Flatten"]


@dataclass(frozen=True)
class Feed:
    """What the model being quantized takes: its channels, crop size, preprocessing, raw uint8 or not."""

    channels: int
    size: tuple[int, int]
    preprocessing: Preprocessing
    embedded: bool = False
    batch: int = 1  # a model with a static batch dimension takes exactly this many images per run


def calibration_images(folder: str | Path | None) -> list[Path]:
    """The image files of a calibration folder, sorted; a DataError when there are none."""
    if folder is None:
        raise DataError("int8 needs calibration images", hint="give --calibration DIR, a folder of images")
    path = Path(folder)
    if not path.is_dir():
        what = "calibration path is not a folder" if path.exists() else "calibration folder does not exist"
        raise DataError(what, str(path))
    images, problems = scan_images(path)
    for bad, why in problems:  # a calibration image gone missing is worth a line, not silence
        warnings.warn(f"{bad}: {why}; not used for calibration", stacklevel=2)
    if not images:
        hint = f"put some {', '.join(IMAGE_EXTENSIONS[:3])} files in it"
        raise DataError("calibration folder has no images", str(path), hint)
    return images


def calibration_inputs(feed: Feed, images: list[Path]) -> Iterator[np.ndarray]:
    """The calibration images as the model's input batches: each decoded, rescaled to the input's smaller
    side and centre-cropped by vggspec.imaging, exactly as training evaluates and the runtime predicts;
    `feed.batch` to a batch, the last one filled up with its last image."""
    for start in range(0, len(images), feed.batch):
        chunk = images[start:start + feed.batch]
        chunk += chunk[-1:] * (feed.batch - len(chunk))
        pixels = np.stack([center_crop(load_pixels(p, feed.channels, min(feed.size)), feed.size) for p in chunk])
        yield model_input(pixels, feed.preprocessing, feed.embedded)


def _reader(model: onnx.ModelProto, feed: Feed, images: list[Path]) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    name = model.graph.input[0].name

    class ImageFolderReader(CalibrationDataReader):
        """One image per batch, decoded lazily so a large folder is not held in memory."""

        def __init__(self) -> None:
            self._it = calibration_inputs(feed, images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {name: batch}

        def rewind(self) -> None:
            self._it = calibration_inputs(feed, images)

    return ImageFolderReader()


def quantize(model: onnx.ModelProto, calibration: str | Path | None, feed: Feed) -> onnx.ModelProto:
    """Static QDQ quantization: per-channel int8 weights, int8 activations, MinMax calibration."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    except ImportError:
        raise VggspecError("int8 export needs onnxruntime", hint="pip install 'vggspec[cpu]'") from None
    reader = _reader(model, feed, calibration_images(calibration))
    with tempfile.TemporaryDirectory(prefix="vggspec-int8-") as tmp, _quiet_preprocessing_advice():
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            model, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
            use_external_data_format=_large(model),
        )
        return onnx.load_model(str(out))


def _large(model: onnx.ModelProto) -> bool:
    from ..contract import EXTERNAL_DATA_BYTES
    from .onnx_stream import initializer_bytes

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
