"""Inference on onnxruntime: sessions, preprocessing, the paper's testing protocols, fusion.

Needs only onnxruntime, numpy and Pillow (matplotlib for heatmaps, onnx for fusion), never torch,
so an edge box with `vggspec[cpu]` or `vggspec[gpu]` runs models exported elsewhere.

    from vggspec.runtime import load, predict
    model = load("vgg16_dense.onnx", device="auto")
    for index, label, prob in predict(model, "cat.jpg", scales=(256, 384, 512)):
        print(label, prob)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..imaging import crop_positions, grid_crops, load_image, normalise, rescale
from .evaluate import Report, evaluate, list_dataset
from .fuse import build_fused, fuse
from .heatmap import heatmap
from .preprocess import preprocess
from .protocols import PROTOCOLS, Member, Protocol, Runner, default_flip, default_scales, top_k
from .session import DEVICES, Model, ModelInfo, Overrides, Preprocessing, create_session, read_info


def load(path: str | Path, device: str = "auto", threads: int | None = None, **overrides: object) -> Model:
    """An onnxruntime-backed Model; `overrides` (size, mean, std, scale) for models without vggspec metadata."""
    return Model(path, device=device, threads=threads, overrides=Overrides(**overrides) if overrides else None)


def predict(models: Model | Sequence[Model], image: str | Path, protocol: str | None = None,
            scales: Sequence[int | None] | None = None, flip: bool | None = None,
            top: int = 5) -> list[tuple[int, str, float]]:
    """Top classes of one image: [(index, label, posterior)]. Several models form one network (dense +
    standard, for `combined`); the default protocol is dense for a fully convolutional model, else multi-crop;
    the default scales and flip are the models' own (default_scales, default_flip)."""
    models = [models] if isinstance(models, Model) else list(models)
    member = Member.of(*models)
    name = protocol or ("dense" if member.dense is not None else "multi-crop")
    flip = default_flip(models) if flip is None else flip
    proto = Protocol(name, tuple(scales) if scales else default_scales(models), flip)
    posterior = Runner([member], [proto]).run(image)[proto]
    return [(i, models[0].info.label(i), p) for i, p in top_k(posterior, top)]


__all__ = [
    "DEVICES", "PROTOCOLS", "Member", "Model", "ModelInfo", "Overrides", "Preprocessing", "Protocol", "Report",
    "Runner", "build_fused", "create_session", "crop_positions", "default_flip", "default_scales", "evaluate", "fuse",
    "grid_crops", "heatmap", "list_dataset", "load", "load_image", "normalise", "predict", "preprocess",
    "read_info", "rescale", "top_k",
]
