"""`vggspec predict`, `vggspec eval`, `vggspec fuse`: onnxruntime inference, the paper's protocols, fusion.

Nothing heavy is imported at import time (onnxruntime, Pillow, matplotlib load inside the commands),
so `vggspec --help` stays fast; torch is never imported on this path.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..display import terminal
from ..limits import MAX_PREPROCESSING, MIN_STD
from .common import FiniteRange, bounded, examples, fail, not_empty, parse_hw

if TYPE_CHECKING:
    from ..runtime import Member, Model, Protocol, Report, Runner
    from ..runtime.members import ModelOptions

F = TypeVar("F", bound=Callable[..., Any])
PROTOCOL_CHOICE = click.Choice(["dense", "multi-crop", "combined"])


# ---------------------------------------------------------------- option parsing


def parse_scales(text: str) -> tuple[int | None, ...]:
    """`256,384,512` -> (256, 384, 512); `native` keeps the image's own size (dense models)."""
    scales: list[int | None] = []
    for part in (p.strip() for p in text.split(",")):
        if part.lower() == "native":
            scales.append(None)
            continue
        try:
            q = int(part)
        except ValueError:
            raise click.BadParameter(f"'{part}' is not a test scale; give pixels, e.g. 224,256,288") from None
        if q < 1:
            raise click.BadParameter(f"test scale {q} must be positive")
        scales.append(q)
    if not scales:
        raise click.BadParameter("give at least one scale")
    return tuple(scales)


