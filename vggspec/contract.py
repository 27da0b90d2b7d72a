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
    kind: str  # text | int | size | preprocessing | names | flag | precision | json | scales | option
    doc: str


KEYS: dict[str, Key] = {
    "version": Key("text", "the vggspec version that exported the model"),
    "name": Key("text", "the spec's name"),
    "spec": Key("text", "the compiled spec: the spec file's text with the `--set` options applied to its header "
                        "(each changed line ends in a `# --set` comment; a `labels:` line is commented out, since "
                        "the labels travel in `labels`), so that compiling it gives exactly this network; absent "
                        "from fused models: no one spec describes an ensemble"),
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
    "test_scales": Key("scales", "JSON list of positive integers: the default test scales Q, as the network was "
                                 "trained (scale jitter S in [Smin, Smax]: the paper's `[Smin, round(0.5 (Smin + "
                                 "Smax)), Smax]`, half up; a fixed S: `[S]`) or as given to `export --test-scales`; "
                                 "absent: Q = `input_size`'s shorter side"),
    "test_flip": Key("option", "`true` when the mirror image is averaged in at test time by default (training "
                               "flipped its images), `false` when not; absent: `true`"),
    "training": Key("json", 'JSON `{"scale": [Smin, Smax], "flip": bool}`: how the weights were trained (Smin = '
                            "Smax for a fixed S); absent when unknown"),
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
    test_scales: tuple[int, ...] = ()  # () : Q = the input side, as before the key existed
    test_flip: bool | None = None  # None: flip, as before the key existed
    training: tuple[tuple[str, Any], ...] = ()  # (("scale", (Smin, Smax)), ("flip", bool)) when known


# Keys written only when they hold something: empty text and lists, and unknown options, are left out.
OPTIONAL = ("spec", "version", "labels", "members", "member_specs", "test_scales", "test_flip", "training")


def paper_test_scales(smin: int, smax: int) -> tuple[int, ...]:
    """The paper's test scales for a net trained at S in [Smin, Smax] (section 4.2): {Smin, 0.5 (Smin + Smax),
    Smax}, the middle rounded half up; a fixed S (Smin = Smax) is tested at Q = S."""
    if smin == smax:
        return (smin,)
    return tuple(sorted({smin, (smin + smax + 1) // 2, smax}))


def training_text(training: Mapping[str, Any]) -> str:
    """`scale jitter 73:146, no flip` or `fixed scale 73, flip`: a model's training record in words."""
    smin, smax = training["scale"]
    scale = f"fixed scale {smin}" if smin == smax else f"scale jitter {smin}:{smax}"
    return f"{scale}, {'flip' if training['flip'] else 'no flip'}"


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
        if value in ("", (), None) and f.name in OPTIONAL:
            continue
        props[key(f.name)] = _encode(KEYS[f.name].kind, value)
    return props


def _encode(kind: str, value: Any) -> str:
    if kind == "flag":
        return "true" if value else "false"
    if kind == "option":
        return "true" if value else "false"
    if kind in ("size", "names", "scales"):
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
        test_scales=read.scales("test_scales"), test_flip=read.option("test_flip"), training=read.training(),
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

    def option(self, name: str) -> bool | None:
        """A flag that may be absent: None then."""
        return self.flag(name) if key(name) in self.props else None

    def scales(self, name: str) -> tuple[int, ...]:
        if key(name) not in self.props:
            return ()
        value = self._json(name)
        if not (isinstance(value, list) and value and len(value) <= 16
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in value)):
            self.fail(name, "is not a JSON list of 1 to 16 positive integers")
        return tuple(value)

    def training(self) -> tuple[tuple[str, Any], ...]:
        if key("training") not in self.props:
            return ()
        value = self._json("training")
        scale = value.get("scale") if isinstance(value, dict) else None
        if not (isinstance(scale, list) and len(scale) == 2 and isinstance(value.get("flip"), bool)
                and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 16 for v in scale)
                and scale[0] <= scale[1]):
            self.fail("training", 'is not {"scale": [Smin, Smax], "flip": true or false}')
        return (("scale", tuple(scale)), ("flip", value["flip"]))

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


VALUES = """\
## Values

Every value is a string (ONNX `metadata_props` hold nothing else), decoded by its kind above:

| kind | how to read it | example |
| --- | --- | --- |
| text | as it is | `vgg_d` |
| int | a decimal integer, no sign | `10` |
| flag | `true` or `false` | `true` |
| option | `true` or `false`; absent means the default the key states | `false` |
| size | JSON `[H, W]` of integers | `[64, 64]` |
| scales | JSON list of positive integers, ascending | `[73, 110, 146]` |
| names | JSON list of strings | `["0", "1"]` |
| preprocessing | JSON object: `scale` a number, `mean` and `std` lists of numbers (one per channel) | see below |
| json | a JSON object | |
| precision | one of the names listed | `fp32` |

`preprocessing` reads like `{"scale": 0.00392156862745098, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224,
0.225], "channel_order": "RGB", "layout": "NCHW"}`: `scale` is a JSON number, never a string.

Keys a model lacks take their defaults: `labels` none (classes are numbered), flags `false`, `test_scales` the
input side, `test_flip` true. A model with no `vggspec.input_size` or `vggspec.preprocessing` was not written by
vggspec.

## Inputs and outputs

| name | when | dtype | shape |
| --- | --- | --- | --- |
| `input` | unless `embedded_preprocessing` | float32 | (N, C, H, W): normalised pixels in `channel_order` |
| `image` | `embedded_preprocessing` (in place of `input`) | uint8 | (N, H, W, C): RGB pixels 0..255 |
| `probs` | always, first output | float32 | (N, classes): soft-max posteriors, each row summing to 1 |
| `scores` | `scores` | float32 | (N, classes, h, w): the class score map, before the soft-max |

C is `channels`. H x W is `input_size` for a standard model (its `scores` are then 1 x 1); a dense model
(`fully_conv`) takes any H x W of at least `input_size`, and its `scores` map gains a cell down or across
for each stride of the network (32 pixels for the paper's five poolings) beyond `input_size`: 1 x 1 at
`input_size`. N is free unless the model was exported with a static shape; with `flip` the graph's own
mirror pass does not change it. `probs` is the first output; read the outputs by name.

## Test scales and flip

A client tests an image at each Q in `test_scales` (absent: Q = `input_size`'s shorter side) and averages
the posteriors over them; with `test_flip` (absent: true) it also averages in the mirror image (dense) or
each crop's mirror (multi-crop), unless the graph does it itself (`flip`). These are how the network was
trained: a net trained with scale jitter S in [Smin, Smax] is tested at the paper's {Smin, 0.5 (Smin + Smax),
Smax} (section 4.2), a net trained at one S at Q = S; a net trained without flips is tested without. The
key `training` says how it was trained. `vggspec predict` and `eval` do this unless `--scales` or
`--flip/--no-flip` say otherwise, and say on stderr which they used.

## The score map

`scores[n, c]` is class c's score (fc8's output, before the soft-max) at each position of the image, for
the image as given (never the mirror). Cell (i, j) sees the image window the network's receptive field
covers at that position; the cells tile the image evenly, so stretching the h x w map over the rescaled
image (bilinear) shows where class c is found. `probs[n]` is `softmax(scores[n].mean(axis=(1, 2)))`
(averaged with the mirror image's when `flip`). The map is comparable across cells of one class, not across
classes or images; a heat map of the top class scales it to 0..1 over its own minimum and maximum.

"""

CLIENT_STEPS = """\
## Running a vggspec model without vggspec

What `vggspec predict` does, step by step, with every choice that changes the numbers. A client that
follows it agrees with vggspec to float rounding (tests/test_contract.py runs a 30-line numpy + Pillow
client against `vggspec predict`, at a model's own test scales and flip).

1. **Decode** the file with its EXIF orientation applied; convert to RGB (or L when `channels` is 1):
   palette and alpha images through their colours, 16-bit images scaled to 8 bits (`resize.mode`).
2. **Rescale** so that the shorter side is Q: the other side is `round(side * Q / shorter)` with round
   half to even, at least 1; Pillow's bilinear filter (`Image.resize(size, Image.BILINEAR)`), which
   averages over the source pixels when shrinking (OpenCV's `INTER_LINEAR` does not: use `INTER_AREA`
   when shrinking or expect differences of about 1e-2 in probability). Q is each of the test scales:
   `test_scales`, else `input_size`'s shorter side.
3. **Normalise**: `x = (pixel * scale - mean) / std` per channel, pixels 0..255 in `channel_order`, as
   `preprocessing` says; lay the batch out as `layout` (NCHW unless stated) and feed it to `input` as
   float32. A model with `embedded_preprocessing` takes the uint8 (N, H, W, C) RGB pixels as `image`
   instead and does this itself.
4. **Run** (flip: `test_flip`, true when absent):
   - a dense model (`fully_conv`) takes the whole rescaled image; its `probs` are the soft-max of the
     spatially averaged class scores. With flip and without the graph's own `flip`, also run the mirror
     image (the width axis reversed) and average the two posteriors.
   - a standard model takes `input_size` crops: the 5 x 5 grid at offsets
     `round(linspace(0, side - crop, 5))` along each axis (half to even), and with flip each crop's mirror
     too (50 per scale; 25 without), posteriors averaged (`crops`). Training validation uses one centre
     crop, top = (H - h) // 2, left = (W - w) // 2.
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
    return "\n".join(head) + "\n" + VALUES + CLIENT_STEPS


if __name__ == "__main__":
    print(contract_page(), end="")
