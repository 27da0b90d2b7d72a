"""The layer graph: the hub every backend reads. Knows the spec package and nothing after it."""

from ..preprocessing import Preprocessing
from .build import MAX_PARAMS, build
from .infer import ShapeError, annotate, kernel_hw
from .layer import Layer, Shape
from .layergraph import GraphMeta, LayerGraph
from .passes import PassError, fully_conv, reshape

__all__ = [
    "MAX_PARAMS",
    "GraphMeta",
    "Layer",
    "LayerGraph",
    "PassError",
    "Preprocessing",
    "Shape",
    "ShapeError",
    "annotate",
    "build",
    "fully_conv",
    "kernel_hw",
    "reshape",
]
