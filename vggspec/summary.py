"""Per-layer summaries of a LayerGraph: rows for a table, or one JSON object."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from .graph import Layer, LayerGraph


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(d) for d in shape)


def _rf(layer: Layer) -> str:
    h, w = layer.rf
    return str(h) if h == w else f"{h}x{w}"


def layer_record(layer: Layer) -> dict[str, Any]:
    return {
        "name": layer.name,
        "op": layer.op,
        "notation": layer.notation,
        "stage": layer.stage,
        "output_shape": list(layer.out_shape),
        "params": layer.params,
        "macs": layer.macs,
        "receptive_field": list(layer.rf),
    }


def summary_dict(graph: LayerGraph) -> dict[str, Any]:
    """The JSON summary: totals and one record per layer."""
    meta = graph.meta
    c, h, w = meta.input_shape
    hw = meta.eval_input or (h, w)
    return {
        "name": meta.name,
        "params": graph.params,
        "macs": graph.macs,
        "input": [c, *hw],
        "classes": meta.classes,
        "width": meta.width,
        "fully_conv": meta.fully_conv,
        "output_shape": list(graph.output_shape),
        "layers": [layer_record(x) for x in graph.layers],
    }


def render_table(graph: LayerGraph) -> Any:
    """A rich Table of the layers and the totals."""
    from rich.table import Table

    meta = graph.meta
    c, h, w = meta.input_shape
    hw = meta.eval_input or (h, w)
    form = "dense evaluation" if meta.fully_conv else "standard"
    narrow = f", width {Fraction(meta.width).limit_denominator(1000)}" if meta.width != 1 else ""
    table = Table(title=f"{meta.name} ({form}, input {hw[0]}x{hw[1]}x{c}{narrow})", title_justify="left")
    for column, justify in (
        ("layer", "left"),
        ("op", "left"),
        ("output", "right"),
        ("params", "right"),
        ("MACs", "right"),
        ("RF", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)
    stage = None
    for layer in graph.layers:
        if stage is not None and layer.stage != stage:
            table.add_section()
        stage = layer.stage
        table.add_row(
            layer.name,
            layer.notation,
            _shape(layer.out_shape),
            f"{layer.params:,}" if layer.params else "",
            f"{layer.macs:,}" if layer.macs else "",
            _rf(layer),
        )
    table.add_section()
    table.add_row("total", "", "", f"{graph.params:,}", f"{graph.macs:,}", "", style="bold")
    table.caption = f"{graph.params / 1e6:.1f}M parameters, {graph.macs / 1e9:.2f} GMACs per image"
    return table
