"""Weights: initialisation, checkpoints and name maps. numpy and safetensors only, never torch."""

from .checkpoint import Checkpoint, check_tensors, checkpoint_graph, load_checkpoint, save_checkpoint
from .convert import to_dense
from .init import SCHEMES, init_layer, init_weights, param_shapes

__all__ = [
    "SCHEMES", "Checkpoint", "check_tensors", "checkpoint_graph", "init_layer", "init_weights", "load_checkpoint",
    "param_shapes", "save_checkpoint", "to_dense",
]
