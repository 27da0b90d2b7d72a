"""Evaluation as Ray Data batch inference: the protocols of runtime.evaluate, on a Ray cluster.

The image list becomes a Ray dataset; actors (one per CPU, or per GPU with --device cuda) each build
the same Runner as a local evaluation once, with the models shipped through Ray's object store, and
read, decode and run their share of the images. The per-image posteriors come back to the driver,
which adds them to the same Report in the same order as a local run: identical per-image results,
error rates and JSON. Image paths must be readable from every node (a shared file system).

Ray is optional (vggspec[ray]) and imported only here; the local runtime never touches it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import scratch_folder
from ..errors import DataError, ModelError, VggspecError
from .evaluate import IMAGE_ERRORS, FailureStreak, Report, Score, image_error
from .protocols import Member, Protocol, Runner
from .session import Limits, Model, ModelOutputError, Overrides

SHIP_LIMIT = 2**31 - 1  # models with external data (> 2 GB) are read from their path on each node


@dataclass(frozen=True)
class RunnerSpec:
    """Everything an actor needs to rebuild the driver's Runner: picklable, models as object refs."""

    members: tuple[tuple[str, ...], ...]  # model file names per ensemble member
    files: dict[str, Any]  # file name -> ray ObjectRef of its bytes, or the path to read on the node
    protocols: tuple[Protocol, ...]
    device: str = "cpu"
    threads: int | None = 1
    overrides: Overrides = field(default_factory=Overrides)
    batch_size: int = 10
    shown: dict[str, str] = field(default_factory=dict)  # file name -> what messages call it (the driver's name)
    limits: Limits = field(default_factory=Limits)


def runner_spec(runner: Runner, device: str, threads: int | None, overrides: Overrides | None) -> RunnerSpec:
    """The driver's runner, described for the actors (call after ray.init: the models go into the object store)."""
    import ray

    members, files, shown = [], {}, {}
    for i, member in enumerate(runner.members):
        names = []
        for j, model in enumerate(member.models):
            path = Path(model.path)
            name = f"m{i}_{j}_{path.name}"
            files[name] = str(path.resolve()) if _stays(path) else ray.put(path.read_bytes())
            shown[name] = model.shown
            names.append(name)
        members.append(tuple(names))
    return RunnerSpec(tuple(members), files, tuple(runner.protocols), device, threads, overrides or Overrides(),
                      runner.batch_size, shown, runner.lead.limits)


def _stays(path: Path) -> bool:
    """A model that cannot travel as one file: over 2 GB, or with its weights in external data files."""
    size = path.stat().st_size
    if size > SHIP_LIMIT:
        return True
    if size > 64 * 2**20:  # weights inline: a model with external data is a small file
        return False
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


