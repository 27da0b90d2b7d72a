"""int8 export: static QDQ quantization with onnxruntime's tools, calibrated on a folder of images.

The calibration images are preprocessed as the model's metadata says, by the runtime's own
pipeline (vggspec.runtime.preprocess): the quantizer calibrates on exactly what inference feeds.
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


def calibration_inputs(model: onnx.ModelProto | bytes, images: list[Path]) -> Iterator[np.ndarray]:
    """Each calibration image as the model's input, preprocessed as its metadata says.

    The runtime's own pipeline does the work (decode, EXIF, colour modes, isotropic rescale,
    normalisation or raw uint8 for embedded preprocessing), so calibration sees exactly what
    inference will; the crop is the centre one at the spec's input size.
    """
    import onnxruntime as ort

    from ..runtime.preprocess import load_image, rescale, to_array, to_input
    from ..runtime.session import read_info

    data = model if isinstance(model, bytes) else model.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    info = read_info(session, "<model being quantized>")
    h, w = info.input_size
    for path in images:
        pixels = to_array(rescale(load_image(path, info.channels), min(h, w)))
        top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
        yield to_input(pixels[None, top : top + h, left : left + w], info)


def _reader(model: onnx.ModelProto, images: list[Path]) -> object:
    from onnxruntime.quantization import CalibrationDataReader

    name = model.graph.input[0].name
    data = model.SerializeToString()  # now: quantize_static moves the weights of `model` to external files

    class ImageFolderReader(CalibrationDataReader):
        """One image per batch, decoded lazily so a large folder is not held in memory."""

        def __init__(self) -> None:
            self._it = calibration_inputs(data, images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._it, None)
            return None if batch is None else {name: batch}

        def rewind(self) -> None:
            self._it = calibration_inputs(data, images)

    return ImageFolderReader()


def quantize(model: onnx.ModelProto, calibration: str | Path | None) -> onnx.ModelProto:
    """Static QDQ quantization: per-channel int8 weights, int8 activations, MinMax calibration."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    except ImportError:
        raise VggspecError("int8 export needs onnxruntime", hint="pip install 'vggspec[cpu]'") from None
    reader = _reader(model, calibration_images(calibration))
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
