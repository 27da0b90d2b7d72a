"""Timing, interleaving, peak memory, machine description and shared artifacts for the benchmark sections.

Every figure the suite reports is a ratio of two things measured in the same run: the candidates
of a comparison are run interleaved (A B C, B C A, C A B, ...) so that a burst of load from another
process on this shared machine hits all of them alike, and each is summarised by its median.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
D_GMACS = 15.470264320  # D's multiply-accumulates per 224 x 224 image (graph.macs / 1e9)
FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass
class Config:
    """What the command line asked for; sections read their sizes from it."""

    quick: bool = False
    threads: int = 2
    cache: Path = Path(os.environ.get("VGGSPEC_BENCH_CACHE", "/tmp/vggspec-bench"))
    digits_run: Path | None = None
    reps_override: int | None = None

    def reps(self, full: int, quick: int = 1) -> int:
        """Repetitions for a measurement: `full` normally, `quick` for a smoke run, or the --reps override."""
        if self.reps_override:
            return self.reps_override
        return quick if self.quick else full

    def path(self, name: str) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        return self.cache / name


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> float:
    """Wall time of one call, in seconds."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
               prime: bool = False) -> dict[str, list[float]]:
    """Time each candidate `reps` times, interleaved, rotating the order every round.

    The rotation keeps any one candidate from always running right after the heaviest one
    (caches, turbo state). Warm-up calls (first-run allocation, lazy init) are not recorded.

    prime: call the candidate once, untimed, right before each timed call. Every runtime here keeps
    its own thread pool (onnxruntime's, torch's OpenMP, numpy's OpenBLAS) and their threads spin
    for a while after a call; measured on this machine, alternating numpy and torch matmuls costs
    each about 30%. Priming hands the cores to the candidate's own pool first, so the timed call
    is its steady state rather than a penalty left by whichever candidate ran before it.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            if prime:
                fns[name]()
            samples[name].append(timed(fns[name]))
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> float:
    """Relative half-range around the median: how noisy a figure was (0.05 = +-5%)."""
    m = median(xs)
    return (max(xs) - min(xs)) / (2 * m) if m and len(xs) > 1 else 0.0


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios num[i] / den[i]: each pair ran back to back, under the same load."""
    return median([a / b for a, b in zip(num, den, strict=True)])


def ratio_range(num: Sequence[float], den: Sequence[float]) -> str:
    """The per-round ratios' range, e.g. "0.88-1.04": whether a ratio is distinguishable from 1."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


# ---------------------------------------------------------------- subprocesses and memory


@dataclass
class ChildResult:
    wall_s: float
    peak_rss_mb: float  # the child's own VmHWM, read by the child itself as it exits
    returncode: int
    output: str = ""


# Runs `python -m MOD ...`, `python -c CODE ...` or `python SCRIPT ...` and, at exit, writes its own VmHWM to stderr.
# Read inside the child because the parent cannot get it cleanly: wait4's ru_maxrss folds in the RSS of the mm the
# child had before exec, i.e. the parent's (vfork/fork share it), so a fat parent inflates every child's figure.
PEAK_WRAPPER = r"""
import atexit, os, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    os.write(2, ("\nVMHWM_KB %d\n" % kb).encode())
atexit.register(_peak)
mode, rest = sys.argv[1], sys.argv[2:]
if mode == "-m":
    sys.argv = rest
    runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
