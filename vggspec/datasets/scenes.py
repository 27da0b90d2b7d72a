"""Scenes: one real handwritten digit per cluttered RGB image, at a size that varies 3x by default (a scale test).

Each image places one of scikit-learn's 1797 bundled 8x8 scans (no download) at a random position and a
log-uniform random size on a smooth, textured, noisy colour background, among fragments of other scans that
look like strokes, not digits. Splits draw on disjoint scans (a stratified 60/15/25 cut), so the test set
measures unseen handwriting; every image is a function of (seed, split, index) alone, so runs are byte-identical.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path
from ..errors import DataError
from .digits import SPLITS, check_absent, check_size, move_into_place, split_indices, staged_set

VERSION = 1
FRACTIONS = (0.6, 0.15, 0.25)
DEFAULT_COUNTS = {"train": 6000, "val": 1000, "test": 2000}
MIN_CONTRAST = 90.0  # luminance difference (of 255) between a stroke and the background under it
LUMA = np.array([0.299, 0.587, 0.114])
# Fragment windows (rows, columns) of the 8x8 scan: at most 12 of its 64 cells, too little for a digit (five
# rows of a 3's right side already read as a 3).
WINDOWS = ((3, 3), (3, 4), (4, 3))
MIN_FRAGMENT_INK = 3.0  # full-ink cells a window must hold to be drawn


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The bundled scans as float ink 0..1 (1797, 8, 8) and their classes; a DataError, not an ImportError."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("scikit-learn is not installed", hint="pip install 'vggspec[train]'") from None
    digits = load_digits()
    return np.clip(digits.images / 16.0, 0.0, 1.0), np.asarray(digits.target)


def check_options(size: int, digit_range: tuple[int, int], counts: dict[str, int]) -> None:
    """Refuse settings that cannot make the promised images, before any file is written."""
    low, high = digit_range
    check_size(size, 16)
    if not 8 <= low < high <= size:
        hint = f"need 8 <= --min-digit < --max-digit <= {size}"
        raise DataError(f"digit sizes {low}-{high} px do not fit", hint=hint)
    unknown = sorted(set(counts) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown split {unknown[0]!r}", hint=f"splits are {', '.join(SPLITS)}")
    if any(n < 0 for n in counts.values()):
        raise DataError("image counts must be 0 or more")


# --- one image ----------------------------------------------------------------------------------------------


def _resize(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Smoothly resample one float plane (Pillow's mode F keeps values unclipped and unrounded)."""
    from PIL import Image

    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize((width, height), Image.BICUBIC))


def _upsample(grid: np.ndarray, size: int, scale: float = 1.0) -> np.ndarray:
    """A small (h, w, 3) grid of values in +-127/scale bicubically stretched to size x size: a smooth field.

    One 8-bit RGB resize instead of three float ones; the grid is stored as 128 + scale * value.
    """
    from PIL import Image

    coded = np.clip(np.round(128 + scale * grid), 0, 255).astype(np.uint8)
    return (np.asarray(Image.fromarray(coded).resize((size, size), Image.BICUBIC), dtype=np.float32) - 128) / scale


