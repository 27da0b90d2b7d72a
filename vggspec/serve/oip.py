"""The Open Inference Protocol's infer messages (KServe v2 REST, as Triton implements it), with the binary
tensor data extension: a JSON header of `Inference-Header-Content-Length` bytes, then each binary tensor's
raw little-endian bytes in order.

Decoding checks everything a client sends against the model's own input (name, datatype, rank, channels,
size) and raises RequestError with one line for people; nothing here runs a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..imaging import MAX_PIXELS
from ..runtime.session import ModelInfo

HEADER = "Inference-Header-Content-Length"
DATATYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "FP64": np.float64}


class RequestError(Exception):
    """A request that cannot be served as sent: an HTTP status and one line for people."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def datatype(dtype: Any) -> str:
    name = np.dtype(dtype)
    return next(k for k, v in DATATYPES.items() if np.dtype(v) == name)


@dataclass(frozen=True)
class Requested:
    """What the client asked back: output names and whether each comes as binary data."""

    outputs: dict[str, bool]
    request_id: str | None


def decode(body: bytes, header_length: str | None, info: ModelInfo) -> tuple[np.ndarray, Requested]:
    """The input batch and the requested outputs of an infer request for the model of `info`."""
    header, binary = _split(body, header_length)
    try:
        request = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the request is not valid JSON") from None
    except RecursionError:  # arrays nested thousands deep: valid JSON, but no tensor request looks like it
        raise RequestError(400, "the request's JSON is nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise RequestError(400, "the request needs an 'inputs' list")
    check_one_input(len(request["inputs"]), info)
    x = tensor(request["inputs"][0], binary, info)
    return x, _requested(request, info)


def check_one_input(count: int, info: ModelInfo) -> None:
    if count != 1:
        raise RequestError(400, f"the model takes exactly one input, '{info.input_name}'")


def check_output(name: Any, info: ModelInfo) -> None:
    if name not in info.outputs:
        raise RequestError(400, f"unknown output '{_short(name)}': the model has {', '.join(info.outputs)}")


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise RequestError(400, f"{HEADER} is not a number") from None
    if not 0 < n <= len(body):
        raise RequestError(400, f"{HEADER} {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def tensor(spec: Any, binary: bytes, info: ModelInfo) -> np.ndarray:
    """One input tensor as the protocol describes it (JSON's form: name, datatype, shape, and 'data' or a
    'binary_data_size' of `binary`), checked against the model's input."""
    if not isinstance(spec, dict):
        raise RequestError(400, "an input must be a JSON object")
    if spec.get("name") != info.input_name:
        raise RequestError(400, f"unknown input '{_short(spec.get('name'))}': the model's input is "
                                f"'{info.input_name}'")
    want = datatype(info.input_dtype)
    if spec.get("datatype") != want:
        raise RequestError(400, f"input '{info.input_name}' is {want}, not {_short(spec.get('datatype'))}")
    shape = _shape(spec.get("shape"), info)
    dtype = np.dtype(info.input_dtype).newbyteorder("<")
    count = math.prod(shape)
    size = _parameters(spec, "the input's").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != count * dtype.itemsize or size != len(binary):
            raise RequestError(400, f"binary_data_size {_short(size)} does not match shape {_short(shape)} of {want} "
                                    f"({count * dtype.itemsize} bytes) and the {len(binary)} bytes sent")
        x = np.frombuffer(binary, dtype=dtype)
    else:
        x = _json_data(spec.get("data"), dtype, count, shape)
    return x.reshape(shape).astype(info.input_dtype, copy=False)


def _parameters(owner: dict[str, Any], whose: str) -> dict[str, Any]:
    """An input's or output's 'parameters': a JSON object, or absent."""
    params = owner.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RequestError(400, f"{whose} 'parameters' must be a JSON object")
    return params


def _json_data(data: Any, dtype: np.dtype, count: int, shape: list[int]) -> np.ndarray:
    if data is None:
        raise RequestError(400, "the input has neither 'data' nor binary data")
    try:
        x = np.asarray(data, dtype=np.float64).ravel()
    except (ValueError, TypeError, OverflowError):  # OverflowError: a whole number past float64 (10**400)
        raise RequestError(400, "the input's 'data' must be numbers (a flat or nested list)") from None
    if x.size != count:
        raise RequestError(400, f"the input's 'data' holds {x.size} values; shape {_short(shape)} needs {count}")
    if not np.isfinite(x).all():
        raise RequestError(400, "the input's 'data' holds NaN or infinite values")
    if dtype.kind == "u" and (x.min(initial=0) < 0 or x.max(initial=0) > 255 or not np.all(x == np.round(x))):
        raise RequestError(400, "UINT8 data must be whole numbers from 0 to 255")
    return x.astype(dtype)


def _shape(shape: Any, info: ModelInfo) -> list[int]:
    # type() rather than isinstance: JSON true is a Python bool, an int to isinstance but no size
    if not isinstance(shape, list) or len(shape) != 4 or not all(type(d) is int and d > 0 for d in shape):
        raise RequestError(400, f"shape {_short(shape)} is not a 4-d batch of positive sizes")
    nhwc = info.embedded_preprocessing or info.preprocessing.layout == "NHWC"
    n, c, h, w = (shape[0], shape[3], shape[1], shape[2]) if nhwc else shape
    layout = "N, H, W, C" if nhwc else "N, C, H, W"
    if c != info.channels:
        raise RequestError(400, f"shape {_short(shape)} ({layout}) has {c} channels; the model takes {info.channels}")
    need = info.static_hw or (None if info.fully_conv else info.input_size)
    if need is not None and (h, w) != tuple(need):
        raise RequestError(400, f"shape {_short(shape)} ({layout}): the model takes exactly {need[0]}x{need[1]}")
    if h < info.input_size[0] or w < info.input_size[1]:
        raise RequestError(400, f"shape {_short(shape)} ({layout}): the model needs at least "
                                f"{info.input_size[0]}x{info.input_size[1]}")
    if n * h * w > MAX_PIXELS:
        raise RequestError(400, f"shape {_short(shape)} is over the {MAX_PIXELS // 1_000_000}-megapixel limit "
                                "per request")
    if info.batch is not None and n != info.batch:
        raise RequestError(400, f"the model takes batches of exactly {info.batch}")
    return shape


def _requested(request: dict[str, Any], info: ModelInfo) -> Requested:
    params = request.get("parameters") or {}
    default_binary = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    asked = request.get("outputs")
    if asked is None:
        outputs = {name: default_binary for name in info.outputs}
    elif not isinstance(asked, list) or not asked:
        raise RequestError(400, "'outputs' must be a non-empty list")
    else:
        outputs = {}
        for out in asked:
            name = out.get("name") if isinstance(out, dict) else None
            check_output(name, info)
            binary = _parameters(out, f"output '{name}'").get("binary_data", default_binary)
            outputs[name] = bool(binary)
    rid = request.get("id")
    return Requested(outputs, rid if isinstance(rid, str) else None)


def encode(model: str, results: dict[str, np.ndarray], requested: Requested) -> tuple[bytes, dict[str, str]]:
    """The infer response body and its extra headers (the header length when any output is binary)."""
    header: dict[str, Any] = {"model_name": model, "model_version": "1", "outputs": []}
    if requested.request_id is not None:
        header["id"] = requested.request_id
    blobs: list[bytes] = []
    for name, binary in requested.outputs.items():
        value = np.ascontiguousarray(results[name], dtype="<f4")
        out: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(value.shape)}
        if binary:
            blob = value.tobytes()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = [float(v) for v in value.ravel()]
        header["outputs"].append(out)
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, {}
    return text + b"".join(blobs), {HEADER: str(len(text))}


def _short(value: Any, most: int = 40) -> str:
    """A client's value quoted back safely: short and printable, and as the JSON it came in (never a Python
    repr: `[true]`, not `[True]`)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= most else text[:most - 3] + "..."
