"""A layer of the graph: its op, its attributes and what shape inference learnt of it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

Shape = tuple[int, ...]  # (C, H, W) for maps, (F,) for vectors; the batch axis is left out


@dataclass(frozen=True)
class Layer:
    """One node of a LayerGraph.

    op is one of: input, conv, bn, relu, lrn, maxpool, flatten, fc, dropout, mean, softmax.
    attrs hold the op's hyper-parameters (kernel, out_channels, p, ...). The annotated
    fields are filled by `annotate` and recomputed by every pass.
    """

    name: str
    op: str
    attrs: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    loc: tuple[int, int, int] | None = None  # line, col, length of the spec token it came from
    in_shape: Shape = ()
    out_shape: Shape = ()
    params: int = 0
    macs: int = 0
    rf: tuple[int, int] = (1, 1)  # receptive field on the input, height and width
    jump: int = 1  # input pixels between neighbouring outputs

    def with_(self, **changes: Any) -> Layer:
        return replace(self, **changes)

    @property
    def notation(self) -> str:
        """The layer in the paper's notation, as the summary and the picture show it."""
        a = self.attrs
        return {
            "input": lambda: "input",
            "conv": lambda: (
                f"FC-{a['out_channels']} as conv{a['kernel']}"
                if a.get("from_fc")
                else f"conv{a['kernel']}-{a['out_channels']}"
            ),
            "bn": lambda: "batch norm",
            "relu": lambda: "ReLU",
            "lrn": lambda: f"LRN n={a['size']}",
            "maxpool": lambda: f"maxpool {a['kernel']}x{a['kernel']}/{a['stride']}",
            "flatten": lambda: "flatten",
            "fc": lambda: f"FC-{a['out_features']}",
            "dropout": lambda: f"dropout {a['p']:g}",
            "mean": lambda: "spatial mean",
            "softmax": lambda: "soft-max",
        }[self.op]()
