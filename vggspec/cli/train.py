"""`vggspec train` (section 3.1's recipe, one CPU to many GPUs under torchrun) and `vggspec data digits`.

torch is imported only inside the commands.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from ..display import terminal
from ..limits import MAX_CLUTTER, MAX_DATA_SIZE, MAX_LR, MAX_SCENES, MAX_WEIGHT_DECAY, scenes_bytes
from ..train.config import DEFAULTS, RESUMABLE_OVERRIDES, TrainingNote
from .common import Bounded, FiniteRange, bounded, examples, not_empty, set_option

# Images per split of `data scenes`; the hint says what the largest count would take on disk (--size 96).
SCENES = Bounded(0, MAX_SCENES, f"at most {MAX_SCENES:,} images per split (about "
                                f"{scenes_bytes(MAX_SCENES, 96) / 1e9:.0f} GB at --size 96)")

# The options a resumed run takes from the command line; the rest come from the run.
RESUMABLE = ", ".join(f"--{k.replace('_', '-')}" for k in RESUMABLE_OVERRIDES)


def _scale(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    from ..errors import VggspecError
    from ..train.augment import parse_scale

    if value is None:
        return None
    try:
        return parse_scale(value)
    except VggspecError as exc:
        raise click.BadParameter(exc.message) from None


def _lr_steps(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    text = (value or "").replace(",", " ").split()
    if not all(t.isdigit() and len(t) <= 6 for t in text):
        raise click.BadParameter(f"'{value}' is not a list of epochs, e.g. 15,18")
    steps = tuple(int(t) for t in text)
    if any(e < 1 for e in steps) or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise click.BadParameter(f"'{value}' is not a rising list of epochs from 1, e.g. 15,18")
    return steps


@click.command(epilog=examples(
    "vggspec train examples/digits.vgg --data data/digits -o runs/digits --batch-size 32 --epochs 15",
    "vggspec train D --data imagenet/ --scale 256:512 --weights runs/d384/model.safetensors --lr 1e-3",
    "vggspec train D --data imagenet/ --resume runs/d"))
@click.argument("spec", metavar="[SPEC]", required=False)
@click.option("--data", metavar="DIR", type=click.Path(file_okay=False),
              help="Image folder: DIR/train/<class>/* and DIR/val/<class>/*. Required, except with --resume.")
@click.option("-o", "--output", "rundir", metavar="RUNDIR", default=None, callback=not_empty,
              help="Run folder: model.safetensors, state/, metrics.jsonl, metrics.png. Default runs/<spec name>.")
@click.option("--scale", callback=_scale, metavar="S|SMIN:SMAX", default=DEFAULTS["scale"],
              help="Training scale: fixed S (256) or jittered per image (256:512). Default: input side x 256/224.")
@click.option("--batch-size", type=bounded("batch_size", 1), default=DEFAULTS["batch_size"], show_default=True,
              help="Global batch, over all processes.")
@click.option("--accumulate", type=bounded("batch_size", 1), default=DEFAULTS["accumulate"], show_default=True,
              help="Split each batch into N micro-batches whose gradients add up (for memory).")
@click.option("--lr", type=FiniteRange(0, MAX_LR, min_open=True), default=DEFAULTS["lr"], show_default=True,
              help="Learning rate (1e-3 to fine-tune).")
@click.option("--momentum", type=FiniteRange(0, 1, max_open=True), default=DEFAULTS["momentum"], show_default=True)
@click.option("--weight-decay", type=FiniteRange(0, MAX_WEIGHT_DECAY), default=DEFAULTS["weight_decay"],
              show_default=True)
@click.option("--epochs", type=bounded("epochs", 1), default=DEFAULTS["epochs"], show_default=True)
@click.option("--patience", type=click.IntRange(0), default=DEFAULTS["patience"], show_default=True,
              help="Epochs without a better val accuracy before the rate is divided by 10 "
                   f"(at most {DEFAULTS['max_decreases']} times), counted once the training loss has left "
                   "chance.")
@click.option("--lr-steps", callback=_lr_steps, metavar="E1,E2,...", default=None,
              help="A fixed schedule instead: divide the rate by 10 after each of these epochs (e.g. 15,18), "
                   "counted like --patience once the training loss has left chance; --patience is then unused.")
@click.option("--wait-at-chance", type=click.IntRange(0), default=DEFAULTS["wait_at_chance"], metavar="N",
              show_default=True,
              help="Epochs at chance before the net starts to learn, at most N, do not count toward --epochs: a "
                   "late starter gets as many epochs of learning as an early one (the schedule counts from the "
                   "start too).")
@click.option("--init-from", metavar="CKPT", default=DEFAULTS["init_from"],
              help="Initialise from a shallower net (the paper's A). Not with --weights.")
@click.option("--weights", metavar="CKPT", default=DEFAULTS["weights"],
              help="Start from these weights (fine-tuning). Not with --init-from.")
@click.option("--seed", type=bounded("seed"), default=DEFAULTS["seed"], show_default=True)
@click.option("--deterministic", is_flag=True, default=DEFAULTS["deterministic"],
              help="Deterministic kernels: a resumed run equals an uninterrupted one.")
@click.option("--save-every", type=click.IntRange(0), default=DEFAULTS["save_every"], metavar="STEPS",
              help="Also checkpoint every STEPS optimizer steps (always at the end of each epoch).")
@click.option("--resume", "resume", metavar="RUNDIR", default=None, callback=not_empty,
              help=f"Continue the run in RUNDIR where it stopped, with its own spec, --set options, data folder, "
                   f"settings and class folders (SPEC and --data may be left out); it takes only {RESUMABLE} "
                   "(a larger --epochs extends it).")
@click.option("--workers", type=bounded("workers"), default=DEFAULTS["workers"],
              help="DataLoader worker processes. Default: 0 when the decoded training set fits in memory (workers "
                   "would only add start-ups and copies), else 2.")
@click.option("--threads", type=bounded("threads"), default=DEFAULTS["threads"], show_default=True,
              help="torch threads per process (0: one per core). 1 can be faster when other jobs keep every core busy; "
                   "otherwise the default is (digits, 10 epochs, 2 cores at load 1.5: 11 s, against 15 s with 1).")
@click.option("--flip/--no-flip", default=DEFAULTS["flip"], show_default=True, help="Random horizontal flips.")
@click.option("--lighting", type=FiniteRange(0), default=DEFAULTS["lighting"], show_default=True,
              help="Std of AlexNet's PCA colour shift (0 turns it off).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=DEFAULTS["device"], show_default=True)
@click.option("--compile", is_flag=True, default=DEFAULTS["compile"], help="torch.compile the model.")
@click.option("--bf16", is_flag=True, default=DEFAULTS["bf16"], help="bfloat16 autocast.")
@click.option("--channels-last", is_flag=True, default=DEFAULTS["channels_last"],
              help="NHWC memory format (faster convolutions on GPUs).")
@click.option("--sync-bn", is_flag=True, default=DEFAULTS["sync_bn"],
              help="Under torchrun: batch norm over the global batch, not each process's slice "
                   "(N processes then train what one process trains).")
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help="The per-epoch progress bar.")
@set_option
@click.pass_context
def train(ctx: click.Context, spec: str | None, rundir: str | None, resume: str | None, sets: tuple[str, ...],
          **options: object) -> None:
    """Train SPEC's generated PyTorch module on an image folder with the paper's recipe.

    `vggspec train --resume RUNDIR` alone continues a run: its spec, --set options and data folder come
    from RUNDIR; options given that match the run's are accepted, others are named in a note.

    Under torchrun (`torchrun --nproc-per-node N -m vggspec train ...`) each process is one DDP rank;
    the global batch stays --batch-size and only rank 0 writes files. Fine-tuning at a lower rate, as the
    paper started S=384 from S=256: `vggspec train D --data DIR --weights runs/d256/model.safetensors
    --scale 384 --lr 1e-3 -o runs/d384`.

    The input's mean: the spec's `mean:` when it sets one (or --set mean=...); otherwise the training
    set's mean, as the paper subtracts it, printed in a note. The checkpoint stores the mean used.
    """
    from ..train import TrainConfig
    from ..train import train as run

    if resume and rundir and rundir != resume:
        raise click.UsageError("--resume RUNDIR trains into RUNDIR; leave out -o or give the same folder")
    if options["weights"] and options["init_from"]:
        raise click.UsageError("--weights and --init-from are alternatives (fine-tune this spec's net, or start a "
                               "deeper net from a shallower one's layers); give one")
    given = [k for k in options if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    overrides = {k: options[k] for k in given if k in RESUMABLE_OVERRIDES}
    if resume:
        config = _resumed(ctx, resume, spec, sets, {k: options[k] for k in given})
        overrides["data"] = config.data
    else:
        if spec is None:
            raise click.UsageError("Missing argument 'SPEC' (only --resume RUNDIR continues a run without it).")
        if options["data"] is None:
            raise click.UsageError("Missing option '--data'.")
        rundir = rundir or f"runs/{_spec_name(spec, sets)}"
        config = TrainConfig(spec=spec, sets=sets, rundir=rundir, **options)  # type: ignore[arg-type]
        overrides["data"] = options["data"]
    rundir = config.rundir
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        last = run(config, resume=resume is not None, overrides=overrides)
    if last.get("finished") and _is_rank0():
        click.echo(f"{rundir}: the run already finished its {last['epoch']} epochs; nothing to do. Continue it with "
                   f"`vggspec train --resume {rundir} --epochs {last['epoch'] + 10}` (any number above "
                   f"{last['epoch']}).")
    elif last and _is_rank0():
        click.echo(f"{rundir}: epoch {last['epoch']}, val top-1 error {100 * last['val_top1_err']:.2f}%, "
                   f"top-5 {100 * last['val_top5_err']:.2f}%; model in {rundir}/model.safetensors")


def _resumed(ctx: click.Context, rundir: str, spec: str | None, sets: tuple[str, ...],
             given: dict[str, Any]) -> Any:
    """The run's own config, with SPEC, --set and --data where given (the loop refuses another spec or
    other --set options, naming the run's); a note names each other option that differs from the run's."""
    from ..train.resume import differing, run_config

    run = run_config(rundir)
    changed = differing(run, given)
    if changed and _is_rank0():
        named = ", ".join(f"{_typed(ctx, k, v)} (the run's {_typed(ctx, k, getattr(run, k))})"
                          for k, v in changed.items())
        click.echo(f"note: resuming with the run's own settings; ignoring {named} "
                   f"(a resumed run takes only {RESUMABLE})", err=True)
    run.spec, run.sets = spec or run.spec, sets or run.sets
    run.data = given.get("data") or run.data
    return run


def _typed(ctx: click.Context, name: str, value: Any) -> str:
    """An option and its value as typed: --lr 0.5, --scale 256:512, --no-flip, --bf16, no --bf16."""
    param = next(p for p in ctx.command.params if p.name == name)
    flag = max(param.opts, key=len)
    if isinstance(value, bool):
        if param.secondary_opts:
            return flag if value else param.secondary_opts[0]
        return flag if value else f"no {flag}"
    if name == "scale":
        return f"{flag} {'default' if value is None else ':'.join(map(str, sorted(set(value))))}"
    return f"{flag} {value}"


def _show_warning(message: Warning | str, category: type[Warning], *_: object) -> None:
    # Skipped images and the like: one plain line each, not Python's file:line warning format.
    kind = "note" if issubclass(category, TrainingNote) else "warning"
    click.echo(f"{kind}: {terminal(str(message), keep_newlines=True)}", err=True)


def _spec_name(spec: str, sets: tuple[str, ...]) -> str:
    from .common import load_graph

    return load_graph(spec, sets).meta.name


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@click.group()
def data() -> None:
    """Data sets for training."""


@data.command(epilog=examples("vggspec data digits data/digits"))
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False), callback=not_empty)
@click.option("--size", type=click.IntRange(8, MAX_DATA_SIZE), default=32, show_default=True,
              help="Side of the written images.")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True,
              help="Seed of the stratified 70/15/15 split.")
@click.option("--force", is_flag=True, help="Replace the train/val/test folders if DIR already has them.")
def digits(out: str, size: int, seed: int, force: bool) -> None:
    """Write scikit-learn's 1797 handwritten digits (8x8 scans, bundled) as DIR/{train,val,test}/<digit>/*.png."""
    from ..datasets.digits import write_digits

    counts = write_digits(out, size=size, seed=seed, force=force)
    listed = ", ".join(f"{k} {v}" for k, v in counts.items())
    click.echo(f"wrote {out}: {listed} images, {size}x{size} grayscale")