def background(rng: np.random.Generator, size: int, clutter: float = 1.0) -> np.ndarray:
    """Clutter without objects: a smooth random colour field plus mid-frequency texture of random strength."""
    cells = int(rng.integers(3, 5))
    colours = rng.uniform(0, 255, (cells, cells, 3))
    mean = colours.mean(axis=(0, 1))
    colours = mean + (colours - mean) * rng.uniform(0.35, 0.8)  # tamer than raw random colours: clutter, not glare
    field = _upsample(colours - 128, size)
    grain = int(rng.integers(max(2, size // 6), max(3, size // 3) + 1))
    shade = rng.normal(0, 1, (grain, grain, 1)) + 0.5 * rng.normal(0, 1, (grain, grain, 3))
    return field + 128 + _upsample(shade, size, scale=32.0) * (rng.uniform(6, 24) * clutter)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ LUMA


def pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour whose luminance differs by MIN_CONTRAST from most of the background pixels `under` it.

    The luminance is drawn from the feasible dark or light range, then a random hue is mixed toward black or
    white to hit it exactly: no rejection loop, and colour alone never gives the class away.
    """
    below = np.sort(_luma(under)) if len(under) else np.array([128.0])
    lo, hi = below[(len(below) - 1) // 10], below[(len(below) - 1) * 9 // 10]  # 10th and 90th percentiles
    ranges = [(0.0, lo - MIN_CONTRAST), (hi + MIN_CONTRAST, 255.0)]
    feasible = [(a, b) for a, b in ranges if b >= a]
    if feasible:
        a, b = feasible[int(rng.integers(len(feasible)))]
        target = rng.uniform(a, b)
    else:  # a background too varied for any colour: take the extreme that contrasts most with its worst pixel
        target = 0.0 if lo >= 255.0 - hi else 255.0
    colour = rng.uniform(0, 255, 3)
    luma = float(_luma(colour))
    if target <= luma:
        return colour * (target / max(luma, 1e-6))
    return 255.0 - (255.0 - colour) * ((255.0 - target) / max(255.0 - luma, 1e-6))


def _paint(canvas: np.ndarray, ink: np.ndarray, x: int, y: int, rng: np.random.Generator) -> None:
    """Blend a colour chosen against the pixels under the ink into canvas at (x, y), in place."""
    h, w = ink.shape
    region = canvas[y:y + h, x:x + w]
    colour = pick_colour(rng, region[ink > 0.5])
    region += ink[..., None] * (colour - region)


def _alpha(ink: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scan ink upsampled bicubically, its soft ramp steepened: large strokes keep crisp edges, loops stay open."""
    return np.clip((_resize(ink, width, height) - 0.2) / 0.6, 0.0, 1.0)


def digit_mask(scan: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 scan (ink 0..1) as a side x side alpha mask in [0, 1].

    Scans are cropped tight, ink touches their edges: upsampling them with a blank cell of margin, then cutting
    the margin off, lets those strokes end softly instead of in straight cuts along the box.
    """
    margin = max(1, round(side / 8))
    return _alpha(np.pad(scan, 1), side + 2 * margin, side + 2 * margin)[margin:margin + side, margin:margin + side]


def fragment_windows(scans: np.ndarray) -> np.ndarray:
    """Every sub-window of `scans` fit to be a fragment, as rows (scan, top, left, rows, cols).

    Windows with little ink (empty corners), mostly ink (a blob) or one straight stroke (a "1") are left out.
    Computed once per pool, so that a fragment is one draw rather than a rejection loop.
    """
    from numpy.lib.stride_tricks import sliding_window_view

    found = []
    for rows, cols in WINDOWS:
        win = sliding_window_view(scans, (rows, cols), axis=(1, 2))  # (n, 9 - rows, 9 - cols, rows, cols)
        ink = win.sum(axis=(-2, -1))
        k, r, c = np.nonzero((ink >= MIN_FRAGMENT_INK) & (ink <= 0.55 * rows * cols) & ~_bars(win))
        found.append(np.stack([k, r, c, np.full_like(k, rows), np.full_like(k, cols)], axis=1))
    return np.concatenate(found)


def _bars(win: np.ndarray) -> np.ndarray:
    """Which windows hold a straight stroke (all ink within two adjacent lines): it reads as a "1" upright."""
    inked = win > 0.3
    bar = ~inked.any(axis=(-2, -1))
    for axis in (-2, -1):
        lines = inked.any(axis=axis)
        first, last = lines.argmax(axis=-1), lines.shape[-1] - 1 - lines[..., ::-1].argmax(axis=-1)
        bar |= last - first <= 1
    return bar


def fragment(rng: np.random.Generator, scans: np.ndarray, windows: np.ndarray,
             cell: float) -> tuple[int, np.ndarray] | None:
    """A broken stroke: one of `windows` (see fragment_windows) drawn at `cell` pixels per scan cell, as alpha.

    One that closes a loop once drawn (a "0") is redrawn; the rest are turned and mirrored at random, so no
    piece of a digit keeps its reading, and never into a corner that reads as a "7". None when a few tries
    find nothing; the row of `scans` otherwise.
    """
    for _ in range(8):
        if not len(windows):
            return None
        k, r, c, rows, cols = (int(v) for v in windows[rng.integers(len(windows))])
        mask = fragment_mask(np.pad(scans[k], 1)[r:r + rows + 2, c:c + cols + 2], cell)
        if _has_hole(mask > 0.1):  # nearly closed counts: noise closes the gap
            continue
        start = int(rng.integers(8))
        for turn in (start + t for t in range(8)):
            if not _is_seven(_turn(scans[k, r:r + rows, c:c + cols], turn)):
                return k, np.ascontiguousarray(_turn(mask, turn))
    return None


def _turn(a: np.ndarray, turn: int) -> np.ndarray:
    """One of the square's 8 symmetries: turn % 4 quarter turns, mirrored first when turn % 8 >= 4."""
    return np.rot90(a[:, ::-1] if turn % 8 >= 4 else a, turn % 4)


def _is_seven(window: np.ndarray) -> bool:
    """A bar along the top of the ink with strokes hanging below it: a corner or a T, which reads as a 7."""
    inked = window > 0.4
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    return len(rows) >= 3 and len(cols) >= 2 and inked[rows[0], cols[0]:cols[-1] + 1].mean() >= 0.6


def _has_hole(ink: np.ndarray) -> bool:
    """Whether the ink encloses blank pixels."""
    from scipy.ndimage import binary_fill_holes

    return bool((binary_fill_holes(ink) & ~ink).any())


def _taper(n: int, cell: float) -> np.ndarray:
    """1 inside a window n pixels long, falling linearly to 0 across its one-cell margins."""
    t = np.arange(n) + 0.5
    return np.clip(np.minimum(t, n - t) / cell, 0.0, 1.0)


def fragment_mask(context: np.ndarray, cell: float) -> np.ndarray:
    """A window with one cell of scan around it as an alpha mask: strokes fade out at the cut, like broken ones."""
    h, w = (max(3, round(n * cell)) for n in context.shape)
    return _alpha(context, w, h) * np.outer(_taper(h, cell), _taper(w, cell))


def _place(rng: np.random.Generator, size: int, h: int, w: int, box: tuple[int, int, int]) -> tuple[int, int]:
    """A random spot for an h x w fragment, preferring ones that overlap the digit's box by at most 15 %.

    The box counts one scan cell wider on each side, so strokes that reach the box's edge keep a gap.
    """
    grow = box[2] // 8
    bx, by, side = box[0] - grow, box[1] - grow, box[2] + 2 * grow
    best, best_overlap = (0, 0), float("inf")
    for _ in range(12):
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        ox = max(0, min(x + w, bx + side) - max(x, bx))
        oy = max(0, min(y + h, by + side) - max(y, by))
        overlap = ox * oy / (w * h)
        if overlap <= 0.15:
            return x, y
        if overlap < best_overlap:
            best, best_overlap = (x, y), overlap
    return best


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _draw_fragments(rng: np.random.Generator, canvas: np.ndarray, scans: np.ndarray, windows: np.ndarray,
                    box: tuple[int, int, int], digit_range: tuple[int, int], clutter: float = 1.0) -> list[int]:
    """Paint 1 to 4 partial scans (times `clutter`, rounded) at digit-like scales; return their rows in `scans`."""
    used = []
    for _ in range(math.floor(int(rng.integers(1, 5)) * clutter + 0.5)):
        cell = _log_uniform(rng, digit_range[0] / 8, digit_range[1] / 8)  # pixels per scan cell, as for digits
        found = fragment(rng, scans, windows, cell)
        if found is None:
            continue
        k, mask = found
        x, y = _place(rng, canvas.shape[0], *mask.shape, box)
        _paint(canvas, mask, x, y, rng)
        used.append(k)
    return used


def render_scene(rng: np.random.Generator, scan: np.ndarray, scans: np.ndarray, size: int = 96,
                 digit_range: tuple[int, int] = (20, 64),
                 windows: np.ndarray | None = None, clutter: float = 1.0) -> tuple[np.ndarray, dict[str, Any]]:
    """One scene: `scan` (8x8 ink 0..1) drawn over clutter and fragments of `scans`; a uint8 (size, size, 3) image.

    The metadata holds the digit's box [x, y, side] and the rows of `scans` the fragments came from. Pass
    `windows=fragment_windows(scans)` when rendering many scenes from the same scans. `clutter` scales the
    texture, the number of fragments and the pixel noise (0: a smooth colour field and the digit alone).
    """
    windows = fragment_windows(scans) if windows is None else windows
    canvas = background(rng, size, clutter)
    side = min(size, max(digit_range[0], min(digit_range[1], round(_log_uniform(rng, *digit_range)))))
    box = (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1)), side)
    fragments = _draw_fragments(rng, canvas, scans, windows, box, digit_range, clutter)
    _paint(canvas, digit_mask(scan, side), box[0], box[1], rng)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(rng.uniform(4, 16) * clutter)
    image = np.clip(canvas, 0, 255).round().astype(np.uint8)
    return image, {"box": list(box), "fragments": fragments}


# --- the data set -------------------------------------------------------------------------------------------


def _save_png(image: np.ndarray, path: Path) -> None:
    """Fixed encoder settings and no metadata: the same pixels always give the same bytes."""
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=6)


def _write_split(tmp: Path, name: str, number: int, count: int, pool: np.ndarray, scans: np.ndarray,
                 targets: np.ndarray, size: int, digit_range: tuple[int, int], seed: int,
                 clutter: float = 1.0) -> list[dict[str, Any]]:
    """Write one split's images into tmp/name; image i has class i % 10 and its own seeded generator."""
    by_class = {c: pool[targets[pool] == c] for c in range(10)}
    fragment_scans = scans[pool]  # distractors come from this split's scans only: splits stay disjoint
    windows = fragment_windows(fragment_scans)
    (tmp / name).mkdir()
    for label in range(min(count, 10)):
        (tmp / name / str(label)).mkdir()
    records = []
    for i in range(count):
        rng = np.random.default_rng([seed, number, i])
        label = i % 10
        index = int(rng.choice(by_class[label]))
        image, info = render_scene(rng, scans[index], fragment_scans, size, digit_range, windows, clutter)
        file = f"{name}/{label}/{i:05d}.png"
        _save_png(image, tmp / file)
        records.append({"file": file, "label": label, "scan": index, "box": info["box"],
                        "fragments": [int(pool[k]) for k in info["fragments"]]})
    return records


def _json_text(meta: dict[str, Any]) -> str:
    """Indented JSON with each pool and each image on one line: readable, and a fifth of indent=2's size."""
    head = {k: v for k, v in meta.items() if k != "splits"}
    lines = ["{", *(f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()), '  "splits": {']
    for n, (name, split) in enumerate(meta["splits"].items()):
        images = ",\n".join(f"      {json.dumps(r)}" for r in split["images"])
        end = "," if n < len(meta["splits"]) - 1 else ""
        lines += [f"    {json.dumps(name)}: {{", f'      "pool": {json.dumps(split["pool"])},',
                  f'      "images": [\n{images}\n      ]' if images else '      "images": []', f"    }}{end}"]
    return "\n".join([*lines, "  }", "}", ""])


def write_scenes(out: str | Path, size: int = 96, counts: dict[str, int] | None = None,
                 digit_range: tuple[int, int] = (20, 64), seed: int = 0, force: bool = False,
                 clutter: float = 1.0) -> dict[str, int]:
    """Write OUT/{train,val,test}/<class>/<index>.png and OUT/scenes.json; return the image count per split.

    Everything is written into a hidden folder inside OUT first and moved into place at the end, so an
    interrupted run leaves no partial data set and an old one survives a failed --force (digits.staged_set).
    """
    out = Path(out)
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    digit_range = (int(digit_range[0]), int(digit_range[1]))
    check_options(size, digit_range, counts)
    check_absent(out, force)  # before minutes of work, not when moving the result into place
    scans, targets = load_scans()
    with staged_set(out, "scenes", force) as tmp:  # OUT locked against a second writer while it runs
        meta = _generate(tmp, scans, targets, size, counts, digit_range, seed, clutter)
        (tmp / "scenes.json").write_text(_json_text(meta), encoding="utf-8")
        move_into_place(tmp, out, (*SPLITS, "scenes.json"))
    return {name: counts[name] for name in SPLITS}


def _generate(tmp: Path, scans: np.ndarray, targets: np.ndarray, size: int, counts: dict[str, int],
              digit_range: tuple[int, int], seed: int, clutter: float = 1.0) -> dict[str, Any]:
    """Write every split into tmp and return the scenes.json contents."""
    meta: dict[str, Any] = {"format": "vggspec-scenes", "version": VERSION, "seed": seed, "size": size,
                            "counts": {s: counts[s] for s in SPLITS}, "digit_range": list(digit_range),
                            "clutter": clutter, "fractions": list(FRACTIONS), "source": "sklearn.datasets.load_digits",
                            "splits": {}}
    for number, (name, pool) in enumerate(split_indices(targets, FRACTIONS, seed).items()):
        images = _write_split(tmp, name, number, counts[name], pool, scans, targets, size, digit_range, seed,
                              clutter)
        meta["splits"][name] = {"pool": pool.tolist(), "images": images}
    return meta


# --- a look at it -------------------------------------------------------------------------------------------


def _first_images(folder: Path, n: int) -> list[tuple[np.ndarray, int]]:
    """The first n images of a written data set (train first, then val, test), with their labels."""
    from PIL import Image

    try:
        meta = json.loads((folder / "scenes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError("holds no readable scenes.json", str(folder), "write it with `vggspec data scenes`") from exc
    records = [r for s in SPLITS for r in meta["splits"][s]["images"]][:n]
    return [(np.asarray(Image.open(folder / r["file"]).convert("RGB")), r["label"]) for r in records]


def preview(source: str | Path | Sequence[tuple[np.ndarray, int]], path: str | Path, rows: int = 4,
            cols: int = 6) -> Path:
    """Write a rows x cols grid of scenes titled with their labels to PNG `path`: to see what a net will see.

    `source` is a folder written by write_scenes or a sequence of (image, label) pairs. The grid is saved
    with a 256-colour palette: noisy scenes in full colour would take three times the bytes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    items = _first_images(Path(source), rows * cols) if isinstance(source, (str, Path)) else list(source)
    fig = Figure(figsize=(1.5 * cols, 1.65 * rows), dpi=100)
    canvas = FigureCanvasAgg(fig)
    for k, ax in enumerate(fig.subplots(rows, cols, squeeze=False).ravel()):
        ax.set_axis_off()
        if k < len(items):
            ax.imshow(items[k][0], interpolation="nearest")
            ax.set_title(f"label {items[k][1]}", fontsize=10)
    fig.tight_layout(pad=0.4)
    canvas.draw()
    grid = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3]).quantize(256)
    with atomic_path(path, suffix=".png") as tmp:
        grid.save(tmp, format="PNG", optimize=True)
    return Path(path)
