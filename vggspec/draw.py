"""Pictures of a LayerGraph: SVG, PNG or PDF through matplotlib, DOT through pydot.

One box per layer that carries meaning (convolutions, pools, LRN, FC, soft-max); ReLU,
batch norm and dropout are written inside the box they follow, so the picture reads like
Table 1 of the paper. Each stage is a column, so the five stages are visible at a glance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_path
from .errors import VggspecError
from .graph import Layer, LayerGraph

FOLDED = ("relu", "bn", "dropout", "flatten")
COLOURS = {
    "input": "#d9d9d9",
    "conv": "#a6c8ea",
    "fc": "#b8e0b0",
    "maxpool": "#f7c59f",
    "lrn": "#d7bde2",
    "mean": "#f9e79f",
    "softmax": "#f5a3a3",
}
EDGE = "#4d4d4d"
FORMATS = ("svg", "png", "pdf", "dot")


@dataclass
class Box:
    layer: Layer
    extras: list[str]

    @property
    def colour(self) -> str:
        if self.layer.op == "conv" and self.layer.attrs.get("from_fc"):
            return COLOURS["fc"]
        return COLOURS.get(self.layer.op, "#ffffff")

    @property
    def title(self) -> str:
        if self.layer.op == "input":
            return "image"
        return f"{self.layer.name}  ·  {self.layer.notation}"

    @property
    def subtitle(self) -> str:
        shape = " × ".join(str(d) for d in self.layer.out_shape)
        return f"{shape}" + (f"   + {' + '.join(self.extras)}" if self.extras else "")


def columns(graph: LayerGraph) -> list[tuple[str, list[Box]]]:
    """Boxes grouped into stage columns, with folded layers attached to the box before them."""
    groups: dict[int, list[Box]] = {}
    for layer in graph.layers:
        if layer.op in FOLDED:
            if layer.op != "flatten" and groups:
                label = {"relu": "ReLU", "bn": "BN", "dropout": f"dropout {layer.attrs.get('p', 0):g}"}[layer.op]
                list(groups.values())[-1][-1].extras.append(label)
            continue
        stage = 0 if layer.op == "input" else layer.stage
        groups.setdefault(stage, []).append(Box(layer, []))
    last_conv_stage = max(
        (
            s
            for s, boxes in groups.items()
            if any(b.layer.op in ("conv", "maxpool", "lrn") and not b.layer.attrs.get("from_fc") for b in boxes)
        ),
        default=0,
    )
    out = []
    for stage, boxes in groups.items():
        if stage == 0:
            title = "input"
        elif stage > last_conv_stage:
            title = "classifier"
        else:
            c, h, w = boxes[0].layer.out_shape
            title = f"stage {stage} · {h}×{w}"
        out.append((title, boxes))
    return out


def write_picture(graph: LayerGraph, output: str | Path) -> Path:
    """Write the picture in the format the suffix names; atomically."""
    path = Path(output)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise VggspecError(
            f"unknown picture format '.{fmt}'", str(path), f"use one of: {', '.join('.' + f for f in FORMATS)}"
        )
    with atomic_path(path, f".{fmt}") as tmp:
        if fmt == "dot":
            tmp.write_text(to_dot(graph), encoding="utf-8")
        else:
            _draw(graph, tmp, fmt)
    return path


def to_dot(graph: LayerGraph) -> str:
    """The network as Graphviz DOT, with one cluster per stage."""
    import pydot

    dot = pydot.Dot(graph.meta.name, graph_type="digraph", rankdir="LR", fontname="Helvetica")
    dot.set_node_defaults(shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    previous = None
    for index, (title, boxes) in enumerate(columns(graph)):
        cluster = pydot.Cluster(f"stage{index}", label=title, style="rounded", color="#bbbbbb")
        for box in boxes:
            label = f"{box.title}\\n{box.subtitle}"
            cluster.add_node(pydot.Node(box.layer.name, label=f'"{label}"', fillcolor=box.colour))
        dot.add_subgraph(cluster)
        for box in boxes:
            if previous is not None:
                dot.add_edge(pydot.Edge(previous, box.layer.name))
            previous = box.layer.name
    return dot.to_string()


def _draw(graph: LayerGraph, path: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    cols = columns(graph)
    col_w, box_w, box_h, gap = 2.9, 2.6, 0.62, 0.28
    rows = max(len(boxes) for _, boxes in cols)
    height = 1.4 + rows * (box_h + gap)
    fig = plt.figure(figsize=(col_w * len(cols) + 0.4, height + 0.9))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-0.2, col_w * len(cols) + 0.2)
    ax.set_ylim(-0.4, height + 0.9)
    ax.axis("off")
    c, h, w = graph.meta.input_shape
    hw = graph.meta.eval_input or (h, w)
    form = "dense evaluation" if graph.meta.fully_conv else "standard"
    ax.text(0.1, height + 0.55, f"{graph.meta.name}", fontsize=15, weight="bold", va="center")
    ax.text(
        0.1,
        height + 0.15,
        f"{form} · input {hw[0]}×{hw[1]}×{c} · {graph.params:,} parameters · {graph.macs / 1e9:.2f} GMACs",
        fontsize=10,
        color="#555555",
        va="center",
    )
    anchors: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for i, (title, boxes) in enumerate(cols):
        x0 = i * col_w + (col_w - box_w) / 2
        top = height - 0.55
        panel_h = len(boxes) * (box_h + gap) + 0.35
        ax.add_patch(
            FancyBboxPatch(
                (x0 - 0.08, top - panel_h + 0.15),
                box_w + 0.16,
                panel_h + 0.3,
                boxstyle="round,pad=0.02,rounding_size=0.12",
                fc="#f4f6f8",
                ec="#c9ced6",
                lw=0.8,
            )
        )
        ax.text(
            x0 + box_w / 2, top + 0.25, title, ha="center", va="center", fontsize=10, weight="bold", color="#333333"
        )
        for j, box in enumerate(boxes):
            y = top - 0.1 - (j + 1) * (box_h + gap) + gap
            ax.add_patch(
                FancyBboxPatch(
                    (x0, y), box_w, box_h, boxstyle="round,pad=0.01,rounding_size=0.08", fc=box.colour, ec=EDGE, lw=0.8
                )
            )
            ax.text(x0 + box_w / 2, y + box_h * 0.66, box.title, ha="center", va="center", fontsize=8.5, weight="bold")
            ax.text(
                x0 + box_w / 2, y + box_h * 0.28, box.subtitle, ha="center", va="center", fontsize=7.5, color="#333333"
            )
            anchors.append((i, x0, y))
    for (i, x, y), (k, x_next, y_next) in zip(anchors, anchors[1:], strict=False):
        if i == k:  # down the column
            start, end = (x + box_w / 2, y), (x_next + box_w / 2, y_next + box_h)
        else:  # across the gap between columns: right side of the last box to the left of the next
            start, end = (x + box_w, y + box_h / 2), (x_next, y_next + box_h / 2)
        ax.add_patch(
            FancyArrowPatch(
                start, end, arrowstyle="-|>", mutation_scale=9, color="#666666", lw=0.8, shrinkA=1, shrinkB=1
            )
        )
    # Text stays text in SVG and PDF (searchable, selectable), not paths or Type 3 glyphs. No date and a
    # fixed id salt: the same spec draws the same bytes.
    with matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "svg.hashsalt": "vggspec"}):
        fig.savefig(path, format=fmt, dpi=150, bbox_inches="tight", pad_inches=0.15,
                    metadata={"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt))
    plt.close(fig)
