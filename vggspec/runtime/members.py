"""From what a user names (a model, its other form, ensemble members, a checkpoint) to a ready Runner.

`ModelOptions` is the one value predict and eval (and any script) pass around; `open_runner` loads the
models (exporting both forms of a .safetensors checkpoint into a scratch folder that lives as long as
the `with` block), picks the protocols and returns the Runner. The runtime sits below the compiler, so
the exporter comes in as `export` (vggspec.checkpoints.export_forms) from the caller.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from ..labels import check_label_count
from .protocols import Member, Protocol, Runner, default_flip, default_scales
from .session import Limits, Model, Overrides, check_model_file

Scales = tuple[int | None, ...]  # test scales Q; None: the image's own size (dense models)
Export = Callable[[str, Path], Sequence[Path]]  # a checkpoint and a folder -> its standard and dense ONNX files


@dataclass(frozen=True)
class ModelOptions:
    """The models of one run and how to run them."""

    model: str  # an .onnx file, or a vggspec checkpoint (.safetensors): both forms are exported for the run
    dense_model: str | None = None  # the fully convolutional form, when `model` is the standard one
    crop_model: str | None = None  # the standard form, when `model` is the dense one
    ensemble: tuple[str, ...] = ()  # further members, posteriors averaged (ConvNet fusion)
    flip: bool | None = None  # average the mirror image; None: the models' own default (default_flip)
    device: str = "auto"
    threads: int | None = None
    batch_size: int = 10  # crops per onnxruntime run
    overrides: Overrides = field(default_factory=Overrides)  # metadata for models without vggspec's
    labels_file: str | None = None  # where overrides.labels were read from
    limits: Limits = field(default_factory=Limits)  # per image: a dense pass's memory, seconds per run

    @property
    def ensemble_paths(self) -> list[str]:
        """The --ensemble models, each entry repeated or comma-separated."""
        return [p.strip() for entry in self.ensemble for p in entry.split(",") if p.strip()]

    def inputs(self) -> list[tuple[str, str | None]]:
        """(option, path) of every file the run reads: what an output of the run must not overwrite."""
        return [("MODEL", self.model), ("--dense-model", self.dense_model), ("--crop-model", self.crop_model),
                *(("--ensemble", p) for p in self.ensemble_paths), ("--labels", self.labels_file)]


Load = Callable[..., Model]  # a path (and what messages call it) -> a Model, with the run's device and overrides


def load_members(opts: ModelOptions, scratch: Path | None = None, export: Export | None = None) -> list[Member]:
    """The first network (the model plus its other form) and one member per ensemble model.

    A checkpoint needs `export` (checkpoint, folder -> the two ONNX forms) and `scratch` to put them in.
    """
    def load(path: str, shown: str | None = None) -> Model:
        return Model(path, device=opts.device, threads=opts.threads, overrides=opts.overrides, shown=shown,
                     limits=opts.limits)

    first = _main_models(opts, load, scratch, export)
    first += [_other_form(option, path, dense, first, load) for option, path, dense in
              (("--dense-model", opts.dense_model, True), ("--crop-model", opts.crop_model, False)) if path]
    members = [Member.of(*first)] + [Member.of(load(p)) for p in opts.ensemble_paths]
    if opts.overrides.labels is not None:  # too few or too many names would label the wrong classes
        for model in (m for member in members for m in member.models if m.info.classes):
            check_label_count(opts.overrides.labels, model.info.classes, opts.labels_file or "--labels")
    return members


def _main_models(opts: ModelOptions, load: Load, scratch: Path | None, export: Export | None) -> list[Model]:
    """MODEL, or both forms of a checkpoint MODEL, named in messages as the checkpoint: the exported files
    are temporaries the user never saw (and gone when the run ends)."""
    if not is_checkpoint(opts.model):
        return [load(opts.model)]
    check_model_file(opts.model)
    if export is None or scratch is None:
        raise ModelError("is a checkpoint: export it to ONNX first", opts.model,
                         "`vggspec export --weights CKPT -o M.onnx`, or pass export= and scratch=")
    paths = export(opts.model, scratch)
    return [load(str(p), f"{opts.model} ({Path(p).stem} form, exported for this run)") for p in paths]


def _other_form(option: str, path: str, dense: bool, first: list[Model], load: Load) -> Model:
    """--dense-model (fully convolutional) or --crop-model (standard) beside MODEL, which must be of the
    other form: otherwise roles assigned by form would quietly run the wrong file for a protocol."""
    model = load(path)
    forms = ("standard", "fully convolutional")
    if model.info.fully_conv != dense:
        raise ModelError(f"{option} takes the {forms[dense]} form, and this model is {forms[not dense]}",
                         model.shown, f"pass it as {'--crop-model' if dense else '--dense-model'}, or export the "
                                      f"{forms[dense]} form (`vggspec export`{' --fully-conv' if dense else ''})")
    if len(first) == 1 and first[0].info.fully_conv == dense:
        raise ModelError(f"MODEL is already {forms[dense]}: {option} is the other form of a {forms[not dense]} MODEL",
                         first[0].shown, f"drop {option}, or give the {forms[not dense]} model as MODEL")
    return model


def build_protocols(names: Sequence[str], scale_sets: Sequence[Scales], flip: bool | None,
                    members: list[Member]) -> list[Protocol]:
    """Every (protocol, scale set) pair asked for; defaults: dense for a dense model, the models' own test
    scales and flip (default_scales, default_flip: else Q = the input side, with flip)."""
    names = list(names) or ["dense" if members[0].dense is not None else "multi-crop"]
    models = [m for mem in members for m in mem.models]
    sets = list(scale_sets) or [default_scales(models)]
    flip = default_flip(models) if flip is None else flip
    return [Protocol(name, scales, flip) for name in names for scales in sets]


def is_checkpoint(path: str) -> bool:
    return path.endswith(".safetensors")


@contextmanager
def open_runner(opts: ModelOptions, protocols: Sequence[str] = (), scale_sets: Sequence[Scales] = (),
                export: Export | None = None) -> Iterator[Runner]:
    """A Runner over the models of `opts`; a checkpoint's exported forms are removed on leaving."""
    from ..atomic import scratch_folder

    scratch = scratch_folder("models") if is_checkpoint(opts.model) else None
    try:
        members = load_members(opts, scratch, export)
        yield Runner(members, build_protocols(protocols, scale_sets, opts.flip, members), opts.batch_size)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
