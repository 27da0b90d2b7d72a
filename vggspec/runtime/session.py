"""onnxruntime sessions: provider choice, the vggspec metadata contract, running batches.

Imports only onnxruntime and numpy (onnxruntime lazily, so that importing this module is cheap).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import Metadata, from_props, has_metadata
from ..errors import DataError, ModelError
from ..files import file_problem
from ..preprocessing import Preprocessing
from . import watchdog
from .memory import DEFAULT_MAX_MEMORY, activation_bytes, floats_per_pixel, shown_size

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
# auto tries these in order; onnxruntime drops the ones that fail to initialise.
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
GPU_PROVIDERS = frozenset({PROVIDERS["tensorrt"], PROVIDERS["cuda"]})

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Metadata):
    """What the runtime needs to know about a model: the contract's Metadata (a metadata-less model's as far as
    its shape and the command line tell) plus the graph's real IO, by keyword."""

    path: str
    has_metadata: bool = True
    input_name: str = "input"
    input_dtype: Any = np.float32
    batch: int | None = None  # a fixed batch dimension, or None when dynamic
    static_hw: tuple[int, int] | None = None  # a dense model exported with fixed H x W (--static-shape)
    outputs: tuple[str, ...] = ("probs",)
    probs_are_logits: bool = False  # metadata-less models may end in raw scores
    overridden: tuple[str, ...] = ()  # Overrides fields that replaced different values of the vggspec metadata
    metadata: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, meta: Metadata, path: str, **io: Any) -> ModelInfo:
        """`meta` as read from a model at `path`, with its IO fields (`io`) where known."""
        return cls(**{f.name: getattr(meta, f.name) for f in fields(Metadata)}, path=path, **io)

    @property
    def probs_output(self) -> str:
        return "probs" if "probs" in self.outputs else self.outputs[0]

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line for models without vggspec metadata (or to override it)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None
    labels: tuple[str, ...] | None = None
    fully_conv: bool | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.size, self.mean, self.std, self.scale, self.labels, self.fully_conv))


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


_preloaded = False


def _preload_gpu_libraries() -> None:
    """Load the CUDA and cuDNN libraries that pip put in site-packages (onnxruntime-gpu[cuda,cudnn]).

    onnxruntime-gpu does not find them on its own unless torch was imported first; without them the
    CUDA provider fails to initialise. Quiet: a failure here shows up as the provider check's error.
    """
    global _preloaded
    preload = getattr(_ort(), "preload_dlls", None)
    if _preloaded or preload is None:
        return
    _preloaded = True
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload()


# Measured on an H200 (benchmarks/RESULTS.md, GPU section): NHWC convolutions make D 1.24x (TF32) to 1.26x
# (fp16) faster at batch 64 and 1.17x in dense evaluation at Q = 512, with the same posteriors.
GPU_OPTIONS: dict[str, dict[str, str]] = {PROVIDERS["cuda"]: {"prefer_nhwc": "1"}}


def provider_list(device: str) -> list[str]:
    """The providers to ask onnxruntime for, most wanted first, CPU always last as the fallback."""
    if device not in DEVICES:
        raise ModelError(f"unknown device '{device}'", hint=f"use one of {', '.join(DEVICES)}")
    available = set(_ort().get_available_providers())
    if device != "cpu" and available & GPU_PROVIDERS:
        _preload_gpu_libraries()
    if device == "auto":
        return [PROVIDERS[d] for d in AUTO_ORDER if PROVIDERS[d] in available or d == "cpu"]
    if device == "cpu":
        return [PROVIDERS["cpu"]]
    wanted = PROVIDERS[device]
    if wanted not in available:
        raise ModelError(
            f"--device {device}: this onnxruntime has no {wanted} (it has {', '.join(sorted(available))})",
            hint="install onnxruntime-gpu (vggspec[gpu]) in place of onnxruntime, or use --device auto/cpu",
        )
    # TensorRT hands the nodes it cannot run to CUDA, then to the CPU.
    chain = [wanted, PROVIDERS["cuda"]] if device == "tensorrt" else [wanted]
    return [p for p in chain if p in available] + [PROVIDERS["cpu"]]


def session_options(threads: int | None = None) -> Any:
    ort = _ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # provider fallbacks are reported by us, not as onnxruntime warnings
    return opts


