"""From what a user names (a model, its other form, ensemble members, a checkpoint) to a ready Runner.

`ModelOptions` is the one value predict and eval (and any script) pass around; `open_runner` loads the
models (exporting both forms of a .safetensors checkpoint into a scratch folder that lives as long as
the `with` block), picks the protocols and returns the Runner. The runtime sits below the compiler, so
the exporter comes in as `export` (vggspec.backends.onnx_checkpoint.export_forms) from the caller.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .protocols import Member, Protocol, Runner, default_scales
from .session import Model, Overrides

Scales = tuple[int | None, ...]  # test scales Q; None: the image's own size (dense models)
Export = Callable[[str, Path], Sequence[Path]]  # a checkpoint and a folder -> its standard and dense ONNX files


@dataclass(frozen=True)
class ModelOptions:
    """The models of one run and how to run them."""

    model: str  # an .onnx file, or a vggspec checkpoint (.safetensors): both forms are exported for the run
    dense_model: str | None = None  # the fully convolutional form, when `model` is the standard one
    crop_model: str | None = None  # the standard form, when `model` is the dense one
    ensemble: tuple[str, ...] = ()  # further members, posteriors averaged (ConvNet fusion)
    flip: bool = True
    device: str = "auto"
    threads: int | None = None
    batch_size: int = 10  # crops per onnxruntime run
    overrides: Overrides = field(default_factory=Overrides)  # metadata for models without vggspec's


def load_members(opts: ModelOptions, scratch: Path | None = None, export: Export | None = None) -> list[Member]:
    """The first network (the model plus its other form) and one member per ensemble model.

    A checkpoint needs `export` (checkpoint, folder -> the two ONNX forms) and `scratch` to put them in.
    """
    def load(path: str) -> Model:
        return Model(path, device=opts.device, threads=opts.threads, overrides=opts.overrides)

    paths = [opts.model]
    if is_checkpoint(opts.model):
        if export is None or scratch is None:
            raise ModelError("is a checkpoint: export it to ONNX first", opts.model,
                             "`vggspec export --weights CKPT -o M.onnx`, or pass export= and scratch=")
        paths = [str(p) for p in export(opts.model, scratch)]
    first = [load(p) for p in paths] + [load(p) for p in (opts.dense_model, opts.crop_model) if p]
    members = [Member.of(*first)]
    for entry in opts.ensemble:
        members += [Member.of(load(p.strip())) for p in entry.split(",") if p.strip()]
    return members


def build_protocols(names: Sequence[str], scale_sets: Sequence[Scales], flip: bool,
                    members: list[Member]) -> list[Protocol]:
    """Every (protocol, scale set) pair asked for; defaults: dense for a dense model, Q = its input side."""
    names = list(names) or ["dense" if members[0].dense is not None else "multi-crop"]
    sets = list(scale_sets) or [default_scales(m for mem in members for m in mem.models)]
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
