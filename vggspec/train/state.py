"""Run checkpoints that survive faults, stored without pickle and verified on resume.

A checkpoint of the run state is one folder, RUNDIR/state/<global step, 8 digits>/, holding
  tensors.safetensors  every tensor: the model's state_dict (`model.<name>`), the optimizer's state
                       (`optimizer.state.<param>.<name>`), the RNG states (`rng.torch`, `rng.cuda.<i>`);
  state.json           everything else (format, progress, config, stats, spec_text, scheduler, the optimizer's
                       param_groups, python/numpy RNG states), each tensor replaced by {"__tensor__": key},
                       dicts with int keys (the optimizer's state) as {"__items__": [[key, value], ...]};
  MANIFEST.json        each file's size and sha256, written last.
The folder is written under a temporary name and renamed into place, so a checkpoint is there whole or
not at all; a save at a step that already has one replaces it. The newest two are kept (older ones and
any newer leftover of an abandoned timeline are deleted once the new one is in place). A resume takes
the newest checkpoint whose files match their manifest and parse, warning about each newer one that does
not. Keeping the weights in the state (not only in model.safetensors) means a kill between two writes can
never pair weights of step k with optimizer state of step k-1.
RUNDIR/model.safetensors is the deployable native checkpoint (spec, preprocessing, labels), also atomic.
One process writes a RUNDIR at a time: `lock_run` holds an flock on RUNDIR/.vggspec.lock for the run's life.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import folder_lock, naming_output
from ..errors import VggspecError
from ..graph import LayerGraph, Preprocessing
from ..weights import Checkpoint, save_checkpoint

STATES = "state"
TENSORS, JSON, MANIFEST = "tensors.safetensors", "state.json", "MANIFEST.json"
OLD_STATE = "state.pt"  # the pickled single file of vggspec-train-state/1
MODEL = "model.safetensors"
FORMAT = "vggspec-train-state/2"
KEEP = 2


@dataclass
class Progress:
    """Where the run is: `epoch` (0-based, the one under way), `step` (optimizer steps done in it)."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {"loss": 0.0, "correct": 0.0, "count": 0.0,
                                                            "skipped": 0.0, "seconds": 0.0})


class StateCorrupt(Exception):
    """A checkpoint folder that fails verification; the message says what failed."""


# --- RNG --------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch generator states (numpy arrays as lists, so they go into JSON)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in np_state["state"].items()}
    rng = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = dict(rng["numpy"])
    np_state["state"] = {k: (np.array(v, dtype=np.uint64) if isinstance(v, list) else v)
                         for k, v in np_state["state"].items()}
    np.random.set_state(np_state)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# --- tensors out of a nested structure, and back ----------------------------------------------
def _split(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`obj` as JSON values, each tensor moved into `tensors` under its path and left as a reference."""
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise ValueError(f"two tensors of the run state are both named {key}")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = [(k, _split(v, f"{key}.{k}", tensors)) for k, v in obj.items()]
        if all(isinstance(k, str) for k, _ in items):
            return dict(items)
        return {"__items__": [[k.item() if isinstance(k, np.generic) else k, v] for k, v in items]}  # int keys
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in the run state ({key})")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split` (tuples come back as lists)."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__items__"}:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


# --- writing ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_folder(folder: Path, payload: dict[str, Any]) -> None:
    """tensors.safetensors and state.json, then MANIFEST.json with their sizes and sha256."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {k: _split(v, k, tensors) for k, v in {"format": FORMAT, **payload}.items()}
    save_file(tensors, folder / TENSORS, metadata={"format": FORMAT})
    (folder / JSON).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    files = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
             for name in (TENSORS, JSON)}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1), encoding="utf-8")
    for name in (TENSORS, JSON, MANIFEST):
        _fsync(folder / name)
    _fsync(folder)


