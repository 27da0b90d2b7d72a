"""The ONNX metadata contract: what an exported model says about itself, in one place.

The exporter writes these `metadata_props`, the runtime reads them (so `predict` needs no flags), and
fusion compares and merges them. Every key, its type and its meaning live in `KEYS`; `to_props` and
`from_props` convert between `Metadata` and the model's string properties, validating every value where
it is read. docs/DEVELOPING.md's contract is `contract_lines()`, checked by a test.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from .errors import ModelError
from .preprocessing import Preprocessing

PREFIX = "vggspec."
# Protobuf refuses a message over 2 GB: a bigger model keeps its weights in external data, and fusion stops.
PROTOBUF_LIMIT = 2_000_000_000
EXTERNAL_DATA_BYTES = PROTOBUF_LIMIT - 64 * 2**20  # the graph itself needs some of the 2 GB
PRECISIONS = ("fp32", "fp16", "int8", "mixed")
CONTRACT_VERSION = 1  # raised when a key changes meaning; readers refuse versions above theirs
# How a client turns a decoded image into the network's input, as vggspec.imaging does it; carried in
# every model so that a client in another language needs nothing but the file.
RESIZE = {"filter": "bilinear", "library": "Pillow Image.resize (filters over the source when shrinking)",
          "size": "the shorter side becomes Q; the other is round(side * Q / shorter), half to even, at least 1",
          "exif": "apply the EXIF orientation first (Pillow ImageOps.exif_transpose)",
          "mode": "RGB (or L for 1 channel); 16-bit images scaled to 8 bits; alpha dropped"}
CROPS = {"grid": 5, "positions": "round(linspace(0, side - crop, 5)) along each axis, half to even",
         "mirror": "with flip, each crop and its horizontal mirror: 50 crops per scale",
         "average": "posteriors averaged over crops, then over scales",
         "centre": "training validation: top = (H - h) // 2, left = (W - w) // 2"}


@dataclass(frozen=True)
class Key:
    kind: str  # text | int | size | preprocessing | names | flag | precision
    doc: str


KEYS: dict[str, Key] = {
    "version": Key("text", "the vggspec version that exported the model"),
    "name": Key("text", "the spec's name"),
    "spec": Key("text", "the spec text (absent from fused models: no one spec describes an ensemble)"),
    "classes": Key("int", "the number of classes"),
    "input_size": Key("size", "JSON `[H, W]`, the spec's input (crop size; minimum size of a dense model)"),
    "channels": Key("int", "`3`, or `1` for grayscale specs"),
    "preprocessing": Key("preprocessing", 'JSON `{"scale", "mean", "std", "channel_order", "layout"}`: '
                                          "input = (pixel * scale - mean) / std"),
    "labels": Key("names", "JSON list of strings, one per class (absent when unknown)"),
    "fully_conv": Key("flag", "`true` for the dense-evaluation form (any H x W at least input_size)"),
    "flip": Key("flag", "`true` when the graph averages the image and its mirror itself"),
    "embedded_preprocessing": Key("flag", "`true` when the input is uint8 (N, H, W, C) pixels, normalised in-graph"),
    "scores": Key("flag", "`true` when a second output `scores` holds the class score map (N, classes, h, w)"),
    "precision": Key("precision", f"one of {', '.join(PRECISIONS)}"),
    "members": Key("names", "JSON list of the member names (fused models only)"),
    "member_specs": Key("names", "JSON list of the members' spec texts, in member order (fused models only)"),
    "contract": Key("int", f"the version of this contract the model was written for (now {CONTRACT_VERSION})"),
    "resize": Key("json", "JSON object: how images are rescaled to a test scale Q (filter, rounding, EXIF)"),
    "crops": Key("json", "JSON object: the multi-crop protocol a standard model is evaluated with"),
}
REQUIRED = ("input_size", "preprocessing")  # without these a model carries no vggspec metadata at all


@dataclass(frozen=True)
class Metadata:
    """What a vggspec model says about itself; `to_props` / `from_props` are its string form."""

    name: str
    classes: int
    input_size: tuple[int, int]
    channels: int
    preprocessing: Preprocessing
    labels: tuple[str, ...] = ()
    fully_conv: bool = False
    flip: bool = False
    embedded_preprocessing: bool = False
    scores: bool = False
    precision: str = "fp32"
    spec: str = ""
    version: str = ""
    members: tuple[str, ...] = ()
    member_specs: tuple[str, ...] = ()
    contract: int = CONTRACT_VERSION
    resize: tuple[tuple[str, Any], ...] = tuple(RESIZE.items())
    crops: tuple[tuple[str, Any], ...] = tuple(CROPS.items())


def key(name: str) -> str:
    """The property name of a contract key: `vggspec.<name>`."""
    if name not in KEYS:
        raise KeyError(name)
    return PREFIX + name


def to_props(meta: Metadata) -> dict[str, str]:
    """The model's metadata_props; empty text and lists are left out rather than written empty."""
    props: dict[str, str] = {}
    for f in fields(Metadata):
        value = getattr(meta, f.name)
        if value in ("", ()) and f.name in ("spec", "version", "labels", "members", "member_specs"):
            continue
        props[key(f.name)] = _encode(KEYS[f.name].kind, value)
    return props


