"""Initialisation schemes, in numpy so that export needs no torch.

paper:   weights ~ N(0, sigma^2) with sigma = 0.01, biases 0 (section 3.1). The paper writes
         "10^-2 variance"; its Caffe release and torchvision's FC layers use a standard
         deviation of 0.01, which is what trains: sigma = 0.1 makes 11 layers' activations grow
         by about 1.7 per layer.
xavier:  Glorot & Bengio uniform, bound sqrt(6 / (fan_in + fan_out)), biases 0.
kaiming: torchvision's VGG: convs He-normal with fan_out and ReLU gain, FCs N(0, 0.01^2), biases 0.
Batch norm starts at weight 1, bias 0, running mean 0, running variance 1.

Each layer draws from its own generator seeded by (seed, layer name), so one layer's
values do not depend on which other layers exist: a deeper net and a shallower one
seeded alike share nothing by accident, and re-initialising one layer leaves the rest.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..graph import Layer, LayerGraph, kernel_hw

SCHEMES = ("paper", "xavier", "kaiming")
PAPER_STD = 0.01


def param_shapes(graph: LayerGraph) -> dict[str, tuple[int, ...]]:
    """The state_dict of the graph's module: key -> shape, in layer order."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in graph.layers:
        if layer.op == "conv":
            kh, kw = kernel_hw(layer)
            shapes[f"{layer.name}.weight"] = (layer.out_shape[0], layer.in_shape[0], kh, kw)
            shapes[f"{layer.name}.bias"] = (layer.out_shape[0],)
        elif layer.op == "fc":
            shapes[f"{layer.name}.weight"] = (layer.out_shape[0], layer.in_shape[0])
            shapes[f"{layer.name}.bias"] = (layer.out_shape[0],)
        elif layer.op == "bn":
            for key in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{layer.name}.{key}"] = (layer.out_shape[0],)
            shapes[f"{layer.name}.num_batches_tracked"] = ()
    return shapes


def layer_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_layer(layer: Layer, scheme: str, seed: int) -> dict[str, np.ndarray]:
    """Fresh tensors for one layer (empty for layers without parameters)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    rng = layer_rng(seed, layer.name)
    if layer.op == "bn":
        c = layer.out_shape[0]
        return {
            f"{layer.name}.weight": np.ones(c, np.float32),
            f"{layer.name}.bias": np.zeros(c, np.float32),
            f"{layer.name}.running_mean": np.zeros(c, np.float32),
            f"{layer.name}.running_var": np.ones(c, np.float32),
            f"{layer.name}.num_batches_tracked": np.zeros((), np.int64),
        }
    if layer.op not in ("conv", "fc"):
        return {}
    if layer.op == "conv":
        kh, kw = kernel_hw(layer)
        shape = (layer.out_shape[0], layer.in_shape[0], kh, kw)
    else:
        shape = (layer.out_shape[0], layer.in_shape[0])
    receptive = int(np.prod(shape[2:])) if len(shape) == 4 else 1
    fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
    # Drawn in float32: D's 138M values take a quarter of the time of float64 draws.
    if scheme == "paper" or (scheme == "kaiming" and layer.op == "fc"):
        weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(PAPER_STD)
    elif scheme == "xavier":
        bound = np.float32(np.sqrt(6.0 / (fan_in + fan_out)))
        weight = (rng.random(shape, dtype=np.float32) * 2 - 1) * bound
    else:
        weight = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_out))
    return {f"{layer.name}.weight": weight, f"{layer.name}.bias": np.zeros(shape[0], np.float32)}


def init_weights(graph: LayerGraph, scheme: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh tensors for every layer of the graph, keyed as the generated module's state_dict."""
    tensors: dict[str, np.ndarray] = {}
    for layer in graph.layers:
        tensors.update(init_layer(layer, scheme or graph.meta.init, seed))
    return tensors


def signal_gain(graph: LayerGraph, scheme: str | None = None) -> float:
    """About how much a freshly initialised net scales its input's root mean square on the way to the class
    scores, batch norm aside (it restores the scale: the caller asks only of nets without it). Each conv or FC
    layer multiplies the mean square by fan_in x Var(weight), and a ReLU halves it. The paper's N(0, 0.01^2)
    gives 0.0144 x 9 C / 2 per 3x3 layer of C inputs: far below 1 for the narrow nets specs describe, so a
    deep one starts with scores of ~0 whatever the image, the loss at ln(classes) and gradients too small to
    leave it. (The paper trained only A from it, on Caffe's unnormalised pixels, ~60 times larger than a
    spec's normalised input, and started deeper nets from A's layers; Glorot's scheme keeps the scale.)"""
    scheme = scheme or graph.meta.init
    square = 1.0
    for layer in graph.layers:
        if layer.op == "relu":
            square /= 2
        elif layer.op in ("conv", "fc"):
            kh, kw = kernel_hw(layer) if layer.op == "conv" else (1, 1)
            fan_in, fan_out = layer.in_shape[0] * kh * kw, layer.out_shape[0] * kh * kw
            if scheme == "xavier":
                variance = 2.0 / (fan_in + fan_out)
            elif scheme == "kaiming" and layer.op == "conv":
                variance = 2.0 / fan_out
            else:
                variance = PAPER_STD ** 2
            square *= fan_in * variance
    return float(np.sqrt(square))
