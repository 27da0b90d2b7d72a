"""Upper bounds of the counts and numbers a user types: one place, free of heavy imports, for the CLI's options.

Each bound is far above any sensible use and far below what breaks the machine or a library: 99999999999999999999
workers forked 945 processes in 40 s, a huge --train count ran until killed, and numpy takes seeds below 2**32
only.
"""

from __future__ import annotations

import os

MAX_SEED = 2**32 - 1  # numpy's legacy seeding (np.random.seed) takes 0 <= seed < 2**32
MAX_WORKERS = 64  # DataLoader worker processes: each holds a copy of the data set's state
MAX_THREADS = 1024  # torch or onnxruntime threads: more than any machine's cores
MAX_BATCH_SIZE = 1 << 16  # a global batch of 65,536 images (the paper's is 256)
MAX_EPOCHS = 100_000
MAX_SCENES = 10_000_000  # images per split of `data scenes`
MAX_LR = 10.0  # a learning rate above it only makes the loss overflow
MAX_WEIGHT_DECAY = 1.0  # above 1, SGD's decay term flips the weights' sign every step
MAX_CLUTTER = 4.0
# The largest side `vggspec data digits|scenes` writes: 16 megapixels, well inside what vggspec.imaging
# decodes; larger images of 8x8 scans only cost minutes and gigabytes.
MAX_DATA_SIZE = 4096
# --mean, --std and --scale of predict and eval: normalised pixels stay finite in float32 (1e308 overflowed).
MAX_PREPROCESSING = 1e6
MIN_STD = 1e-6


def hints() -> dict[str, str]:
    """What each bounded option's usage error adds, by option name."""
    return {
        "workers": f"at most {MAX_WORKERS} ({os.cpu_count() or 1} CPUs here; 0 loads in the main process)",
        "threads": f"at most {MAX_THREADS} ({os.cpu_count() or 1} CPUs here)",
        "batch_size": f"at most {MAX_BATCH_SIZE:,}",
        "epochs": f"at most {MAX_EPOCHS:,}",
        "seed": f"a seed from 0 to {MAX_SEED} (2**32 - 1), as numpy takes",
    }


def scenes_bytes(count: int, size: int) -> int:
    """A rough size on disk of `count` scenes of `size` x `size`: PNG keeps about half of the RGB bytes of
    these noisy images."""
    return count * size * size * 3 // 2
