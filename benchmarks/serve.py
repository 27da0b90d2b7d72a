"""Section: `vggspec serve` under load, on 127.0.0.1 only (issue 20, item 10).

A bounded asyncio load generator of its own (keep-alive HTTP/1.1 connections, one per concurrent client,
each posting Open Inference Protocol binary tensors of one image) against a real `vggspec serve` process:
throughput and p50/p99 latency at concurrency 1, 4, 16 and 64, with dynamic batching on (--max-batch 8, with
the default --max-delay-ms 0 and with 5 ms) and off (--max-batch 1); the served rate against the in-process
Model.run (the Runner's engine) at the same batch size; and a 2-minute soak at steady load recording the
server's RSS. For narrow D on scenes (width 1/8, 64 x 64, 10 classes) and full D at 224 (random weights:
speed does not depend on them).

The generator shares the machine's cores with the server; the machine's load is recorded with the figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import ROOT, Config, median, paired_ratio, ratio_range
from .report import Section

TITLE = "11. Serving: `vggspec serve` under load (127.0.0.1)"
CONCURRENCY = (1, 4, 16, 64)
SWEEP = {"batched": "batched (8, no delay)", "batched, 5 ms": "batched (8, 5 ms delay)", "unbatched": "unbatched"}
NARROW = ("D", ("width=0.125", "classes=10", "input=64x64", "norm=batch"))
LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)  # not inference-header-content-length


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only serve" + (" --quick" if cfg.quick else "")


# ---------------------------------------------------------------- models


def _model(cfg: Config, name: str, spec: str, overrides: tuple[str, ...]) -> Path:
    """The standard form, random weights (seed 0), exported once into the cache folder."""
    out = cfg.path(name)
    if not out.exists():
        from vggspec import export_onnx, load_spec

        export_onnx(load_spec(spec, overrides=overrides), out, seed=0)
    return out


# ---------------------------------------------------------------- server and load


class Served:
    """`vggspec serve` in a child process on a free 127.0.0.1 port."""

    def __init__(self, model: Path, threads: int, max_batch: int, delay_ms: float, log: Path,
                 http: str = "auto") -> None:
        args = [sys.executable, "-m", "vggspec", "serve", f"m={model}", "--port", "0", "--device", "cpu",
                "--threads", str(threads), "--max-batch", str(max_batch), "--max-delay-ms", str(delay_ms),
                "--max-queue", "256", "--timeout-s", "300", "--http", http]
        # The access log (a line per request) goes to a file, never to a pipe: a pipe this process failed to
        # drain in time would block the server's logging, and with it the server's event loop.
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(args, cwd=ROOT, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (found := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the server did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        self.port = int(found.group(1))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def infer_request(x: np.ndarray) -> bytes:
    """An HTTP/1.1 keep-alive request carrying `x` as a binary tensor (what tritonclient sends)."""
    blob = np.ascontiguousarray(x, dtype="<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "probs", "parameters": {"binary_data": True}}]}).encode()
    head = (f"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(header) + len(blob)}\r\n\r\n")
    return head.encode() + header + blob


@dataclass
class Load:
    concurrency: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


# A request unanswered this long counts as a stall (an error) and its client stops: the benchmark never hangs.
# (A run of 2026-12-06 hung for over 20 minutes with 14 clients waiting, and was never reproduced since.)
STALL_S = 30.0


async def _client(port: int, request: bytes, start: float, stop: float, done: list[tuple[float, float]],
                  errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def exchange() -> bytes:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        match = LENGTH.search(head)
        await reader.readexactly(int(match.group(1)) if match else 0)
        return head

    try:
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            try:
                head = await asyncio.wait_for(exchange(), STALL_S)
            except asyncio.TimeoutError:
                errors.append(f"stalled {STALL_S:g} s")
                return
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                continue
            done.append((sent, time.perf_counter()))
    finally:
        writer.close()


async def _load(port: int, request: bytes, concurrency: int, seconds: float, warmup: float) -> Load:
    """`concurrency` clients back to back for `seconds`; rates and latencies over what finished after `warmup`."""
    start = time.perf_counter()
    stop = start + warmup + seconds
    done: list[tuple[float, float]] = []
    errors: list[str] = []
    await asyncio.gather(*(_client(port, request, start, stop, done, errors) for _ in range(concurrency)))
    window = [(s, e) for s, e in done if start + warmup <= e <= stop]
    lat = sorted((e - s) * 1000 for s, e in window) or [float("nan")]
    if errors:
        print(f"   serve: {len(errors)} failed requests at concurrency {concurrency}, e.g. {errors[0]!r}", flush=True)
    return Load(concurrency, len(window) / seconds, statistics.median(lat),
                lat[min(len(lat) - 1, int(0.99 * len(lat)))], len(errors))


def in_process(model: Any, x: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second of Model.run on batches of `batch` in this process, for `seconds` after one untimed run
    (which also hands the cores to onnxruntime's own threads, as interleave's priming does)."""
    xb = np.repeat(x, batch, axis=0)
    model.run(xb)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.run(xb)
        n += batch
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------- the section


