"""Reshaping weights between the standard graph and its dense-evaluation form."""

from __future__ import annotations

import numpy as np

from ..graph import LayerGraph, kernel_hw


def to_dense(dense: LayerGraph, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Standard-graph tensors reshaped for `dense` (a fully_conv graph): FC weights become conv kernels.

    Flatten is NCHW (channel-major), so row i of fc6.weight reshaped to (C, k, k) is the
    kernel that sees the same values at the same positions.
    """
    out = dict(tensors)
    for layer in dense.layers:
        if layer.op == "conv" and layer.attrs.get("from_fc"):
            kh, kw = kernel_hw(layer)
            w = tensors[f"{layer.name}.weight"]
            out[f"{layer.name}.weight"] = w.reshape(w.shape[0], layer.attrs["in_channels"], kh, kw)
    return out
