"""The paper's testing protocols (section 3.2) and ConvNet fusion (section 4.4) on onnxruntime.

An image is evaluated in *parts*: one posterior per (member, kind, Q), kind being `dense` (the whole
rescaled image through a fully convolutional model) or `crop` (the 5 x 5 crop grid and its mirror).
A protocol averages parts: dense and multi-crop over their scales, combined the two of them, and an
ensemble over its members. Several protocols asked at once (eval's Tables 3-5) share the parts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..contract import key
from ..errors import ModelError
from ..imaging import (
    MAX_SCALE,
    check_pixels,
    grid_crops,
    load_image,
    mirror,
    rescale,
    rescaled_size,
    scale_problem,
    to_array,
)
from ..labels import check_same_labels
from .preprocess import check_size, check_static_size, to_input
from .session import Model, ModelOutputError

PROTOCOLS = ("dense", "multi-crop", "combined")
GRID = 5  # 5 x 5 crops per scale, as in the paper


@dataclass(frozen=True)
class Protocol:
    """A testing protocol: dense, multi-crop or combined, over test scales Q (None: the image's own size)."""

    name: str
    scales: tuple[int | None, ...]
    flip: bool = True

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ModelError(f"unknown protocol '{self.name}'", hint=f"use one of {', '.join(PROTOCOLS)}")
        if not self.scales:
            raise ModelError("a protocol needs at least one test scale")

    @property
    def kinds(self) -> tuple[str, ...]:
        return {"dense": ("dense",), "multi-crop": ("crop",), "combined": ("dense", "crop")}[self.name]

    def parts(self) -> list[tuple[str, int | None]]:
        return [(kind, q) for kind in self.kinds for q in self.scales]

    @property
    def scales_text(self) -> str:
        return ",".join("native" if q is None else str(q) for q in self.scales)


@dataclass
class Member:
    """One network of an ensemble: its dense (fully convolutional) form and/or its standard form."""

    dense: Model | None = None
    crop: Model | None = None

    @classmethod
    def of(cls, *models: Model) -> Member:
        """Assign roles by the models' fully_conv flag; a fully conv model also serves for crops. Two
        models must be two forms of one network (check_same_network)."""
        dense = [m for m in models if m.info.fully_conv]
        standard = [m for m in models if not m.info.fully_conv]
        if len(models) == 2 and len(dense) == 2:
            member = cls(dense[0], dense[1])
        elif len(dense) > 1 or len(standard) > 1:
            names = ", ".join(m.shown for m in models)
            raise ModelError(f"give one dense and one standard model for a network, not {names}")
        else:
            member = cls(dense[0] if dense else None, standard[0] if standard else None)
        if member.dense is not None and member.crop is not None:
            check_same_network(member.dense, member.crop)
        return member

    def model(self, kind: str) -> Model:
        """The model for a kind of part; ModelError when this member has no suitable form."""
        if kind == "dense":
            if self.dense is None:
                path = self.crop.shown if self.crop else None
                # One message for the command line and the Python API: options first, since most meet it there.
                raise ModelError(
                    "dense evaluation (protocols dense and combined) needs the network's fully convolutional "
                    "form; this one is a standard model", path,
                    "give that form with --dense-model M_DENSE.onnx (made by `vggspec export --fully-conv`; in "
                    "Python: Member.of(standard, dense)), or use --protocol multi-crop",
                )
            return self.dense
        model = self.crop or self.dense
        assert model is not None
        return model

    @property
    def models(self) -> list[Model]:
        return [m for m in (self.dense, self.crop) if m is not None]


# What names one network in the metadata: two forms of it agree on all of these (precision, preprocessing
# embedding, flip and form may differ between its exports).
IDENTITY = ("name", "spec", "classes", "channels", "input_size", "labels")


def check_same_network(dense: Model, crop: Model) -> None:
    """ModelError naming both files when the dense and standard forms of a member are not one network, as
    far as their vggspec metadata tells (a model without it cannot be checked). Otherwise the protocols
    would average two networks' posteriors, or run one under the other's labels."""
    a, b = dense.info.metadata, crop.info.metadata
    if not (dense.info.has_metadata and crop.info.has_metadata):
        return
    for name in IDENTITY:
        x, y = a.get(key(name)), b.get(key(name))
        if x is not None and y is not None and _decoded(x) != _decoded(y):
            shown = "" if name == "spec" else f" ({_short(y)} here, {_short(x)} there)"
            raise ModelError(
                f"is not the same network as {dense.shown}: vggspec.{name} differs{shown}", crop.shown,
                "the dense and standard forms of one network are exported from the same spec and weights "
                "(`vggspec export` with and without --fully-conv)",
            )


def _decoded(value: str) -> Any:
    """A metadata value as JSON when it is JSON (`[32, 32]` and `[32,32]` are one size), else its words
    (a spec re-indented between two exports is still the same network)."""
    try:
        return json.loads(value)
    except ValueError:
        return value.split()


def _short(value: str) -> str:
    return value if len(value) <= 60 else value[:57] + "..."


@dataclass
class _Pixels:
    """One image decoded once per channel count and rescaled once per Q, shared by every part."""

    path: str
    decoded: dict[int, Any] = field(default_factory=dict)
    scaled: dict[tuple[int, int | None], np.ndarray] = field(default_factory=dict)

    def size_at(self, channels: int, q: int | None) -> tuple[int, int]:
        """(width, height) at Q, without rescaling: what a model's memory check needs first. The pixel
        limit is checked here, before the memory check, as it is the one no option raises."""
        if channels not in self.decoded:
            self.decoded[channels] = load_image(self.path, channels)
        check_pixels(self.decoded[channels].size, q, self.path)
        return rescaled_size(self.decoded[channels].size, q)

    def at(self, channels: int, q: int | None) -> np.ndarray:
        if (channels, q) not in self.scaled:
            if channels not in self.decoded:
                self.decoded[channels] = load_image(self.path, channels)
            self.scaled[(channels, q)] = to_array(rescale(self.decoded[channels], q, self.path))
        return self.scaled[(channels, q)]


def dense_posterior(model: Model, pixels: np.ndarray, flip: bool, path: str | None = None,
                    q: int | None = None, source: tuple[int, int] | None = None) -> np.ndarray:
    """One pass of the whole image (and its mirror when `flip` and the graph does not flip itself).
    `source`: the image's (width, height) before rescaling, for saying which Q fits a static-shape model."""
    check_size(pixels, model.info.input_size, path, q)
    check_static_size(pixels, model.info.static_hw, path, q, source)
    batch = pixels[None]
    if flip and not model.info.flip:
        batch = np.concatenate([batch, mirror(batch)])
    probs = model.run(to_input(batch, model.info))[0]
    return probs.astype(np.float64).mean(axis=0)


def crop_posterior(model: Model, pixels: np.ndarray, flip: bool, batch_size: int = 10,
                   path: str | None = None, q: int | None = None) -> np.ndarray:
    """The 5 x 5 crop grid (with mirrors: 50 crops), run in batches, posteriors averaged."""
    check_size(pixels, model.info.input_size, path, q)
    # A graph that flips itself already averages each crop with its mirror.
    crops = grid_crops(pixels, model.info.input_size, GRID, flip=flip and not model.info.flip)
    total = np.zeros(0)
    for start in range(0, len(crops), batch_size):
        probs = model.run(to_input(crops[start:start + batch_size], model.info))[0].astype(np.float64)
        total = probs.sum(axis=0) if total.size == 0 else total + probs.sum(axis=0)
    return total / len(crops)


class Runner:
    """Evaluates images under one or more protocols with one or more ensemble members."""

    def __init__(self, members: Sequence[Member], protocols: Sequence[Protocol], batch_size: int = 10) -> None:
        if not members:
            raise ModelError("no model given")
        self.members = list(members)
        self.protocols = list(protocols)
        self.batch_size = batch_size
        self.parts = sorted({p for proto in self.protocols for p in proto.parts()}, key=str)
        self._validate()

    def _validate(self) -> None:
        classes = {m.info.classes or m.width for member in self.members for m in member.models} - {0, None}
        if len(classes) > 1:
            raise ModelError(f"the models disagree on the number of classes ({sorted(classes)})")
        check_same_labels([(m.shown, m.info.labels) for member in self.members for m in member.models])
        _check_scales(q for _, q in self.parts)
        for member in self.members:
            for kind, q in self.parts:
                model = member.model(kind)
                if q is not None and q < min(model.info.input_size):
                    h, w = model.info.input_size
                    raise ModelError(f"test scale Q={q} is smaller than the model's input {h}x{w}", model.shown,
                                     f"use --scales of at least {min(h, w)}")

    @property
    def lead(self) -> Model:
        return self.members[0].models[0]

    @property
    def provider(self) -> str:
        providers = {m.provider for member in self.members for m in member.models}
        return ",".join(sorted(providers))

    def image_parts(self, path: str | Path, flip: bool) -> dict[tuple[int, str, int | None], np.ndarray]:
        """Every (member, kind, Q) posterior the protocols need, for one image file."""
        pixels = _Pixels(str(path))
        out = {}
        for i, member in enumerate(self.members):
            for kind, q in self.parts:
                model = member.model(kind)
                if kind == "dense":  # the whole image through the network: its activations must fit
                    size = pixels.size_at(model.info.channels, q)
                    model.check_memory(size, 2 if flip or model.info.flip else 1, str(path))
                px = pixels.at(model.info.channels, q)
                if kind == "dense":
                    source = pixels.decoded[model.info.channels].size
                    out[(i, kind, q)] = dense_posterior(model, px, flip, str(path), q, source)
                else:
                    out[(i, kind, q)] = crop_posterior(model, px, flip, self.batch_size, str(path), q)
        return out

    def combine(self, parts: dict[tuple[int, str, int | None], np.ndarray], protocol: Protocol) -> np.ndarray:
        """Average over scales per kind, over kinds (combined), then over ensemble members."""
        per_member = []
        for i in range(len(self.members)):
            per_kind = [np.mean([parts[(i, kind, q)] for q in protocol.scales], axis=0) for kind in protocol.kinds]
            per_member.append(np.mean(per_kind, axis=0))
        widths = {len(p) for p in per_member}
        if len(widths) > 1:  # models without metadata, whose widths only a run shows
            raise ModelOutputError(f"the members disagree on the number of classes ({sorted(widths)})",
                                   hint="an ensemble averages posteriors over the same classes")
        return np.mean(per_member, axis=0)

    def run(self, path: str | Path) -> dict[Protocol, np.ndarray]:
        """Posteriors of one image under every protocol. DataError when the file cannot be used (unreadable,
        or over imaging.MAX_PIXELS at a test scale); ModelError or MemoryError when running it fails."""
        flips = {p.flip for p in self.protocols}
        results: dict[Protocol, np.ndarray] = {}
        for flip in flips:  # protocols normally share one flip setting, hence one set of parts
            parts = self.image_parts(path, flip)
            for proto in (p for p in self.protocols if p.flip == flip):
                results[proto] = self.combine(parts, proto)
        return results


def _check_scales(scales: Iterable[int | None]) -> None:
    """A test scale whose Q x Q square is over imaging.MAX_PIXELS would fail every image one by one: say it
    once, before the loop."""
    for q in scales:
        if q is not None and scale_problem(q):
            raise ModelError(f"test scale Q={q} {scale_problem(q)}", hint=f"use --scales of at most {MAX_SCALE}")


def top_k(posterior: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most probable classes, highest first (stable for ties)."""
    order = np.argsort(-posterior, kind="stable")[:k]
    return [(int(i), float(posterior[i])) for i in order]


def default_scales(models: Iterable[Model]) -> tuple[int, ...]:
    """Without --scales: the models' own test scales (vggspec.test_scales) when every model has them and they
    agree, raised to the largest input side among them; otherwise, and whenever a model takes one static size,
    Q = the smallest side of the largest input size among the models (a static model's fixed size, which is
    the only one it takes)."""
    models = list(models)
    return _own_scales(models) or (max(min(m.info.static_hw or m.info.input_size) for m in models),)


def default_flip(models: Iterable[Model]) -> bool:
    """Without --flip/--no-flip: the models' own test flip (vggspec.test_flip) when those that state one
    agree; True (the paper's dense evaluation, and every model before the key existed) otherwise."""
    stated = {m.info.test_flip for m in models if m.info.test_flip is not None}
    return stated.pop() if len(stated) == 1 else True


def _own_scales(models: list[Model]) -> tuple[int, ...]:
    """The test scales every model states, when they agree and no model is static; () otherwise."""
    own = {m.info.test_scales for m in models}
    if len(own) != 1 or () in own or any(m.info.static_hw for m in models):
        return ()
    smallest = max(min(m.info.input_size) for m in models)
    return tuple(sorted({max(q, smallest) for q in own.pop()}))


def defaults_note(models: Iterable[Model], scales_given: bool, flip_given: bool,
                  used: Iterable[Model] | None = None) -> str | None:
    """Which test scales and flip a run took from its models, and why, for models that state their own
    (vggspec.test_scales, vggspec.test_flip); None when the options gave both, or no model states any.
    `used`: the models that run (a dense member's standard form does not for the dense protocol), named.
    E.g. `d_dense.onnx: testing at the model's own Q=73,110,146 without flip (trained with scale jitter
    73:146, no flip)`."""
    from ..contract import training_text

    models = list(models)
    stating = [m for m in models if m.info.test_scales or m.info.test_flip is not None]
    if not stating or (scales_given and flip_given):
        return None
    named = [m for m in (used or models) if m in stating] or stating
    names = list(dict.fromkeys(m.shown for m in named))
    parts = []
    if not scales_given:
        q = ",".join(map(str, default_scales(models)))
        if _own_scales(models):
            whose = "the model's" if len(names) == 1 else "the models'"
            parts.append(f"at {whose} own Q={q}")
        else:
            why = ("a static-shape model takes one size" if any(m.info.static_hw for m in models)
                   else "the models do not state one set of test scales")
            parts.append(f"at Q={q} ({why}; --scales chooses)")
    if not flip_given:
        parts.append("with flip" if default_flip(models) else "without flip")
    trained = next((dict(m.info.training) for m in stating if m.info.training), None)
    why = f" (trained with {training_text(trained)})" if trained else ""
    return f"{', '.join(names)}: testing {' '.join(parts)}{why}"