def _encode(kind: str, value: Any) -> str:
    if kind == "flag":
        return "true" if value else "false"
    if kind in ("size", "names"):
        return json.dumps(list(value))
    if kind == "json":
        return json.dumps(dict(value))
    if kind == "preprocessing":
        return json.dumps(value.to_dict())
    return str(value)


def has_metadata(props: Mapping[str, str]) -> bool:
    return all(key(k) in props for k in REQUIRED)


def from_props(props: Mapping[str, str], path: str, default_name: str = "model") -> Metadata:
    """Metadata from a model's properties, each value checked; a ModelError names the file, the key and the fault."""
    missing = [key(k) for k in REQUIRED if key(k) not in props]
    if missing:
        raise ModelError(f"metadata {missing[0]} is missing", path, _HINT)
    read = _Reader(props, path)
    channels = read.positive_int("channels", 3)
    meta = Metadata(
        name=props.get(key("name"), default_name), classes=read.positive_int("classes", 0, allow_zero=True),
        input_size=read.size(), channels=channels, preprocessing=read.preprocessing(channels),
        labels=read.names("labels"), fully_conv=read.flag("fully_conv"), flip=read.flag("flip"),
        embedded_preprocessing=read.flag("embedded_preprocessing"), scores=read.flag("scores"),
        precision=read.precision(), spec=props.get(key("spec"), ""), version=props.get(key("version"), ""),
        members=read.names("members"), member_specs=read.names("member_specs"), contract=read.contract(),
        resize=read.agreed("resize", RESIZE), crops=read.agreed("crops", CROPS),
    )
    if meta.labels and meta.classes and len(meta.labels) != meta.classes:
        read.fail("labels", f"has {len(meta.labels)} labels for {meta.classes} classes")
    return meta


_HINT = "export the model again with `vggspec export`, or pass --size, --mean and --std for a foreign model"


