"""The class score map of the top class drawn over the image: a figure with matplotlib (Agg backend, imported
lazily) for the command line's files, a plain PNG with Pillow for the server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import DataError, ModelError
from ..imaging import load_image, rescale, rescaled_size, to_array
from .preprocess import check_size, to_input
from .session import Model, ModelOutputError

MIN_CELLS = 4  # a map of fewer cells (1 x 1 at the input size, 1 x 2, 1 x 3) localises next to nothing


def score_map(model: Model, path: str | Path, q: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rescaled image H x W x C uint8, score maps classes x h x w) of one unflipped dense pass at Q."""
    if "scores" not in model.info.outputs:
        raise ModelError("the model has no 'scores' output, so there is no score map to draw", model.shown,
                         "export the fully convolutional form with `vggspec export --fully-conv --scores` "
                         "(scores=True in Python)")
    image = load_image(path, model.info.channels)
    model.check_memory(rescaled_size(image.size, q), 1, str(path))
    pixels = to_array(rescale(image, q, str(path)))
    check_size(pixels, model.info.input_size, str(path), q)
    probs, scores = model.run(to_input(pixels[None], model.info), [model.info.probs_output, "scores"])
    if scores.ndim != 4 or scores.shape[1] != probs.shape[1]:  # Model.run checks it against the metadata
        raise ModelOutputError(f"output 'scores' has shape {list(scores.shape)}: not one map per class of the "
                               f"{probs.shape[1]} posteriors", model.shown)
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


def check_cells(scores: np.ndarray, q: int | None, path: str | Path | None) -> None:
    """DataError when the score maps (classes x h x w) have too few cells to show where a class is."""
    if scores.shape[1] * scores.shape[2] < MIN_CELLS:
        h, w = scores.shape[1:]
        raise DataError(f"no heat map: at Q={q if q is not None else 'native'} the score map has {h} x {w} "
                        f"cell(s), under {MIN_CELLS}: too coarse to show where in the image the class is",
                        None if path is None else str(path),
                        "give a larger test scale: each stride of the network (32 pixels for VGG) "
                        "beyond the input size adds a row or column of cells")


def overlay_png(pixels: np.ndarray, scores: np.ndarray, alpha: float = 0.45) -> bytes:
    """A PNG of one class's score map (h x w) stretched over the image (H x W x C uint8), semi-transparent,
    with Pillow and numpy only: the server draws it on an edge box, where matplotlib is not installed."""
    from PIL import Image

    h, w = pixels.shape[:2]
    lo, hi = float(scores.min()), float(scores.max())
    unit = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
    # Each score cell covers the image evenly (the map is the image at the network's stride), as in draw().
    stretched = np.asarray(Image.fromarray(unit.astype(np.float32), "F").resize((w, h), Image.BILINEAR))
    base = pixels if pixels.shape[2] == 3 else np.repeat(pixels, 3, axis=2)
    mixed = base.astype(np.float32) * (1 - alpha) + _jet(np.clip(stretched, 0, 1)) * alpha
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(mixed), 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _jet(v: np.ndarray) -> np.ndarray:
    """matplotlib's "jet" colour map in closed form (blue, cyan, yellow, red): H x W -> H x W x 3 in 0..255."""
    channels = [np.clip(1.5 - np.abs(4 * v - k), 0, 1) for k in (3, 2, 1)]
    return np.stack(channels, axis=-1) * 255


def heatmap(model: Model, path: str | Path, q: int | None, class_index: int, output: str | Path,
            posterior: float | None = None) -> Path:
    """Draw the score map of `class_index` for image `path` at scale Q into `output`."""
    pixels, scores = score_map(model, path, q)
    check_cells(scores, q, path)
    label = model.info.label(class_index)
    prob = f"  p={posterior:.3f}" if posterior is not None else ""
    title = f"{Path(path).name}: {label}{prob}  (Q={q if q is not None else 'native'})"
    return draw(pixels, scores[class_index], title, output)