def _measure_model(section: Section, cfg: Config, label: str, path: Path, hw: int, seconds: float,
                   warmup: float, soak_s: float, rounds: int, parsers: bool = False) -> None:
    x = np.random.default_rng(0).normal(size=(1, 3, hw, hw)).astype(np.float32)
    request, request8 = infer_request(x), infer_request(np.repeat(x, 8, axis=0))
    logs = cfg.path("serve-logs")
    logs.mkdir(exist_ok=True)
    slug = label.replace(" ", "-")
    servers = {"batched": Served(path, cfg.threads, 8, 0.0, logs / f"{slug}-batched.log"),
               "batched, 5 ms": Served(path, cfg.threads, 8, 5.0, logs / f"{slug}-batched-5ms.log"),
               "unbatched": Served(path, cfg.threads, 1, 0.0, logs / f"{slug}-unbatched.log")}
    if parsers:  # the serve extra's httptools against uvicorn's pure-Python h11, batched alike
        servers["h11"] = Served(path, cfg.threads, 8, 0.0, logs / f"{slug}-h11.log", http="h11")
    try:
        for server in servers.values():
            asyncio.run(_load(server.port, request, 2, 0.5, 0.0))  # sessions warm
        results = {mode: {c: asyncio.run(_load(servers[mode].port, request, c, seconds, warmup)) for c in CONCURRENCY}
                   for mode in SWEEP}
        rates = _side_by_side(servers, path, x, (request, request8), cfg.threads, seconds, warmup, rounds)
        if soak_s:
            _soak(section, label, servers["batched"], request, soak_s)
    finally:
        for mode, server in servers.items():
            code = server.stop()
            if code != 0:
                section.notes.append(f"{label}: the {mode} server exited {code} on SIGTERM")
    for c in CONCURRENCY:
        for mode, shown in SWEEP.items():
            load = results[mode][c]
            section.add(f"{label}: concurrency {c}, {shown}", load.images_per_s, "img/s",
                        detail=f"p50 {load.p50_ms:.0f} ms, p99 {load.p99_ms:.0f} ms, errors {load.errors}")
    for what, num, den, target in (
            ("batched / unbatched at concurrency 16", "batched", "unbatched", 1.5),
            ("served (one-image requests batched to 8, c=16) / in-process Model.run batch 8", "batched", "batch 8",
             0.85),
            ("served (8-image requests, c=4) / in-process Model.run batch 8", "requests of 8", "batch 8", 0.85),
            ("served (unbatched, c=16) / in-process Model.run batch 1", "unbatched", "batch 1", 0.85),
            ("in-process Model.run batch 8 / batch 1", "batch 8", "batch 1", None),
            ("httptools / h11 parser, one-image requests batched to 8, c=16", "batched", "h11", None),
            ("httptools / h11 parser, 8-image requests, c=4", "requests of 8", "h11 requests of 8", None)):
        if num not in rates or den not in rates:
            continue
        ratio = paired_ratio(rates[num], rates[den])
        section.add(f"{label}: {what}", ratio, "x", target=f">= {target}x" if target else "",
                    met=ratio >= target if target else None,
                    detail=f"{median(rates[num]):.1f} vs {median(rates[den]):.1f} img/s (medians of {rounds} rounds; "
                           f"per-round ratios {ratio_range(rates[num], rates[den])})")


