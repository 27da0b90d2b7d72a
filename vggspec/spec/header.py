"""Header keys: what each means, its default, and how its text becomes a value."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import shorten

MAX_SIDE = 16384
IMAGE_CHANNELS = (1, 3)  # what vggspec.imaging decodes images to


class HeaderValueError(ValueError):
    """A header value that does not parse; carries an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def _name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
        raise HeaderValueError(
            f"name '{shorten(text)}' is not an identifier",
            "use letters, digits, '-' and '_', starting with a letter",
        )
    return text


def _input(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*([^xX\s]+)\s*[xX]\s*([^xX\s]+)\s*(?:[xX]\s*([^xX\s]+)\s*)?", text)
    if not m:
        raise HeaderValueError(f"input '{shorten(text)}' is not HxWxC", "write it as 224x224x3")
    parts = [m.group(1), m.group(2), m.group(3) or "3"]
    values = []
    for what, part in zip(("height", "width", "channels"), parts, strict=True):
        if not re.fullmatch(r"[0-9]{1,9}", part.lstrip("0") or "0"):
            raise HeaderValueError(f"input {what} '{shorten(part)}' is not a positive integer")
        values.append(int(part.lstrip("0") or "0"))
    h, w, c = values
    if h < 1 or w < 1 or c < 1:
        raise HeaderValueError("input sizes must be at least 1")
    if h > MAX_SIDE or w > MAX_SIDE:
        raise HeaderValueError(f"input {h}x{w} is larger than {MAX_SIDE} on a side")
    if c not in IMAGE_CHANNELS:
        raise HeaderValueError(f"input has {c} channels; vggspec reads images as 1 (grayscale) or 3 (RGB)",
                               "write HxWx3 or HxWx1")
    return h, w, c


MAX_CLASSES = 1 << 20  # an FC layer's largest output count (the parser's MAX_WIDTH)


def _positive_int(text: str) -> int:
    digits = text.strip().lstrip("0") or "0"
    if not re.fullmatch(r"[0-9]+", digits) or int(digits[:10]) < 1:
        raise HeaderValueError(f"'{shorten(text)}' is not a positive integer")
    if len(digits) > 7 or int(digits) > MAX_CLASSES:
        raise HeaderValueError(f"{shorten(text.strip())} is more than the {MAX_CLASSES:,} outputs an FC layer may have")
    return int(digits)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise HeaderValueError(f"'{text}' is not one of {', '.join(options)}", f"use one of: {', '.join(options)}")
        return value

    return parse


_NUMBER_HINT = "write a decimal or a fraction such as 1/255"


def _number(text: str) -> float:
    """A decimal or a fraction a/b. Parsed as floats (never an exact Fraction: '1e999999999' would be a
    billion-digit integer); overflow and NaN are errors like any other bad number."""
    num, slash, den = text.strip().partition("/")
    try:
        value = float(num) / float(den) if slash else float(num)
    except (ValueError, ZeroDivisionError):
        raise HeaderValueError(f"'{shorten(text)}' is not a number", _NUMBER_HINT) from None
    if not math.isfinite(value):
        raise HeaderValueError(f"'{shorten(text)}' is not a finite number", _NUMBER_HINT)
    return value



def _probability(text: str) -> float:
    p = _number(text)
    if not 0.0 <= p < 1.0:
        raise HeaderValueError(f"dropout {p} is outside [0, 1)")
    return p


def _scale(text: str) -> float:
    s = _number(text)
    if s <= 0:
        raise HeaderValueError(f"scale {s} must be positive")
    return s


MAX_WIDTH_MULTIPLIER = 16


def _width(text: str) -> float:
    w = _number(text)
    if not 0 < w <= MAX_WIDTH_MULTIPLIER:
        raise HeaderValueError(f"{w:g} is outside (0, {MAX_WIDTH_MULTIPLIER}]",
                               "a multiplier of every layer's channels, e.g. 1/8 for a net eight times narrower")
    return w


def _numbers(text: str) -> tuple[float, ...]:
    parts = text.replace(",", " ").split()
    if not parts:
        raise HeaderValueError("expected one number per input channel")
    return tuple(_number(p) for p in parts)


def _lrn_alpha(text: str) -> float:
    a = _number(text)
    if not 0 < a <= 1e3:
        raise HeaderValueError(f"lrn_alpha {a:g} is outside (0, 1000]", "AlexNet's, the paper's, is 1e-4")
    return a


def _positive_numbers(text: str) -> tuple[float, ...]:
    values = _numbers(text)
    if any(v <= 0 for v in values):
        raise HeaderValueError("std values must be positive")
    return values


def _conv_names(text: str) -> tuple[str, ...]:
    names = tuple(text.replace(",", " ").split())
    bad = [n for n in names if not re.fullmatch(r"conv[0-9]{1,4}_[0-9]{1,4}", n)]
    if bad or not names:
        raise HeaderValueError(f"'{shorten(bad[0] if bad else text)}' is not a convolution's name",
                               "name convolutions as the summary does, e.g. conv1_1 or conv1_1,conv2_1")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class KeySpec:
    parse: Callable[[str], Any]
    help: str


KEYS: dict[str, KeySpec] = {
    "name": KeySpec(_name, "the model's name; the generated class is named after it"),
    "input": KeySpec(_input, "input size HxWxC, e.g. 224x224x3"),
    "classes": KeySpec(_positive_int, "number of classes; must equal the last FC's outputs"),
    "norm": KeySpec(_choice("none", "batch"), "batch: batch norm after every convolution"),
    "norm_except": KeySpec(_conv_names, "under norm: batch, convolutions left without it, e.g. conv1_1 "
                                        "(an LRN after it then sees the input's own scale)"),
    "lrn_alpha": KeySpec(_lrn_alpha, "the LRN's alpha in b = a / (k + alpha * sum a^2)^beta (AlexNet's 1e-4); "
                                     "alpha * c^2 is the LRN of activations c times larger, up to a constant"),
    "dropout": KeySpec(_probability, "dropout after each hidden FC layer (0 for none)"),
    "init": KeySpec(_choice("paper", "xavier", "kaiming"), "weight initialisation scheme"),
    "width": KeySpec(_width, "multiplier of every conv's channels and hidden FC's outputs, e.g. 1/8"),
    "scale": KeySpec(_scale, "pixel scale applied before mean and std (1/255 or 1)"),
    "mean": KeySpec(_numbers, "per-channel mean subtracted after scaling, RGB order"),
    "std": KeySpec(_positive_numbers, "per-channel std divided after the mean"),
    "labels": KeySpec(str.strip, "a text file of class labels, one per line, beside the spec"),
}