def _floats(text: str | None, what: str, positive: bool = False) -> tuple[float, ...] | None:
    """A comma-separated list of finite numbers (positive ones: a std divides, a zero one by zero)."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise click.BadParameter(f"--{what} '{text}' is not a comma-separated list of numbers") from None
    if not values or not all(_usable(v, positive) for v in values):
        kind = f"numbers from {MIN_STD:g} to {MAX_PREPROCESSING:g}" if positive else \
            f"numbers from -{MAX_PREPROCESSING:g} to {MAX_PREPROCESSING:g}"
        raise click.BadParameter(f"--{what} '{text}' must be {kind}, one per channel (or one for all)")
    return values


def _usable(value: float, positive: bool) -> bool:
    """Finite, and (limits) small enough that normalised pixels stay finite float32 numbers."""
    if not (math.isfinite(value) and abs(value) <= MAX_PREPROCESSING):
        return False
    return value >= MIN_STD if positive else True


def read_labels(path: str | None) -> tuple[str, ...] | None:
    """The --labels file, when given (vggspec.labels reads it)."""
    from ..labels import read_labels as read

    return None if path is None else read(path)


def _overrides(size: str | None, mean: str | None, std: str | None, scale: float | None,
               labels: str | None) -> Any:
    from ..runtime import Overrides

    if scale is not None and not _usable(scale, positive=True):
        raise click.BadParameter(f"--scale {scale} must be a number from {MIN_STD:g} to {MAX_PREPROCESSING:g}, "
                                 "e.g. 0.00392 (1/255)")
    return Overrides(size=parse_hw(size), mean=_floats(mean, "mean"), std=_floats(std, "std", positive=True),
                     scale=scale, labels=read_labels(labels))


OVERRIDES = ("Needed for a model without vggspec metadata; for one with it, replaces the model's own value "
             "(with a note on stderr).")
MODEL_FLAGS = ("dense_model", "crop_model", "ensemble", "flip", "device", "threads", "batch_size", "labels", "size",
               "mean", "std", "scale", "max_memory", "timeout_per_image")


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from ..runtime.memory import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def model_options(f: F) -> F:
    """The options shared by predict and eval, handed to the command as one ModelOptions (`models`)."""
    options = [
        click.option("--dense-model", metavar="M.onnx", type=click.Path(dir_okay=False),
                     help="The fully convolutional form, when MODEL is the standard one (for combined)."),
        click.option("--crop-model", metavar="M.onnx", type=click.Path(dir_okay=False),
                     help="The standard form, when MODEL is the dense one (for combined; a dense model "
                          "can do the crops itself)."),
        click.option("--ensemble", "ensemble", multiple=True, metavar="M.onnx",
                     help="Another model whose posteriors are averaged in (ConvNet fusion); repeat, "
                          "or comma-separate."),
        click.option("--flip/--no-flip", default=None,
                     help="Average with the mirror image (dense), or add the crops' mirrors (multi-crop: 50 crops). "
                          "Default: as the model says (trained with flips or not), else flip."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
                     show_default=True, help="auto: the first of TensorRT, CUDA, CPU that initialises; "
                                             "cuda/tensorrt fail rather than fall back."),
        click.option("--threads", type=bounded("threads", 1), metavar="N", help="onnxruntime intra-op threads."),
        click.option("--batch-size", type=bounded("batch_size", 1), default=10, show_default=True,
                     help="Crops per onnxruntime run (memory grows with it)."),
        click.option("--labels", "labels", metavar="FILE", type=click.Path(dir_okay=False),
                     help="Class names: one per line, or a JSON list (default: the model's)."),
        click.option("--size", metavar="HxW", help=f"Input size (crop size; a dense model's minimum). {OVERRIDES}"),
        click.option("--mean", metavar="M1,M2,M3", help=f"Per-channel mean. {OVERRIDES}"),
        click.option("--std", metavar="S1,S2,S3", help=f"Per-channel std, positive. {OVERRIDES}"),
        click.option("--scale", type=float, metavar="X",
                     help=f"Pixel scale before mean/std (default: the model's, else 1/255). {OVERRIDES}"),
        click.option("--max-memory", metavar="SIZE", callback=_memory,
                     help="Memory one image's dense pass may take, counting the network's activations at that size "
                          "(e.g. 4G); larger images are refused one by one. Default 1.5G."),
        click.option("--timeout-per-image", type=FiniteRange(0, 86400, min_open=True), default=300,
                     show_default=True, metavar="SECONDS",
                     help="Stop a model run that takes longer, naming the image."),
    ]

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        flags = {k: kwargs.pop(k) for k in MODEL_FLAGS}
        kwargs["models"] = _model_options(kwargs.pop("model"), flags)
        return f(*args, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command  # type: ignore[return-value]


def _model_options(model: str, flags: dict[str, Any]) -> ModelOptions:
    from ..runtime.members import ModelOptions
    from ..runtime.session import Limits

    labels = flags.pop("labels")
    overrides = _overrides(flags.pop("size"), flags.pop("mean"), flags.pop("std"), flags.pop("scale"), labels)
    memory, seconds = flags.pop("max_memory"), flags.pop("timeout_per_image")
    limits = Limits(seconds=seconds) if memory is None else Limits(memory, seconds)
    return ModelOptions(model=model, overrides=overrides, labels_file=labels, limits=limits, **flags)


def _export_checkpoint(checkpoint: str, folder: Path) -> Any:
    """The ONNX backend's two-form export of a checkpoint (torch-free), for the runtime to call.

    Imported when called: an .onnx model never loads the compiler.
    """
    from ..checkpoints import export_forms

    return export_forms(checkpoint, folder)


@contextmanager
def _runner(models: ModelOptions, protocols: Sequence[str], scale_sets: Sequence[Any]) -> Iterator[Runner]:
    """open_runner, and a note on stderr for each setting the models do not take as given."""
    from ..runtime.members import open_runner

    with open_runner(models, protocols, scale_sets, _export_checkpoint) as runner:
        for note in _notes(runner, models, bool(scale_sets)):
            click.echo(f"note: {terminal(note)}", err=True)
        yield runner


def _notes(runner: Runner, opts: ModelOptions, scales_given: bool = False) -> list[str]:
    """The test scales and flip taken from the models, --size/--mean/--std/--scale replacing a vggspec model's
    own values (deliberate or not, results change), and no flip that a graph flipping itself cannot follow."""
    from ..runtime.protocols import defaults_note

    own = defaults_note([m for mem in runner.members for m in mem.models], scales_given, opts.flip is not None,
                        _used(runner, runner.protocols))
    notes = [own] if own else []
    changed = [m for mem in runner.members for m in mem.models if m.info.overridden]
    if changed:
        keys = list(dict.fromkeys(k for m in changed for k in m.info.overridden))
        verb = "replaces its value" if len(keys) == 1 else "replace their values"
        notes.append(f"{', '.join('--' + k for k in keys)} {verb} in the vggspec metadata of {_names(changed)}")
    flipping = [m for m in _used(runner, runner.protocols) if m.info.flip]
    if flipping and not all(p.flip for p in runner.protocols):
        asked = "--no-flip" if opts.flip is False else "the model's own test flip (none)"
        notes.append(f"{_names(flipping)}: the graph averages each image with its mirror itself (exported with "
                     f"--flip); {asked} cannot undo that, so these results are flipped")
    return notes


def _names(models: list[Model]) -> str:
    return ", ".join(dict.fromkeys(m.shown for m in models))


def _used(runner: Runner, protocols: Sequence[Protocol]) -> list[Model]:
    """The models that run for `protocols` (a member's dense form does not run for multi-crop)."""
    return [mem.model(kind) for mem in runner.members for proto in protocols for kind in proto.kinds]


def _flip_note(protocol: Protocol, runner: Runner) -> bool:
    """The flip really applied: a graph exported with flip averages its mirror whatever --no-flip says."""
    return protocol.flip or any(m.info.flip for m in _used(runner, [protocol]))


def _error_line(path: str, message: str) -> None:
    click.echo(f"{terminal(path)}: error: {terminal(message)}", err=True)


# ---------------------------------------------------------------- predict


@click.command(epilog=examples(
    "vggspec predict d_dense.onnx cat.jpg --scales 256,384,512 --heatmap heat/",
    "vggspec predict d.safetensors cat.jpg --protocol combined --scales 256,384,512"))
@click.argument("model", metavar="MODEL", type=click.Path(dir_okay=False))
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--protocol", type=PROTOCOL_CHOICE, default=None,
              help="dense (fully conv model), multi-crop (5x5 grid + mirrors), combined (their average). "
                   "Default: dense for a fully convolutional model, else multi-crop.")
