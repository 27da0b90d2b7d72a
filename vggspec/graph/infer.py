"""Shape inference, parameter and MAC counts, and receptive fields, one rule per op."""

from __future__ import annotations

from collections.abc import Callable

from .layer import Layer, Shape


class ShapeError(ValueError):
    """A layer cannot take the shape it is given; carries the layer for locating the error."""

    def __init__(self, layer: Layer, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.hint = hint


Rule = Callable[[Layer, Shape], tuple[Shape, int, int]]  # -> out_shape, params, macs


def _conv(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    a = layer.attrs
    if len(s) != 3:
        raise ShapeError(layer, f"{layer.name} needs a feature map, got a vector of {s[0]}")
    c, h, w = s
    (kh, kw), p, co = kernel_hw(layer), a["padding"], a["out_channels"]
    ho, wo = h + 2 * p - kh + 1, w + 2 * p - kw + 1
    if ho < 1 or wo < 1:
        raise ShapeError(layer, f"{layer.name}: a {kh}x{kw} kernel does not fit a {h}x{w} map")
    if a.get("in_channels", c) != c:
        raise ShapeError(layer, f"{layer.name} expects {a['in_channels']} channels, got {c}")
    return (co, ho, wo), kh * kw * c * co + co, kh * kw * c * co * ho * wo


def kernel_hw(layer: Layer) -> tuple[int, int]:
    """A conv's kernel as (height, width): an int for square kernels, a pair otherwise."""
    k = layer.attrs["kernel"]
    return (k, k) if isinstance(k, int) else tuple(k)  # type: ignore[return-value]


def _maxpool(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    if len(s) != 3:
        raise ShapeError(layer, f"{layer.name} needs a feature map, got a vector of {s[0]}")
    c, h, w = s
    k, st = layer.attrs["kernel"], layer.attrs["stride"]
    ho, wo = (h - k) // st + 1, (w - k) // st + 1
    if h < k or w < k:
        raise ShapeError(
            layer,
            f"{layer.name} shrinks the {h}x{w} map below 1x1",
            "remove a maxpool or give a larger input",
        )
    return (c, ho, wo), 0, 0


def _fc(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    if len(s) != 1:
        raise ShapeError(layer, f"{layer.name} needs a vector")
    f, o = s[0], layer.attrs["out_features"]
    return (o,), f * o + o, f * o


def _same(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    return s, 0, 0


def _bn(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    return s, 2 * s[0], 0


def _flatten(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    size = 1
    for d in s:
        size *= d
    return (size,), 0, 0


def _mean(layer: Layer, s: Shape) -> tuple[Shape, int, int]:
    return (s[0],), 0, 0


RULES: dict[str, Rule] = {
    "input": _same,
    "conv": _conv,
    "bn": _bn,
    "relu": _same,
    "lrn": _same,
    "maxpool": _maxpool,
    "flatten": _flatten,
    "fc": _fc,
    "dropout": _same,
    "mean": _mean,
    "softmax": _same,
}


def _receptive(layer: Layer, s: Shape, rf: tuple[int, int], jump: int) -> tuple[tuple[int, int], int]:
    """Receptive field (height, width) and jump after `layer`, given the field before it."""
    if layer.op == "conv":
        kh, kw = kernel_hw(layer)
        return (rf[0] + (kh - 1) * jump, rf[1] + (kw - 1) * jump), jump
    if layer.op == "maxpool":
        k, st = layer.attrs["kernel"], layer.attrs["stride"]
        return (rf[0] + (k - 1) * jump, rf[1] + (k - 1) * jump), jump * st
    if layer.op in ("flatten", "mean") and len(s) == 3:
        return (rf[0] + (s[1] - 1) * jump, rf[1] + (s[2] - 1) * jump), jump * max(s[1], s[2])
    return rf, jump


def annotate(layers: list[Layer], input_shape: Shape) -> list[Layer]:
    """Return the layers with shapes, costs and receptive fields filled in.

    Raises ShapeError at the first layer whose input it cannot take.
    """
    out: list[Layer] = []
    shape, rf, jump = tuple(input_shape), (1, 1), 1
    for layer in layers:
        new_shape, params, macs = RULES[layer.op](layer, shape)
        rf, jump = _receptive(layer, shape, rf, jump)
        out.append(layer.with_(in_shape=shape, out_shape=new_shape, params=params, macs=macs, rf=rf, jump=jump))
        shape = new_shape
    return out
