"""The class score map of the top class drawn over the image (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import DataError, ModelError
from ..imaging import load_pixels
from .preprocess import check_size, to_input
from .session import Model

MIN_CELLS = 4  # a map of fewer cells (1 x 1 at the input size, 1 x 2, 1 x 3) localises next to nothing


def score_map(model: Model, path: str | Path, q: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rescaled image H x W x C uint8, score maps classes x h x w) of one unflipped dense pass at Q."""
    if "scores" not in model.info.outputs:
        raise ModelError("the model has no 'scores' output, so there is no score map to draw", model.shown,
                         "export the fully convolutional form with `vggspec export --fully-conv --scores` "
                         "(scores=True in Python)")
    pixels = load_pixels(path, model.info.channels, q)
    check_size(pixels, model.info.input_size, str(path), q)
    _, scores = model.run(to_input(pixels[None], model.info), [model.info.probs_output, "scores"])
    return pixels, scores[0].astype(np.float32)


def draw(pixels: np.ndarray, scores: np.ndarray, title: str, output: str | Path) -> Path:
    """Write a PNG: the image with the score map stretched over it, semi-transparent."""
    import matplotlib

    matplotlib.use("Agg")  # no display on an edge box or in CI
    from matplotlib.figure import Figure  # the OO API: no global pyplot state, nothing to close

    h, w = pixels.shape[:2]
    fig = Figure(figsize=(6, 6 * h / max(w, 1) + 0.5), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(pixels[..., 0] if pixels.shape[2] == 1 else pixels, cmap="gray" if pixels.shape[2] == 1 else None,
              extent=(0, w, h, 0))
    # Each score cell covers the image evenly (the map is the image at the network's stride).
    im = ax.imshow(scores, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="class score")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(output, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return Path(output)


def heatmap(model: Model, path: str | Path, q: int | None, class_index: int, output: str | Path,
            posterior: float | None = None) -> Path:
    """Draw the score map of `class_index` for image `path` at scale Q into `output`."""
    pixels, scores = score_map(model, path, q)
    if scores.shape[1] * scores.shape[2] < MIN_CELLS:
        h, w = scores.shape[1:]
        raise DataError(f"no heat map: at Q={q if q is not None else 'native'} the score map has {h} x {w} "
                        f"cell(s), under {MIN_CELLS}: too coarse to show where in the image the class is",
                        str(path), "give a larger test scale: each stride of the network (32 pixels for VGG) "
                                   "beyond the input size adds a row or column of cells")
    label = model.info.label(class_index)
    prob = f"  p={posterior:.3f}" if posterior is not None else ""
    title = f"{Path(path).name}: {label}{prob}  (Q={q if q is not None else 'native'})"
    return draw(pixels, scores[class_index], title, output)