def _side_by_side(servers: dict[str, Served], path: Path, x: np.ndarray, requests: tuple[bytes, bytes], threads: int,
                  seconds: float, warmup: float, rounds: int) -> dict[str, list[float]]:
    """Images/s of both servers at concurrency 16 (one image per request), of the batched server at concurrency 4
    with 8 images per request (the server's own cost at the in-process batch size, without 8 HTTP round trips
    per batch), and of Model.run in process at batch 8 and 1, in rounds whose order rotates
    (benchmarks.common.interleave's rule): each ratio pairs runs made under the same load."""
    from vggspec.runtime import load

    model = load(path, device="cpu", threads=threads)
    one, eight = requests
    fns = {
        "batched": lambda: asyncio.run(_load(servers["batched"].port, one, 16, seconds, warmup)).images_per_s,
        "unbatched": lambda: asyncio.run(_load(servers["unbatched"].port, one, 16, seconds, warmup)).images_per_s,
        "requests of 8": lambda: 8 * asyncio.run(_load(servers["batched"].port, eight, 4, seconds,
                                                       warmup)).images_per_s,
        "batch 8": lambda: in_process(model, x, 8, seconds),
        "batch 1": lambda: in_process(model, x, 1, seconds),
    }
    if "h11" in servers:
        fns["h11"] = lambda: asyncio.run(_load(servers["h11"].port, one, 16, seconds, warmup)).images_per_s
        fns["h11 requests of 8"] = lambda: 8 * asyncio.run(_load(servers["h11"].port, eight, 4, seconds,
                                                                 warmup)).images_per_s
    names = list(fns)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(fns[name]())
    return rates


def _soak(section: Section, label: str, server: Served, request: bytes, seconds: float) -> None:
    """Steady load (8 clients) for `seconds`; RSS after the first tenth against RSS at the end."""
    samples: list[float] = []

    async def sample() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            samples.append(server.rss_mb())
            await asyncio.sleep(max(1.0, seconds / 40))

    async def both() -> Load:
        result, _ = await asyncio.gather(_load(server.port, request, 8, seconds, 0.0), sample())
        return result

    load = asyncio.run(both())
    base = samples[max(1, len(samples) // 10)]
    growth = (samples[-1] - base) / base
    section.add(f"{label}: soak {seconds:.0f} s at concurrency 8, RSS growth", growth * 100, "%",
                target="< 10 %", met=growth < 0.10,
                detail=f"{base:.0f} -> {samples[-1]:.0f} MB (peak {max(samples):.0f}), "
                       f"{load.images_per_s:.1f} img/s, errors {load.errors}")


def run(cfg: Config) -> Section:
    section = Section("serve", TITLE, command(cfg))
    before = os.getloadavg()
    quick = cfg.quick
    narrow = _model(cfg, "serve_narrow_d.onnx", *NARROW)
    _measure_model(section, cfg, "narrow D 64", narrow, 64, 3.0 if quick else 6.0, 0.5 if quick else 1.5,
                   10.0 if quick else 120.0, 2 if quick else 5, parsers=True)
    if not quick:
        full = _model(cfg, "serve_d.onnx", "D", ())
        _measure_model(section, cfg, "D 224", full, 224, 15.0, 3.0, 0.0, 3)
    after = os.getloadavg()
    section.notes.append(f"os.getloadavg() at the start {before[0]:.2f}/{before[1]:.2f}/{before[2]:.2f}, at the end "
                         f"{after[0]:.2f}/{after[1]:.2f}/{after[2]:.2f}: other engineers' jobs share these 2 cores, "
                         "and the load generator runs beside the server.")
    section.notes.append("Requests: Open Inference Protocol infer, one image per request as a binary tensor "
                         "(1 x 3 x H x W float32; the '8-image requests' row: 8 x 3 x H x W), keep-alive "
                         "connections, one per concurrent client. Server: "
                         f"`vggspec serve --threads {cfg.threads} --max-queue 256`, batched = --max-batch 8 "
                         "(--max-delay-ms 0, the default, or 5), unbatched = --max-batch 1; the side-by-side "
                         "ratios use the default. In-process: vggspec.runtime Model.run on "
                         "the same input repeated to the batch size. Latency p50/p99 over requests finished after "
                         "a warm-up.")
    return section