@data.command(epilog=examples(
    "vggspec data scenes data/scenes --preview scenes.png",
    "vggspec data scenes data/easy --clutter 0.5 --min-digit 32"))
@click.argument("out", metavar="DIR", type=click.Path(file_okay=False), callback=not_empty)
@click.option("--size", type=click.IntRange(16, MAX_DATA_SIZE), default=96, show_default=True,
              help="Side of the written images.")
@click.option("--train", "n_train", type=SCENES, default=6000, show_default=True, help="Training images.")
@click.option("--val", "n_val", type=SCENES, default=1000, show_default=True, help="Validation images.")
@click.option("--test", "n_test", type=SCENES, default=2000, show_default=True, help="Test images.")
@click.option("--min-digit", type=click.IntRange(8), default=20, show_default=True,
              help="Smallest digit side in pixels (sides are log-uniform between the two).")
@click.option("--max-digit", type=click.IntRange(8), default=64, show_default=True,
              help="Largest digit side in pixels, at most --size.")
@click.option("--clutter", type=FiniteRange(0, MAX_CLUTTER), default=1.0, show_default=True,
              help="Scales the background texture, the number of stroke fragments and the pixel noise (0: none).")
@click.option("--seed", type=bounded("seed"), default=0, show_default=True,
              help="Seed of the 60/15/25 split and of every image.")