def check_model_file(path: str | Path, shown: str | None = None) -> Path:
    """The path of a model file that can be read; ModelError (naming `shown`, else the path) when it is
    missing, a folder, or not a regular file: reading a FIFO blocks until a writer comes, which is for ever."""
    path = Path(path)
    problem = file_problem(path, "an ONNX model")
    if problem is None:
        return path
    hint = None
    if problem == "no such file" and not path.suffix:
        hint = ("MODEL is an .onnx file or a .safetensors checkpoint, not a spec; "
                f"make one with `vggspec export {path} -o {path.name}.onnx`")
    raise ModelError(problem, shown or str(path), hint)


def create_session(path: str | Path, device: str = "auto", threads: int | None = None,
                   shown: str | None = None) -> tuple[Any, str]:
    """An InferenceSession and the provider that really took the graph; errors name `shown` (else the path).

    onnxruntime falls back to the CPU silently when a GPU provider cannot initialise (missing CUDA
    libraries), so the provider is read back from the session rather than assumed. GPU providers are
    tried one at a time, in order, each with vggspec's options first and, where this build refuses
    them, without.
    """
    path = check_model_file(path, shown)
    where = shown or str(path)
    chain = provider_list(device)
    why = ""
    # auto moves down the chain; an explicit device tries its own provider only (and fails without it).
    for i, gpu in enumerate(chain[:-1] if device in ("auto", "cpu") else chain[:1]):
        session, why = _try_gpu(path, chain[i:], threads)
        if session is not None:
            return session, gpu
    try:
        session = _new_session(path, [PROVIDERS["cpu"]], threads)
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ModelError(f"not a readable ONNX model ({ort_message(exc)})", where) from None
    if device not in ("auto", "cpu"):
        raise ModelError(f"--device {device}: {chain[0]} failed to initialise ({why})", where,
                         "check that the CUDA/cuDNN (and TensorRT) libraries match onnxruntime-gpu, "
                         "or use --device auto to fall back to the CPU")
    return session, PROVIDERS["cpu"]


def _try_gpu(path: Path, chain: list[str], threads: int | None) -> tuple[Any | None, str]:
    """A session that really runs on chain[0] (with GPU_OPTIONS, else plain), or None and the reason."""
    tuned: list[Any] = [(p, GPU_OPTIONS[p]) if p in GPU_OPTIONS else p for p in chain]
    why = ""
    for providers in [tuned, chain] if tuned != chain else [chain]:
        try:
            session = _new_session(path, providers, threads)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            why = ort_message(exc)
            continue
        if session.get_providers()[:1] == [chain[0]]:
            return session, ""
        why = f"onnxruntime fell back to {session.get_providers()[0]}"
    return None, why


def _new_session(path: Path, providers: list[Any], threads: int | None) -> Any:
    # onnxruntime prints its own fallback notices ("EP Error ... Falling back") on stdout, which would
    # corrupt --json output; the caller reads the provider back and reports a fallback itself.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return _ort().InferenceSession(str(path), sess_options=session_options(threads), providers=providers)


ORT_MESSAGE_LIMIT = 600  # characters: room for a shape complaint with its indices, not for a page of log


def ort_message(exc: BaseException) -> str:
    """onnxruntime's error in one line: every non-empty line joined with "; ", capped.

    Its messages put the status on the first line and what is wrong (which input, which index, got and
    expected) on the lines after, ending with generic advice, so neither the first nor the last line alone
    says what happened.
    """
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    return text if len(text) <= ORT_MESSAGE_LIMIT else text[:ORT_MESSAGE_LIMIT - 3] + "..."


# ---------------------------------------------------------------- metadata