@click.option("--scales", metavar="Q1,Q2,...", default=None,
              help="Test scales (smallest image side), e.g. 256,384,512; `native`: no rescaling (dense). "
                   "Default: the model's own test scales (from its training scales), else its input side.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@click.option("--heatmap", metavar="DIR", type=click.Path(file_okay=False), callback=not_empty,
              help="Write the top class's score map over each image to DIR/<image>.png (needs a `scores` output).")
@model_options
def predict(images: tuple[str, ...], protocol: str | None, scales: str | None, top: int, as_json: bool,
            heatmap: str | None, models: ModelOptions) -> None:
    """Classify images with MODEL on onnxruntime, with the paper's testing protocols (section 3.2).

    MODEL is an .onnx file, or a vggspec checkpoint (.safetensors), from which both forms are
    exported for the run (the combined protocol needs both).

    An image that cannot be used or fails to run gets one line on stderr naming it and why; the
    others are still classified, and the exit status is 1 when any failed. A model that fails on
    eight images in a row stops the run with one error.
    """
    from ..runtime.evaluate import run_each

    scale_sets = [parse_scales(scales)] if scales is not None else []  # '' is an error, not the default
    with _runner(models, [protocol] if protocol else [], scale_sets) as runner:
        proto = runner.protocols[0]
        heat_model = _heatmap_model(runner.members, heatmap)
        failed, used_names = 0, _reserved_names(images, heatmap)
        for image, results in zip(images, run_each(runner, images, _error_line), strict=True):
            if results is None:  # this image only (reported): the others are still classified
                failed += 1
                continue
            posterior = results[proto]
            _print_prediction(image, posterior, top, proto, runner, as_json)
            if heat_model is not None:
                _draw_heatmap(heat_model, image, proto, posterior, Path(heatmap), used_names)  # type: ignore
    if failed:
        click.echo(f"{failed} of {len(images)} images failed", err=True)
        sys.exit(1)


def _print_prediction(image: str, posterior: Any, top: int, proto: Protocol, runner: Runner, as_json: bool) -> None:
    from ..files import printable
    from ..runtime import top_k

    info = runner.lead.info
    best = top_k(posterior, top)
    if as_json:
        click.echo(json.dumps({
            "image": printable(image),
            "top": [{"index": i, "label": info.label(i), "probability": round(p, 6)} for i, p in best],
            "protocol": proto.name, "scales": list(proto.scales), "flip": _flip_note(proto, runner),
            "provider": runner.provider, "models": _model_names(runner),
        }))
        return
    flip = ", flip" if _flip_note(proto, runner) else ""
    click.echo(f"{terminal(image)}  ({proto.name}, Q={proto.scales_text}{flip}, {runner.provider})")
    for rank, (i, p) in enumerate(best, 1):
        click.echo(f"  {rank}. {terminal(info.label(i)):<24} {p:.4f}")


