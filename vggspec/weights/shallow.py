"""Initialisation from a shallower net, as the paper trained its deeper configurations (section 3.1).

"We initialised the first four convolutional layers and the last three fully-connected layers
with the layers of net A (the intermediate layers were initialised randomly)."

Net A's first four convolutions are conv1_1, conv2_1, conv3_1 and conv3_2. Each is copied into
the deeper net's layer of the same name, which sits at the same place (same stage, same index in
it) and so has the same shape: D's conv1_2, conv2_2 and conv3_3 stay random. The last three FC
layers are matched from the end (A's fc6, fc7, fc8 to the deeper net's last three). With
`norm: batch` on both sides, each copied convolution's batch norm comes with it. Every other
layer gets the scheme's seeded initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..graph import Layer, LayerGraph
from .checkpoint import check_tensors
from .init import init_weights

PAPER_CONVS = 4  # "the first four convolutional layers"
PAPER_FCS = 3  # "the last three fully-connected layers"


@dataclass(frozen=True)
class ShallowInit:
    """The initialised tensors and which source layer went into which target layer."""

    tensors: dict[str, np.ndarray]
    copied: tuple[tuple[str, str], ...]  # (source layer, target layer), bn layers included


def layer_pairs(
    source: LayerGraph, target: LayerGraph, convs: int = PAPER_CONVS, fcs: int = PAPER_FCS, path: str | None = None,
) -> list[tuple[str, str]]:
    """(source, target) layer names to copy: the first `convs` convs by name, the last `fcs` FCs from the end."""
    src_convs = source.of_op("conv")[:convs]
    src_fcs, dst_fcs = source.of_op("fc"), target.of_op("fc")
    hint = (f"the paper initialises a deeper net from a shallower one (net A) with the same {fcs} FC layers "
            f"and at least {convs} convolutions")
    if len(src_convs) < convs or len(src_fcs) < fcs:
        raise WeightsError(
            f"{source.meta.name} has {len(source.of_op('conv'))} conv and {len(src_fcs)} FC layers;"
            f" initialising from it takes its first {convs} conv and last {fcs} FC layers", path, hint,
        )
    if len(dst_fcs) < fcs:
        raise WeightsError(f"the spec {target.meta.name} has only {len(dst_fcs)} FC layers; initialising from "
                           f"{source.meta.name} copies its last {fcs}", path, hint)
    target_names = {layer.name for layer in target.layers}
    pairs: list[tuple[str, str]] = []
    for layer in src_convs:
        if layer.name not in target_names or target.layer(layer.name).op != "conv":
            raise WeightsError(
                f"layer {layer.name} of {source.meta.name} has no counterpart in {target.meta.name}",
                hint="the deeper net needs the stages and positions of the shallower net's first convolutions",
            )
        pairs.append((layer.name, layer.name))
        bn = _bn_after(source, layer), _bn_after(target, target.layer(layer.name))
        if bn[0] and bn[1]:
            pairs.append((bn[0].name, bn[1].name))
    pairs += [(s.name, t.name) for s, t in zip(src_fcs[-fcs:], dst_fcs[-fcs:], strict=True)]
    return pairs


def _bn_after(graph: LayerGraph, conv: Layer) -> Layer | None:
    following = list(graph.successors(conv.name))
    if following and graph.layer(following[0]).op == "bn":
        return graph.layer(following[0])
    return None


def init_from_shallow(
    target: LayerGraph,
    source: LayerGraph,
    source_tensors: dict[str, np.ndarray],
    scheme: str | None = None,
    seed: int = 0,
    path: str | None = None,
) -> ShallowInit:
    """Tensors for `target`: the paper's layers copied from `source` (checked first), the rest random.

    A shape mismatch is a WeightsError naming both layers.
    """
    check_tensors(source, source_tensors, path)
    tensors = init_weights(target, scheme, seed)
    pairs = layer_pairs(source, target, path=path)
    for src, dst in pairs:
        for key in [k for k in tensors if k.split(".", 1)[0] == dst]:
            suffix = key.split(".", 1)[1]
            value = source_tensors[f"{src}.{suffix}"]
            if tuple(value.shape) != tuple(tensors[key].shape):
                raise WeightsError(
                    f"layer {src} of {source.meta.name} ({src}.{suffix} {tuple(value.shape)}) does not fit"
                    f" layer {dst} of {target.meta.name} ({key} {tuple(tensors[key].shape)})", path,
                    "the shallower net must share the deeper one's input, widths and FC sizes",
                )
            tensors[key] = np.array(value, dtype=tensors[key].dtype, copy=True)
    return ShallowInit(tensors, tuple(pairs))


def init_from_checkpoint(
    target: LayerGraph, path: str | Path, scheme: str | None = None, seed: int = 0,
) -> dict[str, np.ndarray]:
    """`init_from_shallow` from a vggspec checkpoint file (its spec read from its metadata): the tensors."""
    from .checkpoint import checkpoint_graph, load_checkpoint

    checkpoint = load_checkpoint(path)
    source = checkpoint_graph(checkpoint, str(path))
    return init_from_shallow(target, source, checkpoint.tensors, scheme, seed, str(path)).tensors
