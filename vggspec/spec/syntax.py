"""The syntax tree of a spec: what the text says, with where it says it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass(frozen=True)
class HeaderEntry:
    key: str
    value: str
    key_span: Span
    value_span: Span
    origin: str  # the path the entry was read from, or "<--set>" for an override


@dataclass(frozen=True)
class LayerToken:
    """One layer token as written, e.g. `conv3-512*3`, before repetition is expanded."""

    kind: str  # conv | maxpool | lrn | fc | softmax
    text: str
    span: Span
    kernel: int = 0
    channels: int = 0  # output channels of conv, outputs of FC
    repeat: int = 1


@dataclass(frozen=True)
class Header:
    """The typed, validated header of a spec, defaults filled in."""

    name: str
    input: tuple[int, int, int]  # height, width, channels
    classes: int | None = None
    norm: str = "none"
    norm_except: tuple[str, ...] = ()
    lrn_alpha: float = 1e-4
    dropout: float = 0.5
    init: str = "paper"
    width: float = 1.0
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    labels: str | None = None


@dataclass
class SpecTree:
    path: str
    source: str
    entries: dict[str, HeaderEntry] = field(default_factory=dict)
    layers: list[LayerToken] = field(default_factory=list)
    header: Header | None = None
    end: Span = field(default_factory=lambda: Span(1, 1))
    overrides: list[str] = field(default_factory=list)
    pending: list = field(default_factory=list)  # parse errors build() reports along with its own
