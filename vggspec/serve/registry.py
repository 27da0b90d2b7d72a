"""The served models: each loaded once, with one Batcher per onnxruntime session, and reloaded in place.

A MODEL entry is `PATH` or `NAME=PATH`; PATH is an .onnx file or a checkpoint (.safetensors, both of its
forms exported at start by the exporter handed in from the CLI: the runtime never imports the compiler).
`NAME=A+B` gives two forms of one network (dense + standard, for `combined`), and `NAME=A,B` an ensemble
whose members' posteriors are averaged (ConvNet fusion), as predict's --dense-model and --ensemble.

A reload loads the new sessions first and swaps the entry atomically; requests already running finish on
the old sessions, which are closed when the last of them is done. A failed reload leaves the old model up.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from ..runtime.members import Export, ModelOptions, is_checkpoint, load_members
from ..runtime.protocols import Member
from ..runtime.session import Model, ModelInfo
from .batcher import Batcher

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # what a URL path segment holds without escaping


@dataclass(frozen=True)
class Entry:
    """One MODEL argument: a name and its members, each one or two files (forms of one network)."""

    name: str
    members: tuple[tuple[str, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Entry:
        name, sep, paths = text.partition("=")
        if not sep:
            name, paths = "", text
        members = tuple(tuple(p.strip() for p in m.split("+") if p.strip()) for m in paths.split(",") if m.strip())
        if not members:
            raise ModelError(f"'{text}' names no model file", hint="give PATH or NAME=PATH")
        if any(len(m) > 2 for m in members):
            raise ModelError(f"'{text}': a network has two forms at most (A_dense.onnx+A.onnx)")
        if not name:
            name = _stem(members[0][0])
        if not NAME.match(name):
            raise ModelError(f"model name '{name}' must be letters, digits, '.', '_' or '-' (64 at most)",
                             hint="name it explicitly: NAME=PATH")
        return cls(name, members)

    @property
    def paths(self) -> list[str]:
        return [p for m in self.members for p in m]


def _stem(path: str) -> str:
    stem = Path(path).name
    for suffix in (".safetensors", ".onnx"):
        stem = stem.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem)[:64] or "model"


class BatchedModel:
    """A runtime Model whose runs go through its Batcher: the Runner and heat maps call `run` as on a Model,
    and their inputs share onnxruntime batches with other requests'."""

    def __init__(self, model: Model, batcher: Batcher) -> None:
        self.model, self.batcher = model, batcher
        self.info: ModelInfo = model.info
        self.shown, self.provider, self.path = model.shown, model.provider, model.path

    def __getattr__(self, name: str) -> Any:  # everything else a Model has (memory checks, provider...)
        return getattr(self.model, name)

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> list[np.ndarray]:
        names = list(outputs or [self.info.probs_output])
        results = self.batcher.submit(batch).result()
        index = {n: i for i, n in enumerate(self.info.outputs)}
        return [results[index[n]] for n in names]


@dataclass
class ServedModel:
    """One served name: its members (as the Runner takes them) over batched sessions."""

    entry: Entry
    members: list[Member]
    scratch: list[Path] = field(default_factory=list)  # a checkpoint's exported forms, removed on close
    users: int = 0
    retired: bool = False

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def models(self) -> list[BatchedModel]:
        return [m for member in self.members for m in member.models]  # type: ignore[misc]

    @property
    def primary(self) -> BatchedModel:
        """The model the protocol's infer runs: the first network's dense form (any size, scores), else its
        standard form."""
        member = self.members[0]
        return member.dense or member.crop  # type: ignore[return-value]

    @property
    def depth(self) -> int:
        return sum(m.batcher.depth for m in self.models)

    def close(self) -> None:
        for model in self.models:
            model.batcher.close()
        for folder in self.scratch:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"
    threads: int | None = None
    max_batch: int = 8
    max_delay_s: float = 0.0


