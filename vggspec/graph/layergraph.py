"""LayerGraph: the compiler's intermediate representation, a networkx DiGraph of Layers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from ..preprocessing import Preprocessing
from .layer import Layer


@dataclass(frozen=True)
class GraphMeta:
    """Graph-wide facts: where the graph came from and how to feed it."""

    name: str
    input_shape: tuple[int, int, int]  # C, H, W of the spec (the training size)
    classes: int
    norm: str = "none"
    norm_except: tuple[str, ...] = ()  # convolutions without batch norm under norm "batch"
    dropout: float = 0.5
    init: str = "paper"
    width: float = 1.0  # the header's channel multiplier, already applied to the layers
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    spec_text: str = ""
    spec_path: str = ""
    overrides: tuple[str, ...] = ()  # the `--set key=value` options spec_text was compiled with
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