def _input_layout(session: Any, path: str) -> tuple[Any, str, Any, list[Any]]:
    """The image input: (NodeArg, name, numpy dtype, shape); ModelError when it is not an image tensor."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"the model has {len(inputs)} inputs ({names}); an image model has exactly one", path)
    arg = inputs[0]
    shape = list(arg.shape or [])
    dtype = _DTYPES.get(arg.type)
    if dtype is None or len(shape) != 4:
        raise ModelError(
            f"input '{arg.name}' is {arg.type} of shape {shape}, not an image tensor",
            path, "an image model takes float32 (N, C, H, W), or uint8 (N, H, W, C) with embedded preprocessing",
        )
    return arg, arg.name, dtype, shape


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def read_info(session: Any, path: str | Path, overrides: Overrides | None = None) -> ModelInfo:
    """The model's ModelInfo from its vggspec metadata (or from `overrides` when it has none)."""
    path = str(path)
    overrides = overrides or Overrides()
    meta = dict(session.get_modelmeta().custom_metadata_map)
    _, name, dtype, shape = _input_layout(session, path)
    outputs = tuple(o.name for o in session.get_outputs())
    base = _from_metadata(meta, path) if has_metadata(meta) else _from_shape(shape, dtype, path, overrides)
    hw = (shape[1], shape[2]) if dtype == np.uint8 else (shape[2], shape[3])
    static_hw = (_static(hw[0]), _static(hw[1])) if base.fully_conv and _static(hw[0]) and _static(hw[1]) else None
    info = replace(base, input_name=name, input_dtype=dtype, batch=_static(shape[0]), outputs=outputs, metadata=meta,
                   static_hw=static_hw)
    info = _apply_overrides(info, overrides)
    _check_io(info, shape, session)
    return info


def _from_metadata(props: dict[str, str], path: str) -> ModelInfo:
    return ModelInfo.of(from_props(props, path, default_name=Path(path).stem), path, has_metadata=True)


def _from_shape(shape: list[Any], dtype: Any, path: str, ov: Overrides) -> ModelInfo:
    """A model exported elsewhere: the shape gives what it can, the command line the rest."""
    nhwc = dtype == np.uint8
    c, h, w = (shape[3], shape[1], shape[2]) if nhwc else (shape[1], shape[2], shape[3])
    size = ov.size or ((_static(h), _static(w)) if _static(h) and _static(w) else None)
    # A uint8 input normalises inside the graph: only the size is needed then.
    if size is None or (not nhwc and (ov.mean is None or ov.std is None)):
        raise ModelError(
            "the model carries no vggspec metadata, so its input size and normalisation are unknown", path,
            "give --size HxW, --mean and --std (and --scale when the mean is not in 0..1 units)",
        )
    channels = _static(c) or len(ov.mean or (0, 0, 0))
    mean, std = ov.mean or (0.0,), ov.std or (1.0,)
    return ModelInfo(
        path=path, name=Path(path).stem, classes=0, input_size=size, channels=channels,
        preprocessing=Preprocessing(ov.scale if ov.scale is not None else 1 / 255, mean, std),
        fully_conv=not (_static(h) and _static(w)), embedded_preprocessing=nhwc, has_metadata=False,
        probs_are_logits=True,
    )


def _apply_overrides(info: ModelInfo, ov: Overrides) -> ModelInfo:
    if ov.empty:
        return info
    prep = info.preprocessing
    prep = replace(prep, mean=ov.mean or prep.mean, std=ov.std or prep.std,
                   scale=ov.scale if ov.scale is not None else prep.scale)
    out = replace(
        info, preprocessing=prep, input_size=ov.size or info.input_size,
        labels=ov.labels if ov.labels is not None else info.labels,
        fully_conv=info.fully_conv if ov.fully_conv is None else ov.fully_conv,
    )
    return replace(out, overridden=_overridden(info, out)) if info.has_metadata else out


def _overridden(before: ModelInfo, after: ModelInfo) -> tuple[str, ...]:
    """The size and preprocessing values the overrides changed: a vggspec model's own are what it was
    trained with, so replacing them is worth telling (labels are only names, and --labels says so)."""
    pairs = {"size": (before.input_size, after.input_size)}
    pairs |= {k: (getattr(before.preprocessing, k), getattr(after.preprocessing, k)) for k in ("mean", "std", "scale")}
    return tuple(k for k, (a, b) in pairs.items() if a != b)