class _Reader:
    """Reads one typed value per key; every fault is a ModelError naming the file and the key."""

    def __init__(self, props: Mapping[str, str], path: str) -> None:
        self.props, self.path = props, path

    def fail(self, name: str, what: str) -> None:
        value = self.props.get(key(name), "")
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ModelError(f"metadata {key(name)} = {shown!r} {what}", self.path, _HINT)

    def _json(self, name: str) -> Any:
        try:
            return json.loads(self.props[key(name)])
        except ValueError:
            self.fail(name, "is not valid JSON")

    def positive_int(self, name: str, default: int, allow_zero: bool = False) -> int:
        text = self.props.get(key(name))
        if text is None:
            return default
        digits = text.strip()
        if not (digits.isascii() and digits.isdecimal()) or len(digits) > 9 or (int(digits) == 0 and not allow_zero):
            self.fail(name, "is not a positive integer")
        return int(digits)

    def size(self) -> tuple[int, int]:
        value = self._json("input_size")
        if not (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in value)):
            self.fail("input_size", "is not [H, W] with two positive integers")
        return value[0], value[1]

    def contract(self) -> int:
        version = self.positive_int("contract", 1)  # models before the key existed wrote version 1
        if version > CONTRACT_VERSION:
            self.fail("contract", f"is newer than this vggspec reads (up to {CONTRACT_VERSION}): upgrade vggspec")
        return version

    def agreed(self, name: str, expected: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        """A procedure the model states: it must be the one this runtime carries out."""
        if key(name) not in self.props:
            return tuple(expected.items())
        value = self._json(name)
        if not isinstance(value, dict) or any(value.get(k) != v for k, v in expected.items()
                                              if k in ("filter", "grid")):
            self.fail(name, "asks for a procedure this vggspec does not carry out")
        return tuple(value.items())

    def flag(self, name: str) -> bool:
        text = self.props.get(key(name), "false").strip().lower()
        if text not in ("true", "false"):
            self.fail(name, "is not true or false")
        return text == "true"

    def names(self, name: str) -> tuple[str, ...]:
        if key(name) not in self.props:
            return ()
        value = self._json(name)
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            self.fail(name, "is not a JSON list of names")
        return tuple(map(str, value))

    def precision(self) -> str:
        text = self.props.get(key("precision"), "fp32")
        if text not in PRECISIONS:
            self.fail("precision", f"is not one of {', '.join(PRECISIONS)}")
        return text

    def preprocessing(self, channels: int) -> Preprocessing:
        value = self._json("preprocessing")
        if not isinstance(value, dict):
            self.fail("preprocessing", "is not a JSON object")
        try:
            prep = Preprocessing.from_dict(value)
        except (KeyError, TypeError, ValueError) as exc:
            self.fail("preprocessing", f"lacks or mangles a field ({type(exc).__name__}: {exc})")
        if prep.problem(channels):
            self.fail("preprocessing", prep.problem(channels))
        return prep


def contract_lines() -> list[str]:
    """The contract as docs/DEVELOPING.md prints it: one bullet per key."""
    return [f"- `{PREFIX}{name}` ({k.kind}): {k.doc}" for name, k in KEYS.items()]


CLIENT_STEPS = """\
## Running a vggspec model without vggspec

What `vggspec predict` does, step by step, with every choice that changes the numbers. A client that
follows it agrees with vggspec to float rounding (tests/test_contract.py runs a 30-line numpy + Pillow
client against `vggspec predict`).

1. **Decode** the file with its EXIF orientation applied; convert to RGB (or L when `channels` is 1):
   palette and alpha images through their colours, 16-bit images scaled to 8 bits (`resize.mode`).
2. **Rescale** so that the shorter side is Q: the other side is `round(side * Q / shorter)` with round
   half to even, at least 1; Pillow's bilinear filter (`Image.resize(size, Image.BILINEAR)`), which
   averages over the source pixels when shrinking (OpenCV's `INTER_LINEAR` does not: use `INTER_AREA`
   when shrinking or expect differences of about 1e-2 in probability). Q is a test scale; a standard
   model's Q defaults to `input_size`'s shorter side.
3. **Normalise**: `x = (pixel * scale - mean) / std` per channel, pixels 0..255 in `channel_order`, as
   `preprocessing` says; lay the batch out as `layout` (NCHW unless stated). A model with
   `embedded_preprocessing` takes the uint8 (N, H, W, C) RGB pixels instead and does this itself.
4. **Run**:
   - a dense model (`fully_conv`) takes the whole rescaled image; its `probs` are the soft-max of the
     spatially averaged class scores. With `flip` the graph also runs the mirror image and averages;
     without it, run the mirror yourself (flip the width axis) and average the two posteriors.
   - a standard model takes `input_size` crops: the 5 x 5 grid at offsets
     `round(linspace(0, side - crop, 5))` along each axis (half to even), each crop and its mirror
     (50 per scale), posteriors averaged (`crops`). Training validation uses one centre crop,
     top = (H - h) // 2, left = (W - w) // 2.
5. **Average** the posteriors over the test scales Q, then over the forms (combined: dense and
   multi-crop), then over ensemble members. A fused model (`members`) has done the last step in-graph.

A model whose `contract` is above the reader's version must be refused: a key may have changed meaning.
"""


def contract_page() -> str:
    """docs/CONTRACT.md: every key of this contract version and the client's procedure."""
    head = [f"# The vggspec ONNX contract, version {CONTRACT_VERSION}", "",
            "Every model vggspec exports carries these `metadata_props` (strings; JSON where stated), written by",
            "`vggspec export` and read by `vggspec predict`/`eval`. This page is generated from",
            "`vggspec/contract.py` (`python -m vggspec.contract > docs/CONTRACT.md`); a test keeps them equal.", "",
            "## Keys", "", *contract_lines(), "",
            "`resize` and `crops` as written today:", "",
            f"- `resize`: `{json.dumps(RESIZE)}`", f"- `crops`: `{json.dumps(CROPS)}`", ""]
    return "\n".join(head) + "\n" + CLIENT_STEPS


if __name__ == "__main__":
    print(contract_page(), end="")
