"""Section 5: cost per image of the paper's testing protocols for D (section 3.2), on vggspec's runtime.

dense: the fully convolutional D over the whole image at Q = 256, 384, 512, each with its mirror;
multi-crop: 5 x 5 crops x 2 flips x 3 scales = 150 crops of 224 through the standard D (batches of 50);
combined: both. Each is a `vggspec.runtime.Runner` over one 375 x 500 image (ImageNet's typical
size), timed end to end (decode, rescale, crop, normalise, onnxruntime), interleaved; the MACs each
protocol needs are computed from the layer graph for comparison.
"""

from __future__ import annotations

from pathlib import Path

from .common import Config, d_onnx, interleave, median, paired_ratio
from .precision import synthetic_images
from .report import Section

TITLE = "5. Evaluation protocols for D: cost per image"
IMAGE_HW = (375, 500)
CROPS_PER_SCALE = 50  # 5 x 5 grid and mirrors


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only protocols" + (" --quick" if cfg.quick else "")


def _scaled(q: int) -> tuple[int, int]:
    """The image's size once its smaller side is Q (as runtime.preprocess.rescale does)."""
    h, w = IMAGE_HW
    s = q / min(h, w)
    return round(h * s), round(w * s)


def protocol_gmacs(scales: tuple[int, ...]) -> dict[str, float]:
    """GMACs per image of each protocol, from the layer graph (two passes per scale: image and mirror)."""
    from vggspec import fully_conv, load_spec

    graph = load_spec("D")
    dense = sum(2 * fully_conv(graph, _scaled(q)).macs for q in scales) / 1e9
    crops = len(scales) * CROPS_PER_SCALE * graph.macs / 1e9
    return {"dense": dense, "multi-crop": crops, "combined": dense + crops}


def _runners(cfg: Config, scales: tuple[int, ...]) -> dict[str, object]:
    from vggspec.runtime import Member, Protocol, Runner, load

    dense = load(d_onnx(cfg, "d_dense_fp32.onnx", fully_conv=True), device="cpu", threads=cfg.threads)
    standard = load(d_onnx(cfg, "d_fp32.onnx"), device="cpu", threads=cfg.threads)
    member = Member(dense=dense, crop=standard)
    return {name: Runner([member], [Protocol(name, scales, flip=True)]) for name in ("dense", "multi-crop", "combined")}


def _warm_up(runners: dict[str, object], image: Path) -> None:
    """One dense pass and one batch of 50 crops, so no timed run pays for onnxruntime's first-run allocations."""
    import numpy as np

    runners["dense"].run(image)  # type: ignore[attr-defined]
    standard = runners["multi-crop"].members[0].crop  # type: ignore[attr-defined]
    standard.run(np.zeros((CROPS_PER_SCALE, 3, 224, 224), np.float32))


def run(cfg: Config) -> Section:
    section = Section("protocols", TITLE, command(cfg))
    scales = (256,) if cfg.quick else (256, 384, 512)
    image: Path = synthetic_images(cfg.path("protocol_image"), 1, seed=3, size=IMAGE_HW)[0]
    runners = _runners(cfg, scales)
    _warm_up(runners, image)
    # All three interleaved: a load change during the run then shifts each of them alike.
    fns = {name: (lambda r=r: r.run(image)) for name, r in runners.items()}
    t = interleave(fns, cfg.reps(2, 1), warmup=0)
    gmacs = protocol_gmacs(scales)
    for name in ("dense", "multi-crop", "combined"):
        sec = median(t[name])
        section.add(f"{name}: time per image", sec, "s",
                    detail=f"{gmacs[name]:.0f} GMAC, {2 * gmacs[name] / sec:.0f} GFLOP/s, {len(t[name])} runs")
    ratio = paired_ratio(t["multi-crop"], t["dense"])
    section.add("multi-crop / dense time", ratio, "x",
                detail=f"MAC ratio {gmacs['multi-crop'] / gmacs['dense']:.1f}x")
    section.add("combined / dense time", paired_ratio(t["combined"], t["dense"]), "x",
                detail=f"MAC ratio {gmacs['combined'] / gmacs['dense']:.1f}x")
    section.notes.append(f"Scales Q = {', '.join(map(str, scales))}, flips on; one {IMAGE_HW[0]}x{IMAGE_HW[1]} "
                         "image, reported per image. The dense form's work grows with the image area, so its "
                         "advantage is smaller for larger images and larger Q.")
    return section
