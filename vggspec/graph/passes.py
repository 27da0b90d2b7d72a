"""Graph passes: functions from LayerGraph to LayerGraph."""

from __future__ import annotations

from ..errors import PassError
from .infer import ShapeError, annotate
from .layer import Layer
from .layergraph import LayerGraph


def fully_conv(graph: LayerGraph, input_hw: tuple[int, int] | None = None) -> LayerGraph:
    """The paper's dense-evaluation form (section 3.2).

    The first FC becomes a k x k convolution, k the spatial size the convolution stack
    produces at the spec's input; the other FCs become 1 x 1 convolutions. The class score
    map is averaged over space before the soft-max. Shapes are inferred at `input_hw`
    (default: the spec's input size).
    """
    if graph.meta.fully_conv:
        return reshape(graph, input_hw) if input_hw else graph
    layers: list[Layer] = []
    first = True
    previous_map = graph.meta.input_shape  # an MLP spec flattens the input itself
    for layer in graph.layers:
        if layer.op == "flatten":
            previous_map = layer.in_shape
            continue
        if layer.op == "fc":
            c, h, w = previous_map if first else (layer.in_shape[0], 1, 1)
            attrs = {
                "from_fc": True,
                "kernel": h if h == w else (h, w),
                "padding": 0,
                "stride": 1,
                "in_channels": c,
                "out_channels": layer.attrs["out_features"],
            }
            layers.append(layer.with_(op="conv", attrs=attrs))
            first = False
            continue
        if layer.op == "softmax":
            layers.append(Layer("mean", "mean", {}, layer.stage, layer.loc))
        layers.append(layer)
    meta = graph.meta.with_(fully_conv=True)
    return _reannotate(LayerGraph.from_layers(layers, meta), input_hw)


def reshape(graph: LayerGraph, input_hw: tuple[int, int] | None) -> LayerGraph:
    """The same graph with shapes, costs and fields inferred at another input size."""
    return _reannotate(graph, input_hw)


def _reannotate(graph: LayerGraph, input_hw: tuple[int, int] | None) -> LayerGraph:
    c, h, w = graph.meta.input_shape
    hw = input_hw or (h, w)
    try:
        layers = annotate(graph.layers, (c, *hw))
    except ShapeError as exc:
        raise PassError(
            f"input {hw[0]}x{hw[1]} is too small for {graph.meta.name}: {exc}"
            f" (its dense form needs at least about {h}x{w})"
        ) from None
    meta = graph.meta.with_(eval_input=None if hw == (h, w) else tuple(hw))
    return LayerGraph.from_layers(layers, meta)