@click.option("--force", is_flag=True, help="Replace the train/val/test folders if DIR already has them.")
@click.option("--preview", metavar="PNG", default=None, help="Also write a grid of the first 24 scenes to PNG.")
def scenes(out: str, size: int, n_train: int, n_val: int, n_test: int, min_digit: int, max_digit: int,
           clutter: float, seed: int, force: bool, preview: str | None) -> None:
    """Write one handwritten digit per cluttered RGB scene, 20-64 px, as DIR/{train,val,test}/<digit>/*.png.

    A scale-varying data set from scikit-learn's bundled 8x8 scans (no download): each scene holds one
    digit at a random place and size among stroke fragments; the splits use disjoint scans and
    DIR/scenes.json records every digit's box. The same seed writes the same bytes. Example:
    `vggspec data scenes data/scenes --preview scenes.png`.
    """
    from ..datasets import scenes as gen
    from ..errors import DataError

    counts = {"train": n_train, "val": n_val, "test": n_test}
    try:
        gen.check_options(size, (min_digit, max_digit), counts)
    except DataError as exc:
        raise click.UsageError(f"{exc.message} ({exc.hint})" if exc.hint else exc.message) from None
    _check_disk(out, sum(counts.values()), size)
    if preview:
        _check_preview(preview, out)  # before a minute of work, not after
    counts = gen.write_scenes(out, size=size, counts=counts, digit_range=(min_digit, max_digit), seed=seed,
                              force=force, clutter=clutter)
    shown = f"; preview in {gen.preview(out, preview)}" if preview else ""
    listed = ", ".join(f"{k} {v}" for k, v in counts.items())
    click.echo(f"wrote {out}: {listed} images, {size}x{size} RGB, digits {min_digit}-{max_digit} px{shown}")


def _check_disk(out: str, count: int, size: int) -> None:
    """Refuse a set whose rough size (limits.scenes_bytes) is over the free space where DIR will be."""
    import shutil

    need = scenes_bytes(count, size)
    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise click.UsageError(f"{count:,} scenes of {size}x{size} take about {need / 1e9:.1f} GB; {folder} has "
                               f"{free / 1e9:.1f} GB free (give smaller --train/--val/--test or --size)")


def _check_preview(preview: str, out: str) -> None:
    """The preview's folder must exist, unless it is DIR itself, which the command creates."""
    from ..atomic import check_output_path
    from ..errors import VggspecError

    path, folder = Path(preview), Path(out)
    if not folder.exists() and path.parent.absolute() == folder.absolute():
        if path.name in ("", ".", ".."):
            raise VggspecError("is a folder; give a file name", preview)
        return
    check_output_path(path)


def register(main: click.Group) -> None:
    main.add_command(train)
    main.add_command(data)
