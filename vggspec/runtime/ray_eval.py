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
import math
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


# How long joining a cluster may take before the run stops with an error; VGGSPEC_RAY_TIMEOUT changes it.
DEFAULT_CONNECT_TIMEOUT = 30.0
TIMEOUT_ENV = "VGGSPEC_RAY_TIMEOUT"


def connect_timeout(seconds: float | None = None) -> float:
    """`seconds`, else VGGSPEC_RAY_TIMEOUT, else DEFAULT_CONNECT_TIMEOUT; VggspecError for an unusable value."""
    if seconds is None:
        text = os.environ.get(TIMEOUT_ENV, "").strip()
        try:
            seconds = float(text) if text else DEFAULT_CONNECT_TIMEOUT
        except ValueError:
            seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= 86400):
        raise VggspecError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV, seconds)} is not a number of seconds",
                           hint="give seconds from above 0 to 86400, e.g. 120")
    return seconds


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None for `auto` (Ray finds the cluster itself).
    VggspecError for anything else: a missing or out-of-range port would only show as a long silent wait."""
    if address == "auto":
        return None
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    hint = "give --ray HOST:PORT (the head's GCS port, e.g. 6379), ray://HOST:PORT (Ray Client, 10001), or auto"
    host, _, port = rest.rpartition(":")
    if not host or not port:
        raise VggspecError(f"--ray {address} is not HOST:PORT", hint=hint)
    if not (port.isascii() and port.isdigit()):
        raise VggspecError(f"--ray {address}: the port is not a number from 1 to 65535", hint=hint)
    if not 1 <= int(port) <= 65535:
        raise VggspecError(f"--ray {address}: port {int(port)} is not from 1 to 65535", hint=hint)
    parts = urlsplit(f"//{host}:{port}")
    if not parts.hostname or parts.path or parts.query or parts.fragment or parts.username:
        raise VggspecError(f"--ray {address} is not HOST:PORT", hint=hint)
    return parts.hostname, int(port)


def probe(address: str, seconds: float) -> None:
    """VggspecError, at once, when nothing listens at the address (a closed port is refused in milliseconds,
    where Ray would retry for minutes), or nothing answers within `seconds`."""
    target = parse_address(address)
    if target is None:
        return
    host, port = target
    try:
        with socket.create_connection(target, timeout=seconds):
            return
    except socket.gaierror as exc:
        raise VggspecError(f"--ray {address}: unknown host {host} ({exc.strerror})") from None
    except TimeoutError:
        raise VggspecError(f"--ray {address}: no answer from {host}:{port} within {seconds:g} s",
                           hint=f"check the address and the firewall; {TIMEOUT_ENV}=SECONDS waits longer") from None
    except OSError as exc:
        raise VggspecError(f"--ray {address}: cannot connect to {host}:{port} ({exc.strerror or exc})",
                           hint="is the Ray head running there (`ray status` on it)? "
                                "Without ADDRESS, --ray starts a local Ray instance") from None


def _init_within(ray: Any, seconds: float, **kwargs: Any) -> bool:
    """ray.init in a daemon thread, waited for at most `seconds`: to a port that answers but is not a Ray
    head's, it retries in native code for minutes, where no signal reaches it. False when it did not finish
    (the thread is left behind; the command then exits)."""
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(**kwargs)
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=init, name="vggspec-ray-init", daemon=True)
    thread.start()
    thread.join(seconds)
    if failure:
        raise failure[0]
    return not thread.is_alive()


def connect(address: str | None, num_cpus: int | None = None, timeout: float | None = None) -> Any:
    """Join the Ray cluster at `address` within `timeout` seconds (connect_timeout), or start a local instance
    (None); quiet on stdout."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    logging.getLogger("ray").setLevel(logging.ERROR)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
        if address:
            seconds = connect_timeout(timeout)
            if not _init_within(ray, seconds, address=address, **kwargs):
                raise VggspecError(f"--ray {address}: no Ray cluster answered within {seconds:g} s",
                                   hint=f"check that ADDRESS is the Ray head's (`ray status` on it); "
                                        f"{TIMEOUT_ENV}=SECONDS waits longer") from None
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
                    batch: int = 4, timeout: float | None = None,
                    on_wait: Callable[[str], None] | None = None) -> Report:
    """runtime.evaluate's Report, computed by Ray Data actors (local instance when `address` is None).
    Joining the cluster at `address` waits at most `timeout` seconds (connect_timeout), said through `on_wait`."""
    start = time.perf_counter()
    if address:
        seconds = connect_timeout(timeout)
        parse_address(address)  # before saying what it waits for
        if on_wait:
            on_wait(f"connecting to the Ray cluster at {address} (up to {seconds:g} s; {TIMEOUT_ENV} changes it)")
        probe(address, seconds)
    with _ray_output_to_file() as log:
        try:
            results = _run(runner, items, address, device, threads, overrides, num_cpus, batch, timeout)
        except VggspecError:
            raise
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
         batch: int, timeout: float | None = None) -> dict[int, tuple[np.ndarray, str, str, bool]]:
    ray = connect(address, num_cpus, timeout)
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
