"""Training with the paper's recipe (section 3.1) on the module the torch backend generates.

`train(TrainConfig(...))` runs one process, or one rank under torchrun (DDP). Modules, one job each:
config (the run's settings), data (image folder, statistics, resumable sampler), augment (rescale,
crop, flip, PCA lighting), loop (the optimisation), distributed (torchrun/DDP glue), state (fault-proof
run checkpoints), progress (the bar), plot (metrics.jsonl and metrics.png). The examples' data sets
are written by vggspec.datasets.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, resume: bool = False, overrides: dict | None = None) -> dict:
    """Train or resume the run `config` describes; imports torch."""
    from .loop import train as _train

    return _train(config, resume, overrides)