class _Evaluator:
    """A Ray Data actor: builds the Runner once, then evaluates batches of image paths."""

    def __init__(self, spec: RunnerSpec) -> None:
        import ray

        self.folder = scratch_folder("ray")  # a killed actor's copy is removed by the next one
        paths = {}
        for name, source in spec.files.items():
            if isinstance(source, str):
                paths[name] = source
            else:
                paths[name] = str(self.folder / name)
                Path(paths[name]).write_bytes(ray.get(source))
        members = [Member.of(*(Model(paths[n], spec.device, spec.threads, spec.overrides, shown=spec.shown.get(n),
                                     limits=spec.limits)
                                for n in names)) for names in spec.members]
        self.runner = Runner(members, spec.protocols, spec.batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, k = len(batch["path"]), len(self.runner.protocols)
        posteriors: list[np.ndarray | None] = []
        errors, fatal, data_error = [""] * n, [""] * n, [False] * n
        for i, path in enumerate(batch["path"]):
            try:
                results = self.runner.run(str(path))
                posteriors.append(np.stack([results[p] for p in self.runner.protocols]))
            except ModelOutputError as exc:  # stops a local run too (runtime.evaluate.run_each)
                fatal[i] = json.dumps([exc.message, exc.path, exc.hint])
                posteriors.append(None)
            except IMAGE_ERRORS as exc:  # one unusable or failing image: reported, the run goes on (as locally)
                errors[i], data_error[i] = image_error(exc), isinstance(exc, DataError)
                posteriors.append(None)
            except VggspecError as exc:  # stops a local run too: carried to the driver, raised there
                fatal[i] = json.dumps([exc.message, exc.path, exc.hint])
                posteriors.append(None)
        width = max((p.shape[1] for p in posteriors if p is not None), default=1)
        out = np.zeros((n, k, width))
        for i, p in enumerate(posteriors):
            if p is not None:
                out[i] = p
        return {"index": batch["index"], "posteriors": out, "error": np.array(errors, dtype=object),
                "fatal": np.array(fatal, dtype=object), "data_error": np.array(data_error)}


def connect(address: str | None, num_cpus: int | None = None) -> Any:
    """Join the Ray cluster at `address`, or start a local instance (None); quiet on stdout."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=num_cpus, **kwargs)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return ray


def actors(ray: Any, device: str) -> tuple[int, dict[str, float]]:
    """How many evaluators the cluster holds, and what each asks for: one per GPU, or one per CPU."""
    res = ray.cluster_resources()
    if device in ("cuda", "tensorrt"):
        return max(1, int(res.get("GPU", 0))), {"num_gpus": 1}
    return max(1, int(res.get("CPU", 1))), {"num_cpus": 1}


def evaluate_on_ray(runner: Runner, items: Sequence[tuple[Path, int]], address: str | None, device: str = "cpu",
                    threads: int | None = None, overrides: Overrides | None = None,
                    on_error: Callable[[str, str], None] | None = None, num_cpus: int | None = None,
                    batch: int = 4) -> Report:
    """runtime.evaluate's Report, computed by Ray Data actors (local instance when `address` is None)."""
    start = time.perf_counter()
    with _ray_output_to_file() as log:
        try:
            results = _run(runner, items, address, device, threads, overrides, num_cpus, batch)
        except Exception as exc:  # Ray's own exception types: one line, and where its log is
            raise VggspecError(f"Ray evaluation failed ({type(exc).__name__}: {str(exc).strip()[:300]})",
                               hint=f"Ray's output is in {log}") from None
    report = Report({p: Score() for p in runner.protocols})
    streak = FailureStreak()
    for i, (path, target) in enumerate(items):  # the local order: same predictions list, same first failure
        post, err, fatal, data_error = results[i]
        if fatal:
            message, where, hint = json.loads(fatal)
            raise VggspecError(f"on a Ray worker: {message}", where, hint)
        if err:
            report.fail(str(path), err)
            if on_error:
                on_error(str(path), err)
            streak.failed(DataError(err) if data_error else ModelError(err))
            continue
        streak.succeeded()
        classes = runner.lead.info.classes or post.shape[1]
        report.add(str(path), target, {p: post[k][:classes] for k, p in enumerate(runner.protocols)})
    report.seconds = time.perf_counter() - start
    return report


def _run(runner: Runner, items: Sequence[tuple[Path, int]], address: str | None, device: str,
         threads: int | None, overrides: Overrides | None, num_cpus: int | None,
         batch: int) -> dict[int, tuple[np.ndarray, str, str, bool]]:
    ray = connect(address, num_cpus)
    count, resources = actors(ray, device)
    spec = runner_spec(runner, device, threads if threads else 1, overrides)
    rows = [{"index": i, "path": str(path)} for i, (path, _) in enumerate(items)]
    ds = ray.data.from_items(rows).map_batches(
        _Evaluator, fn_constructor_args=(spec,), batch_size=batch,
        compute=ray.data.ActorPoolStrategy(size=count), **resources)
    results = {}
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, post, err, fatal, data_error in zip(out["index"], out["posteriors"], out["error"], out["fatal"],
                                                   out["data_error"], strict=True):
            results[int(i)] = (post, err, fatal, bool(data_error))
    return results


@contextlib.contextmanager
def _ray_output_to_file() -> Iterator[str]:
    """Ray's processes and its core library write notices straight to file descriptor 2 (deprecations,
    'execution finished', actor warnings); they go to a log file, so stderr keeps vggspec's lines."""
    fd, log = tempfile.mkstemp(prefix="vggspec-ray-", suffix=".log")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield log
    except BaseException:
        raise  # the log stays for the hint to point at
    else:
        os.unlink(log)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