def load_model(entry: Entry, opts: LoadOptions, export: Export | None = None,
               observe: Callable[[str, int], None] | None = None) -> ServedModel:
    """Load every file of `entry` once, each behind its own Batcher."""
    from ..atomic import scratch_folder

    scratch: list[Path] = []
    members: list[Member] = []
    try:
        for paths in entry.members:
            models: list[Model] = []
            for path in paths:
                folder = scratch_folder("serve") if is_checkpoint(path) else None
                if folder is not None:
                    scratch.append(folder)
                mopts = ModelOptions(model=path, device=opts.device, threads=opts.threads)
                models += load_members(mopts, folder, export)[0].models
            members.append(Member.of(*[_batched(m, entry.name, opts, observe) for m in models]))  # type: ignore
    except BaseException:
        for member in members:
            for m in member.models:
                m.batcher.close(wait=False)  # type: ignore[attr-defined]
        for folder in scratch:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return ServedModel(entry, members, scratch)


def _batched(model: Model, name: str, opts: LoadOptions, observe: Callable[[str, int], None] | None) -> BatchedModel:
    outputs = list(model.info.outputs)

    def run(x: np.ndarray) -> list[np.ndarray]:
        return model.run(x, outputs)

    on_batch = (lambda rows: observe(name, rows)) if observe else None
    return BatchedModel(model, Batcher(run, opts.max_batch, opts.max_delay_s, name, on_batch))


class Registry:
    """Name -> ServedModel, swapped atomically on reload; `use` holds a model for one request."""

    def __init__(self, entries: Sequence[Entry], opts: LoadOptions, export: Export | None = None,
                 observe: Callable[[str, int], None] | None = None) -> None:
        self.opts, self.export, self.observe = opts, export, observe
        self._lock = threading.Lock()
        self._reloading = threading.Lock()
        self._models: dict[str, ServedModel] = {}
        names = [e.name for e in entries]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ModelError(f"two models are named '{duplicate}'", hint="name them: NAME=PATH")
        try:
            for entry in entries:
                self._models[entry.name] = load_model(entry, opts, export, observe)
        except BaseException:
            self.close()
            raise

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get(self, name: str) -> ServedModel | None:
        return self._models.get(name)

    @contextmanager
    def use(self, name: str) -> Iterator[ServedModel]:
        """The model now served under `name` (KeyError when none), kept open until the block ends."""
        with self._lock:
            served = self._models[name]
            served.users += 1
        try:
            yield served
        finally:
            self._release(served)

    def _release(self, served: ServedModel) -> None:
        with self._lock:
            served.users -= 1
            done = served.retired and served.users == 0
        if done:  # on a thread of its own: the event loop may be the one releasing it
            threading.Thread(target=served.close, name="vggspec-close", daemon=True).start()

    def reload(self, name: str) -> None:
        """Load `name` again from its files and swap it in; the old one serves its requests to the end."""
        with self._reloading:  # two reloads at once would load everything twice for nothing
            entry = self._models[name].entry
            fresh = load_model(entry, self.opts, self.export, self.observe)
            with self._lock:
                old = self._models[name]
                self._models[name] = fresh
                old.retired = True
                done = old.users == 0
            if done:
                old.close()

    def reload_all(self) -> list[tuple[str, Exception | None]]:
        """Reload every model (SIGHUP); a failure is returned, not raised, and leaves that model as it was."""
        results: list[tuple[str, Exception | None]] = []
        for name in self.names:
            try:
                self.reload(name)
                results.append((name, None))
            except Exception as exc:  # reported by the caller; the old model keeps serving
                results.append((name, exc))
        return results

    def close(self) -> None:
        with self._lock:
            models, self._models = list(self._models.values()), {}
        for served in models:
            served.close()


def describe(info: ModelInfo) -> dict[str, Any]:
    """The input and outputs of a model in the Open Inference Protocol's metadata terms."""
    from .oip import datatype

    static = info.static_hw
    h, w = static if static else (-1, -1)
    if not info.fully_conv:
        h, w = info.input_size
    c = info.channels
    nhwc = info.embedded_preprocessing or info.preprocessing.layout == "NHWC"
    shape = [-1 if info.batch is None else info.batch, *([h, w, c] if nhwc else [c, h, w])]
    outputs = [{"name": info.probs_output, "datatype": "FP32", "shape": [-1, info.classes or -1]}]
    if "scores" in info.outputs:
        outputs.append({"name": "scores", "datatype": "FP32", "shape": [-1, info.classes or -1, -1, -1]})
    return {"inputs": [{"name": info.input_name, "datatype": datatype(info.input_dtype), "shape": shape}],
            "outputs": outputs}