def _check_io(info: ModelInfo, shape: list[Any], session: Any) -> None:
    if info.input_dtype == np.uint8 and not info.embedded_preprocessing:
        raise ModelError(f"input '{info.input_name}' is uint8 but the metadata does not say "
                         "vggspec.embedded_preprocessing=true", info.path)
    channel_dim = shape[3] if info.embedded_preprocessing or info.preprocessing.layout == "NHWC" else shape[1]
    if _static(channel_dim) and channel_dim != info.channels:
        raise ModelError(f"input '{info.input_name}' has {channel_dim} channels, the metadata says {info.channels}",
                         info.path)
    if info.channels not in (1, 3):
        raise ModelError(f"input has {info.channels} channels; images have 1 or 3", info.path)
    for stat in (info.preprocessing.mean, info.preprocessing.std):
        if len(stat) not in (1, info.channels):
            raise ModelError(f"mean/std have {len(stat)} values for {info.channels} channels", info.path)
    _check_outputs(info, {o.name: o for o in session.get_outputs()})


class ModelOutputError(ModelError):
    """A model whose output contradicts its metadata or its fellow members (a width other than its classes):
    no image would fare better, so a batch run stops at once instead of failing image after image."""


_FLOAT_OUTPUTS = ("tensor(float)", "tensor(float16)", "tensor(double)")


def _check_outputs(info: ModelInfo, outputs: dict[str, Any]) -> None:
    """`probs` float (N, classes) and `scores` float (N, classes, h, w), as far as the graph's static shapes
    tell; a dynamic width is checked on the first run (Model.run). Otherwise class 962 of a 10-class model's
    1000 outputs would be printed, or int64 indices shown as probabilities."""
    expected = {info.probs_output: 2, **({"scores": 4} if "scores" in outputs else {})}
    for name, rank in expected.items():
        out = outputs[name]
        what = "(N, classes) posteriors" if rank == 2 else "(N, classes, h, w) class score maps"
        if out.type not in _FLOAT_OUTPUTS:
            raise ModelError(f"output '{name}' is {out.type}; expected float {what}", info.path,
                             "export the model with a soft-max (float) output")
        shape = list(out.shape) if out.shape is not None else None
        if shape is not None and len(shape) != rank:
            raise ModelError(f"output '{name}' has shape {shape}; expected {what}", info.path)
        width = _static(shape[1]) if shape is not None else None
        if width is not None and info.classes and width != info.classes:
            raise ModelError(f"output '{name}' has {width} classes, the metadata says {info.classes}", info.path,
                             "the metadata (vggspec.classes) must describe the graph; re-export the model")


def output_width(session: Any, name: str) -> int | None:
    """The static width (classes) of output `name`, or None when the graph leaves it dynamic."""
    out = {o.name: o for o in session.get_outputs()}.get(name)
    shape = list(out.shape) if out is not None and out.shape is not None else []
    return _static(shape[1]) if len(shape) > 1 else None


# ---------------------------------------------------------------- the model


# onnxruntime runs longer than this are stopped (RunOptions.terminate): a graph with an endless Loop would
# otherwise hold the run for ever. Generous: D's dense pass of a 64-megapixel image takes minutes on a CPU.
DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Limits:
    """What one image may cost: the memory of a dense pass (memory.activation_bytes), and seconds per
    onnxruntime run (None: no limit)."""

    memory: int = DEFAULT_MAX_MEMORY
    seconds: float | None = DEFAULT_TIMEOUT