def _checkpoints(rundir: Path) -> list[Path]:
    """The step folders under RUNDIR/state, oldest first (temporary ones left out)."""
    root = rundir / STATES
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()),
                  key=lambda p: int(p.name))


def save_state(rundir: Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint folder for payload["progress"]["global_step"] atomically; keep the newest two."""
    root = rundir / STATES
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a kill during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    target = root / f"{int(payload['progress']['global_step']):08d}"
    tmp, old = (root / f".tmp-{kind}{target.name}-{os.getpid()}" for kind in ("", "old-"))
    try:
        with naming_output(target, tmp):  # a full disk names the checkpoint, not its temporary
            tmp.mkdir()
            _write_folder(tmp, payload)
            if target.exists():  # the same step again (an epoch's end, a replay after a fallback)
                target.rename(old)
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(root)
    _prune(rundir, target)
    return target


@contextmanager
def lock_run(rundir: Path, main: bool = True) -> Iterator[None]:
    """Hold RUNDIR for the run's whole life: a second `train -o RUNDIR`, or a `--resume` of a run still training,
    is refused with "is in use by process N" (interleaved, the two would duplicate epochs in metrics.jsonl and
    delete each other's checkpoints). Only the main process (rank 0) writes RUNDIR, so only it takes the lock."""
    if not main:
        yield
        return
    with folder_lock(rundir, "wait for that run to finish (or stop it), or train into another -o folder"):
        yield


def _prune(rundir: Path, latest: Path) -> None:
    """Delete all but `latest` and the newest older checkpoint that still verifies, the fallback should
    `latest` be damaged later; newer folders are an abandoned timeline. The fallback is verified again here
    because it was written long ago: a disk that damaged it would otherwise go unnoticed until the resume
    that needs it."""
    folders = _checkpoints(rundir)
    older = [p for p in folders if int(p.name) < int(latest.name)]
    newer = [p for p in folders if int(p.name) > int(latest.name)]
    keep, damaged = [], []
    for folder in reversed(older):
        if len(keep) == KEEP - 1:
            break
        try:
            _verify(folder)
            keep.append(folder)
        except StateCorrupt as exc:
            damaged.append(f"{folder}: {exc}")
    for p in older + newer:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    fallback = f"the fallback is now {keep[0]}" if keep else f"no fallback remains behind {latest}"
    for line in damaged:
        warnings.warn(f"{line}; removed, {fallback}", stacklevel=3)


# --- reading ----------------------------------------------------------------------------------
def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """The files MANIFEST.json lists, with their size and sha256."""
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise StateCorrupt(f"no {MANIFEST} (an unfinished write)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise StateCorrupt(f"{MANIFEST} is damaged") from None
    if not isinstance(files, dict) or set(files) != {TENSORS, JSON} or not all(
            isinstance(w, dict) for w in files.values()):
        raise StateCorrupt(f"{MANIFEST} is damaged")
    return files


def _verify(folder: Path) -> None:
    """Raise StateCorrupt unless every file the manifest names has its size and sha256."""
    files = _manifest(folder)
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise StateCorrupt(f"{name} is missing")
        if path.stat().st_size != want.get("size"):
            raise StateCorrupt(f"{name} has {path.stat().st_size} bytes, the manifest says {want.get('size')}")
        if _sha256(path) != want.get("sha256"):
            raise StateCorrupt(f"{name} does not match its sha256 in the manifest")


def _read(folder: Path) -> dict[str, Any]:
    """A verified checkpoint folder's state, tensors in place."""
    _verify(folder)
    try:
        meta = json.loads((folder / JSON).read_text(encoding="utf-8"))
        state = _join(meta, load_file(folder / TENSORS))
    except Exception as exc:  # a file that matches its manifest but does not parse: written wrong
        raise StateCorrupt(f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateCorrupt(f"is not a {FORMAT} checkpoint")
    return state


def no_run_error(rundir: Path) -> VggspecError:
    """Why RUNDIR cannot be resumed: an older vggspec's run, or no run at all."""
    if (rundir / OLD_STATE).is_file():
        return VggspecError(f"holds a run state ({OLD_STATE}) written by an older vggspec, which cannot be resumed",
                            str(rundir), "start a new run in another -o folder; its model.safetensors still "
                            "serves as --weights to start from")
    return VggspecError("holds no training run to resume (no state/ checkpoint)", str(rundir),
                        "give the -o folder of an earlier `vggspec train`, or start a new run without --resume")


def latest_state(rundir: str | Path, warn: bool = True) -> tuple[Path, dict[str, Any]]:
    """The newest checkpoint folder that verifies and its state; a warning for each newer one that does not."""
    rundir = Path(rundir)
    folders = _checkpoints(rundir)
    if not folders:
        raise no_run_error(rundir)
    failed = []
    for folder in reversed(folders):
        try:
            state = _read(folder)
        except StateCorrupt as exc:
            failed.append(f"{folder}: {exc}")
            continue
        if warn:
            for line in failed:
                warnings.warn(f"{line}; resuming from the previous checkpoint {folder}", stacklevel=2)
        return folder, state
    raise VggspecError("no run checkpoint passes verification (" + "; ".join(failed) + ")", str(rundir),
                       f"the run state is damaged; start a new run (--weights {rundir / MODEL} starts from "
                       "its last weights)")


def load_state(rundir: str | Path, spec_text: str, warn: bool = True) -> dict[str, Any]:
    """The newest good state of a run, checked to belong to this spec; clear errors otherwise."""
    _, state = latest_state(rundir, warn)
    if state["spec_text"] != spec_text:
        raise VggspecError(f"this run was trained from another spec (or other --set options): "
                           f"{run_spec_options(state['config'])}", str(rundir),
                           f"`vggspec train --resume {rundir}` alone takes the run's own spec and --set options; "
                           "or train into a new -o folder")
    return state


def read_settings(rundir: str | Path) -> dict[str, Any]:
    """The run's settings (`config`, `spec_text`, `classes`) from its newest checkpoint whose state.json parses,
    without reading or verifying the tensors: what `train --resume RUNDIR` needs before the run itself is
    loaded (and verified) by the loop."""
    rundir = Path(rundir)
    folders = _checkpoints(rundir)
    if not folders:
        raise no_run_error(rundir)
    for folder in reversed(folders):
        try:
            state = json.loads((folder / JSON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            return {k: state.get(k) for k in ("config", "spec_text", "classes")}
    return latest_state(rundir, warn=False)[1]  # none parses: let the verification say why


def run_spec_options(config: dict[str, Any]) -> str:
    """What a run was trained from, as the command line would say it: `SPEC --set a=1 --set b=2`."""
    sets = (f"--set {shlex.quote(s)}" for s in config.get("sets") or ())
    return " ".join([shlex.quote(str(config.get("spec"))), *sets])


def read_progress(rundir: str | Path) -> dict[str, Any]:
    """The progress (epoch, step, global_step, sums) of the checkpoint a resume would start from."""
    return latest_state(rundir, warn=False)[1]["progress"]


def has_run(rundir: Path) -> bool:
    """Whether RUNDIR holds a run: a checkpoint folder, or the state.pt of an older vggspec."""
    return bool(_checkpoints(rundir)) or (rundir / OLD_STATE).is_file()


def save_model(rundir: Path, model: torch.nn.Module, graph: LayerGraph, pre: Preprocessing,
               labels: tuple[str, ...], extra: dict[str, str], overrides: tuple[str, ...] = ()) -> None:
    """The native safetensors checkpoint of the current weights (with the --set overrides it was built with)."""
    tensors = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    ckpt = Checkpoint(tensors, spec=graph.meta.spec_text, preprocessing=pre, labels=labels,
                      source=f"train:{rundir.name}", extra=extra, overrides=tuple(overrides))
    save_checkpoint(rundir / MODEL, ckpt)