def _heatmap_model(members: list[Member], heatmap: str | None) -> Model | None:
    """The model drawing heatmaps: the first dense model with a `scores` output (checked before any work);
    the folder is made only then, so a run refused up front leaves nothing behind."""
    from ..errors import ModelError

    if heatmap is None:
        return None
    candidates = [m for mem in members for m in (mem.dense, mem.crop) if m is not None]
    model = next((m for m in candidates if "scores" in m.info.outputs and m.info.fully_conv), None)
    if model is None:
        raise ModelError("--heatmap needs a fully convolutional model with a `scores` output", candidates[0].shown,
                         "export one with `vggspec export --fully-conv --scores` (give it as MODEL or --dense-model)")
    Path(heatmap).mkdir(parents=True, exist_ok=True)
    return model


def _reserved_names(images: tuple[str, ...], heatmap: str | None) -> set[str]:
    """Heat-map names taken from the start: those of input images already at DIR/<name>.png, which the
    heat map would otherwise replace (it then gets <name>-2.png)."""
    from ..atomic import same_file

    if heatmap is None:
        return set()
    return {Path(i).stem for i in images if same_file(Path(heatmap) / f"{Path(i).stem}.png", i)}


def _draw_heatmap(model: Model, image: str, proto: Protocol, posterior: Any, folder: Path, used: set[str]) -> None:
    from ..runtime import heatmap, top_k
    from ..runtime.evaluate import IMAGE_ERRORS, image_error
    from ..runtime.session import ModelOutputError

    index, prob = top_k(posterior, 1)[0]
    name = Path(image).stem
    stem, n = name, 1
    while stem in used:  # two images with one name from different folders
        n += 1
        stem = f"{name}-{n}"
    used.add(stem)
    q = max((q for q in proto.scales if q is not None), default=None)
    try:
        written = heatmap(model, image, q, index, folder / f"{stem}.png", prob)
    except ModelOutputError:  # a score map that does not match the posteriors: no image would do better
        raise
    except IMAGE_ERRORS as exc:  # the prediction stands; only its picture is missing
        click.echo(f"{terminal(image)}: note: {terminal(image_error(exc))}", err=True)
        return
    # stderr: --json output stays one object per line
    click.echo(f"heat map of {terminal(image)}: {terminal(written)}", err=True)


# ---------------------------------------------------------------- eval


@click.command(name="eval", epilog=examples(
    "vggspec eval d_dense.onnx --data val/ --scales 256 --scales 256,384,512",
    "vggspec eval d_dense.onnx --data val/ --protocol dense --protocol multi-crop --protocol combined",
    "vggspec eval d_dense.onnx --ensemble e_dense.onnx --data val/ --predictions de.csv"))
@click.argument("model", metavar="MODEL", type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DIR", type=click.Path(file_okay=False),
              help="Labelled images: DIR/<class>/<image>; classes in sorted folder order unless the model has labels.")
@click.option("--protocol", "protocols", type=PROTOCOL_CHOICE, multiple=True,
              help="Repeat for several rows (Table 5). Default: dense for a fully convolutional model, "
                   "else multi-crop.")