class Model:
    """An onnxruntime session with its ModelInfo; runs prepared batches, binding IO on GPUs."""

    def __init__(self, path: str | Path, device: str = "auto", threads: int | None = None,
                 overrides: Overrides | None = None, io_binding: bool | None = None, shown: str | None = None,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._floats: float | None = None  # activation floats per input pixel, read from the graph when needed
        self.path = str(path)
        # What messages call the model: the path, unless it is a temporary file the user never named (a
        # checkpoint's forms exported for the run), which is then shown as what the user gave.
        self.shown = shown or self.path
        self.device = device
        self.session, self.provider = create_session(path, device, threads, shown=self.shown)
        self.info = read_info(self.session, self.shown, overrides)
        self.width = output_width(self.session, self.info.probs_output)  # None until a run shows it
        # On a GPU, bind IO to the device so runs are not dominated by host copies; on the CPU it buys nothing.
        self.io_binding = self.on_gpu if io_binding is None else io_binding

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    @property
    def ort_device(self) -> str:
        """The device name onnxruntime's OrtValue and IOBinding use for this session."""
        return "cuda" if self.on_gpu else "cpu"

    def check_memory(self, size: tuple[int, int], batch: int, path: str | None = None) -> None:
        """DataError (this image only) when a pass of `batch` images of `size` (width, height) would hold more
        than limits.memory: the network's activations at that size, not only its pixels, decide."""
        if self._floats is None:
            self._floats = floats_per_pixel(self.path)
        need = activation_bytes(self._floats, batch, size, self.info.channels, self.info.precision)
        if need > self.limits.memory:
            raise DataError(f"a dense pass at {size[1]}x{size[0]} needs about {shown_size(need)} for the network's "
                            f"activations, over the {shown_size(self.limits.memory)} limit (--max-memory "
                            f"raises it; a smaller --scales lowers the need)", path)

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Run a prepared input batch in chunks the model accepts; one array per requested output."""
        names = list(outputs or [self.info.probs_output])
        step = self.info.batch or len(batch)
        chunks = [self._run_fixed(batch[i:i + step], names) for i in range(0, len(batch), step)]
        results = [np.concatenate([c[k] for c in chunks]) for k in range(len(names))]
        self._check_widths(names, results)
        for name, out in zip(names, results, strict=True):
            if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                # A NaN posterior would count as an ordinary wrong answer: refuse it instead.
                raise ModelError(f"output '{name}' holds NaN or infinite values", self.shown,
                                 "the model's weights are not finite, or its preprocessing divides by zero")
        if self.info.probs_are_logits and names[0] == self.info.probs_output:
            results[0] = _as_posteriors(results[0])
        return results

    def _check_widths(self, names: list[str], results: list[np.ndarray]) -> None:
        """The first run shows a dynamic width: it must be the metadata's classes, and a score map's too."""
        width = {n: r.shape[1] if r.ndim > 1 else None for n, r in zip(names, results, strict=True)}
        got = width.get(self.info.probs_output, self.width)
        expected = self.info.classes or self.width or got
        for name, w in width.items():
            if w is not None and expected and w != expected:
                whose = "the metadata says" if self.info.classes else f"'{self.info.probs_output}' has"
                raise ModelOutputError(f"output '{name}' has {w} classes, {whose} {expected}", self.shown,
                                       "the metadata (vggspec.classes) must describe the graph; re-export the model")
        if self.width is None and got is not None:
            self.width = got

    def _run_fixed(self, chunk: np.ndarray, names: list[str]) -> list[np.ndarray]:
        n = len(chunk)
        out = self._run_chunk(_pad(chunk, self.info.batch), names)
        return [o[:n] for o in out]

    def _run_chunk(self, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=self.info.input_dtype)
        options = _ort().RunOptions()
        armed = watchdog.arm(options, self.limits.seconds) if self.limits.seconds else None
        try:
            if self.io_binding:
                return self._run_bound(x, names, options)
            return self.session.run(names, {self.info.input_name: x}, options)
        except Exception as exc:  # onnxruntime's own exception types
            if options.terminate:
                raise ModelError(f"stopped after {self.limits.seconds:g} s on an input of shape {list(x.shape)} "
                                 "(--timeout-per-image raises the limit)", self.shown) from None
            raise ModelError(f"onnxruntime failed on an input of shape {list(x.shape)}: {ort_message(exc)}",
                             self.shown) from None
        finally:
            if armed is not None:
                watchdog.disarm(armed)

    def _run_bound(self, x: np.ndarray, names: list[str], options: Any) -> list[np.ndarray]:
        """Inputs copied to the device once, outputs allocated there: no hidden copies inside run()."""
        ort = _ort()
        binding = self.session.io_binding()
        value = ort.OrtValue.ortvalue_from_numpy(x, self.ort_device, 0)
        binding.bind_ortvalue_input(self.info.input_name, value)
        for name in names:
            binding.bind_output(name, self.ort_device)
        self.session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()


def _pad(chunk: np.ndarray, batch: int | None) -> np.ndarray:
    """A model with a fixed batch dimension gets full batches: repeat the last item."""
    if batch is None or len(chunk) == batch:
        return chunk
    filler = np.repeat(chunk[-1:], batch - len(chunk), axis=0)
    return np.concatenate([chunk, filler])


def _as_posteriors(out: np.ndarray) -> np.ndarray:
    """Soft-max rows that are not already probability vectors (a foreign model ending in logits)."""
    out = out.astype(np.float64)
    if out.min() >= 0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    e = np.exp(out - out.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