elif mode == "-c":
    sys.argv = ["-c", *rest[1:]]
    exec(compile(rest[0], "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.argv = [mode, *rest]
    runpy.run_path(mode, run_name="__main__")
"""


def run_child(args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 900) -> ChildResult:
    """Run `python ARGS...` in a fresh process: wall time (whole process, imports included) and its peak RSS."""
    import tempfile

    full_env = {**os.environ, **(env or {})}
    argv = [PYTHON, "-c", PEAK_WRAPPER, *args]
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child can never block on it
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        wall = time.perf_counter() - start
        log.seek(0)
        out = log.read().decode(errors="replace")
    marks = [line for line in out.splitlines() if line.startswith("VMHWM_KB ")]
    peak = int(marks[-1].split()[1]) / 1024 if marks else float("nan")
    return ChildResult(wall, peak, proc.returncode, out[-4000:])


def thread_env(threads: int) -> dict[str, str]:
    """Environment pinning every thread pool (OpenMP, MKL, OpenBLAS) to `threads`."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def set_threads(threads: int) -> None:
    """Same thread count for torch, numpy's BLAS and (via session options) onnxruntime."""
    os.environ.update(thread_env(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:
        pass


# ---------------------------------------------------------------- machine


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def _physical_cores() -> int:
    """Distinct (physical id, core id) pairs: whether the logical cores are hyperthreads of fewer cores."""
    pairs, phys = set(), "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                phys = value.strip()
            elif key.strip() == "core id":
                pairs.add((phys, value.strip()))
    except OSError:
        pass
    return len(pairs)


def _mem_total_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:  # not installed, or broken: the report says so rather than failing
        return "not installed"


def load() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass
class CpuSnapshot:
    """Machine-wide busy/total CPU time (/proc/stat) and this process tree's own CPU time, at one moment."""

    busy: float
    total: float
    ours: float

    @classmethod
    def now(cls) -> CpuSnapshot:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        idle = fields[3] + fields[4]  # idle + iowait
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        return cls((sum(fields) - idle) / tick, sum(fields) / tick, ours)

    def others_share(self, later: CpuSnapshot) -> float:
        """Fraction of the machine's CPU time that other processes used between the two snapshots."""
        total = later.total - self.total
        return max(0.0, (later.busy - self.busy) - (later.ours - self.ours)) / total if total > 0 else 0.0


@dataclass
class Machine:
    cpu: str
    cores: int
    physical_cores: int
    usable_cores: int
    flags: list[str]
    memory_gb: float
    versions: dict[str, str]
    date: str
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def describe_machine() -> Machine:
    cpu = _cpuinfo()
    flags = cpu.get("flags", "").split()
    versions = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "onnxruntime", "onnx", "numpy"):
        versions[mod] = _version(mod)
    return Machine(
        cpu=cpu.get("model name", platform.processor() or "unknown"),
        cores=os.cpu_count() or 0,
        physical_cores=_physical_cores(),
        usable_cores=len(os.sched_getaffinity(0)),
        flags=[f for f in FLAGS_OF_INTEREST if f in flags],
        memory_gb=_mem_total_gb(),
        versions=versions,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=load(),
    )


# ---------------------------------------------------------------- shared artifacts (cached between sections)


def d_weights(cfg: Config) -> dict[str, Any]:
    """D's weights, seeded, kaiming init (torchvision's scheme).

    Not the paper's N(0, 0.01): over 16 layers that makes activations shrink towards zero (and
    possibly into denormals, which some kernels handle slowly and others flush), and leaves the
    posteriors uniform, so precision errors would mean nothing.
    """
    from vggspec import load_spec
    from vggspec.weights import init_weights

    return init_weights(load_spec("D"), scheme="kaiming", seed=0)


def d_checkpoint(cfg: Config) -> Path:
    """D's weights as a vggspec checkpoint and as a torchvision .pth, written once per cache folder."""
    ckpt, pth = cfg.path("d.safetensors"), cfg.path("d_torchvision.pth")
    if not (ckpt.exists() and pth.exists()):
        from vggspec import load_spec
        from vggspec.weights import Checkpoint, save_checkpoint
        from vggspec.weights.torchvision import save_pth, to_torchvision

        graph = load_spec("D")
        w = d_weights(cfg)
        save_checkpoint(ckpt, Checkpoint(w, spec=graph.meta.spec_text, preprocessing=graph.meta.preprocessing,
                                         source="init:kaiming:seed=0"))
        save_pth(pth, to_torchvision(graph, w))
    return ckpt


def d_onnx(cfg: Config, name: str, **kwargs: Any) -> Path:
    """D exported with the checkpoint's weights and `kwargs` (export_onnx options), cached by `name`."""
    out = cfg.path(name)
    if not out.exists():
        from vggspec import export_onnx, load_spec
        from vggspec.weights import load_checkpoint

        tensors = load_checkpoint(d_checkpoint(cfg)).tensors
        export_onnx(load_spec("D"), out, weights=tensors, **kwargs)
    return out


def torchvision_vgg16(cfg: Config) -> Any:
    """torchvision's vgg16 holding D's checkpoint weights, in eval mode (built on the meta device: no random init)."""
    import torch
    import torchvision

    from vggspec.weights.torchvision import load_pth

    d_checkpoint(cfg)
    with torch.device("meta"):
        model = torchvision.models.vgg16()
    state = {k: torch.from_numpy(v) for k, v in load_pth(cfg.path("d_torchvision.pth")).items()}
    model.load_state_dict(state, assign=True)
    return model.eval()


def ort_session(path: Path, threads: int, level: str | None = None, profile: str | None = None) -> Any:
    """An onnxruntime CPU session through vggspec's runtime (its session options), optionally overridden."""
    import onnxruntime as ort

    from vggspec.runtime.session import session_options

    opts = session_options(threads)
    if level is not None:
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def sgemm_gflops(threads: int, n: int = 2048) -> dict[str, Callable[[], Any]]:
    """Candidates measuring the machine's float32 matmul rate (numpy's BLAS and torch's), n x n x n."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return {"sgemm numpy": lambda: a @ b, "sgemm torch": lambda: torch.mm(ta, tb)}