@click.option("--scales", "scale_sets", metavar="Q1,Q2,...", multiple=True,
              help="A set of test scales; repeat for several rows (Tables 3-4), "
                   "e.g. --scales 256 --scales 256,384,512. Default: the model's own test scales (from its "
                   "training scales), else its input side.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
@click.option("--predictions", metavar="FILE.csv", default=None, callback=not_empty,
              help="Also write each image's true class and top-1 class under every row, one CSV line per image.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Run as Ray Data batch inference: on the cluster at ADDRESS (e.g. auto, ray://head:10001), "
                   "or on a local Ray instance without one. Image paths must be readable on every node.")
@click.option("--allow-mismatch", is_flag=True,
              help="Evaluate even when the class folders of --data are not the model's classes (names or count).")
@model_options
def evaluate(data: str, protocols: tuple[str, ...], scale_sets: tuple[str, ...], as_json: bool,
             predictions: str | None, ray_address: str | None, allow_mismatch: bool, models: ModelOptions) -> None:
    """Top-1 and top-5 error of MODEL (.onnx, or a .safetensors checkpoint: both forms) over a labelled image
    folder, one row per protocol and scale set."""
    if predictions:
        from ..atomic import check_output_path, check_writable

        check_output_path(predictions, models.inputs())  # before the evaluation, not after it
        check_writable(predictions)  # a folder that cannot be written to: now, not after the evaluation
    if ray_address is not None:
        import ray  # noqa: F401  (before any work: a missing extra names what to install)
    with _runner(models, protocols, [parse_scales(s) for s in scale_sets]) as runner:
        items, classes = _dataset(data, runner, allow_mismatch)
        _check_not_an_image(predictions, items)
        report = _run_eval(runner, items, ray_address, models)
    if as_json:
        click.echo(json.dumps(report.to_dict() | {
            "models": _model_names(runner), "data": data,
            "classes": len(classes), "provider": runner.provider}))
    elif report.images:
        _print_table(report, runner, data, len(classes), len(items))
    if predictions:  # after the report: a CSV that cannot be written (a full disk) is its own error, losing nothing
        from ..runtime.evaluate import write_predictions

        write_predictions(report, predictions, classes)
    if not report.images:
        fail(f"{terminal(data)}: error: none of the {len(items)} images could be evaluated (each is named above)")
    if report.failed:
        click.echo(f"{len(report.failed)} of {len(items)} images failed", err=True)
        sys.exit(1)


def _check_not_an_image(predictions: str | None, items: list[tuple[Path, int]]) -> None:
    """--predictions naming one of the images of --data would overwrite it with the CSV: refused before the
    evaluation. A path that does not exist yet is none of them, and costs no look at each image."""
    from ..atomic import check_output_path

    if predictions and Path(predictions).exists():
        check_output_path(predictions, [("an image of --data", path) for path, _ in items])


def _model_names(runner: Runner) -> list[str]:
    return [m.shown for mem in runner.members for m in mem.models]


def _dataset(data: str, runner: Runner, allow_mismatch: bool) -> tuple[list[tuple[Path, int]], list[str]]:
    """--data's images and class indices (runtime.list_dataset: folders that are not the model's classes are
    refused there, unless --allow-mismatch), for a local and a Ray evaluation alike."""
    from ..runtime import list_dataset

    info = runner.lead.info
    return list_dataset(data, info.labels, info.classes, allow_mismatch)


def _run_eval(runner: Runner, items: list, ray_address: str | None, models: ModelOptions) -> Report:
    """evaluate() locally (a rich progress bar on a terminal) or on Ray; one error line per bad file."""
    from ..runtime import evaluate as run

    if ray_address is not None:
        from ..runtime.ray_eval import evaluate_on_ray

        return evaluate_on_ray(runner, items, None if ray_address == "local" else ray_address, models.device,
                               models.threads, models.overrides, on_error=_error_line,
                               on_wait=lambda text: click.echo(f"note: {terminal(text)}", err=True))
    if not sys.stderr.isatty():
        return run(runner, items, on_error=_error_line)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=len(items))
        return run(runner, items, on_error=lambda p, m: console.print(f"{terminal(p)}: error: {terminal(m)}",
                                                                      markup=False),
                   on_step=lambda: bar.advance(task))


def _print_table(report: Report, runner: Runner, data: str, classes: int, total: int) -> None:
    """Rows shaped like the paper's Tables 3-5: config, evaluation method, test scales, top-1/top-5 error."""
    config = terminal("+".join(mem.models[0].info.name for mem in runner.members))
    header = ("ConvNet", "evaluation method", "test scale Q", "top-1 err (%)", "top-5 err (%)")
    rows = [(config, p.name + (" + flip" if _flip_note(p, runner) else ""), p.scales_text,
             f"{s.top1:.1f}", f"{s.top5:.1f}") for p, s in report.scores.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    click.echo(f"{terminal(data)}: {total} images, {classes} classes")
    for row in [header, *rows]:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        click.echo("  ".join(cells))
    click.echo(f"{report.images} images in {report.seconds:.2f} s: {report.images_per_s:.1f} images/s "
               f"on {runner.provider}")


# ---------------------------------------------------------------- fuse


@click.command(epilog=examples("vggspec fuse d_dense.onnx e_dense.onnx -o de_dense.onnx"))
@click.argument("models", metavar="M1.onnx M2.onnx...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", callback=not_empty, required=True, metavar="ENS.onnx",
              help="The fused model to write (atomically).")
def fuse(models: tuple[str, ...], output: str) -> None:
    """ConvNet fusion (section 4.4): one ONNX graph running every model on the same input, posteriors averaged.

    The models must share input size, preprocessing and form (standard or fully convolutional, flip).
    """
    from ..runtime.fuse import fuse as write_fused

    path = write_fused(models, output)
    click.echo(f"wrote {path} ({len(models)} members, {path.stat().st_size / 1e6:.1f} MB)")


def register(main: click.Group) -> None:
    main.add_command(predict)
    main.add_command(evaluate)
    main.add_command(fuse)
