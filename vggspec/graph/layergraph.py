"""LayerGraph: the compiler's intermediate representation, a networkx DiGraph of Layers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from .layer import Layer


@dataclass(frozen=True)
class Preprocessing:
    """What turns decoded RGB pixels (0..255) into the network's input: (x * scale - mean) / std."""

    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            float(d.get("scale", 1 / 255)),
            tuple(map(float, d["mean"])),
            tuple(map(float, d["std"])),
            d.get("channel_order", "RGB"),
            d.get("layout", "NCHW"),
        )


@dataclass(frozen=True)
class GraphMeta:
    """Graph-wide facts: where the graph came from and how to feed it."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W of the spec (the training size)
    classes: int
    norm: str = "none"
    dropout: float = 0.5
    init: str = "paper"
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    spec_text: str = ""
    spec_path: str = ""
    labels: tuple[str, ...] = ()
    fully_conv: bool = False
    eval_input: tuple[int, int] | None = None  # H, W the shapes were inferred at, when not the spec's

    def with_(self, **changes: Any) -> GraphMeta:
        return replace(self, **changes)


class LayerGraph(nx.DiGraph):
    """A chain of named layers. Node keys are layer names; node attribute 'layer' holds the Layer.

    The graph is a DiGraph rather than a list so that passes and tools (networkx algorithms,
    DOT export) treat it as a graph, and so branches can come later without a new IR.
    """

    @classmethod
    def from_layers(cls, layers: Iterable[Layer], meta: GraphMeta) -> LayerGraph:
        g = cls()
        g.graph["meta"] = meta
        previous = None
        for layer in layers:
            if layer.name in g:
                raise ValueError(f"duplicate layer name {layer.name}")
            g.add_node(layer.name, layer=layer)
            if previous is not None:
                g.add_edge(previous, layer.name)
            previous = layer.name
        return g

    @property
    def meta(self) -> GraphMeta:
        return self.graph["meta"]

    @property
    def layers(self) -> list[Layer]:
        """Layers in execution order."""
        return [self.nodes[n]["layer"] for n in nx.topological_sort(self)]

    def layer(self, name: str) -> Layer:
        return self.nodes[name]["layer"]

    def of_op(self, *ops: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.op in ops]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.layers[-1].out_shape

    def __repr__(self) -> str:
        return f"<LayerGraph {self.meta.name}: {len(self)} layers, {self.params:,} params>"
