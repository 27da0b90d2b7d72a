"""The GPU measurements, run on a CUDA machine as a few short phases (GPU time is scarce).

    python3 benchmarks/gpu_run.py PHASE [PHASE ...] --out DIR [--dry-run]

Phases (each writes DIR/<phase>.json as soon as it ends, so a later failure loses nothing):
    env          the card, driver, CUDA, cuDNN, torch and onnxruntime versions, measured matmul rates
    train        `vggspec train` on CUDA: fp32, bf16 autocast, + channels_last, + --compile (images/s, losses)
    compile_gap  eager against --compile (bf16, channels_last) on two more seeds, and without dropout
    torchrun     `torchrun --nproc-per-node 1` over nccl: runs, and writes the layout a plain run writes
    torch        D inference in torch eager (fp32, tf32, fp16) and torch.compile (fp16), batch 1/8/64
    ort          onnxruntime's CUDA provider: node placement, parity with the CPU provider, dense
                 evaluation at Q = 256/384/512 with flip, throughput fp32/tf32/fp16/int8 with IO binding,
                 and the levers the first lease left untried (see _throughput_variants)

--dry-run runs every phase on the CPU at toy sizes to check the script itself; its figures are not
GPU figures and `benchmarks/gpu.py` refuses to report them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
D_GMACS = 15.470264320  # D's multiply-accumulates per 224 x 224 image
SCALES = (256, 384, 512)


class Plan:
    """Sizes: the real ones on a GPU, toy ones for a dry run on the CPU."""

    def __init__(self, dry: bool, work: Path) -> None:
        self.dry = dry
        self.work = work
        self.device = "cpu" if dry else "cuda"
        self.spec = "D"
        self.sets: tuple[str, ...] = ("width=1/16",) if dry else ()
        self.batches = (1, 2) if dry else (1, 8, 64)
        self.reps = 2 if dry else 15
        self.scales = (224, 240) if dry else SCALES
        self.train_sets = ("classes=10", "norm=batch") + (("width=1/16", "input=32x32x3") if dry else ())
        self.train_batch = 8 if dry else 32
        self.train_epochs = 1 if dry else 6
        self.digit_size = 40 if dry else 256
        self.workers = 2 if dry else 12


# ---------------------------------------------------------------- helpers


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _write(out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(out / f"{name}.json")


def _sh(cmd: list[str], timeout: float = 600, env: dict[str, str] | None = None) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout} s: {exc}"
    except OSError as exc:  # the program is not there (nvidia-smi on a CPU machine)
        return 127, str(exc)
    return p.returncode, p.stdout + p.stderr


def _median_time(fn: Callable[[], Any], reps: int, warmup: int = 3, inner: int = 1) -> float:
    """Median wall time of `inner` back-to-back calls, per call (fn must synchronise the device itself)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t) / inner)
    return float(np.median(samples))


def _rate(batch: int, sec: float) -> dict[str, float]:
    return {"ms": sec * 1e3, "images_per_s": batch / sec, "tflops": 2 * D_GMACS * batch / sec / 1e3}


def _weights(plan: Plan) -> tuple[Any, dict[str, np.ndarray]]:
    """D (the graph and its seeded numpy weights): torch and onnxruntime get the very same arrays.

    He (kaiming) initialisation: D's own N(0, 0.01) shrinks the signal ~30x per layer, so its logits
    are ~1e-7, its posteriors uniform and fp16 underflows; parity checks on those would prove nothing.
    """
    from vggspec import load_spec
    from vggspec.weights import init_weights

    graph = load_spec(plan.spec, plan.sets)
    return graph, init_weights(graph, "kaiming", seed=0)


def _images(folder: Path, n: int, size: int) -> list[Path]:
    """A few natural-looking test images (smooth colour fields with strokes), written as PNG."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), np.sin(xx * yy * 5)], -1) * 90 + 128
        im = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            draw.line([tuple(rng.integers(0, size, 2)), tuple(rng.integers(0, size, 2))],
                      fill=tuple(int(v) for v in rng.integers(0, 255, 3)), width=int(size / 30) + 1)
        paths.append(folder / f"img{i}.png")
        im.save(paths[-1])
    return paths


# ---------------------------------------------------------------- env


def phase_env(plan: Plan) -> dict[str, Any]:
    import torch

    r: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                         "cpu_count": os.cpu_count()}
    code, smi = _sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                     "--format=csv,noheader"], timeout=30)
    r["nvidia_smi"] = smi.strip() if code == 0 else f"failed ({code}): {smi.strip()[:200]}"
    try:
        import onnxruntime as ort

        r["onnxruntime"] = ort.__version__
        r["ort_file"] = ort.__file__
        r["ort_providers"] = ort.get_available_providers()
    except Exception as exc:  # the phase still reports torch's side
        r["onnxruntime"] = f"import failed: {exc}"
    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        r.update(card=p.name, sms=p.multi_processor_count, memory_gib=p.total_memory / 2**30,
                 capability=f"{p.major}.{p.minor}")
        r["matmul_tflops"] = _matmul_rates()
    return r


def _matmul_rates(n: int = 8192) -> dict[str, float]:
    """What the card sustains on a large square product: the practical ceiling next to the datasheet."""
    import torch

    out = {}
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                              ("fp16", torch.float16, False), ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)

        def mm(a: Any = a, b: Any = b) -> None:
            a @ b
            torch.cuda.synchronize()

        out[name] = 2 * n**3 / _median_time(mm, 5, warmup=2) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


# ---------------------------------------------------------------- training


def _digits(plan: Plan) -> Path:
    data = plan.work / f"digits{plan.digit_size}"
    if not (data / "train").exists():
        code, text = _sh([sys.executable, "-m", "vggspec", "data", "digits", str(data),
                          "--size", str(plan.digit_size)], timeout=300)
        if code:
            raise RuntimeError(f"vggspec data digits failed: {text[-2000:]}")
    return data


TRAIN_MODES = {
    "fp32": (),
    "bf16": ("--bf16",),
    "bf16_channels_last": ("--bf16", "--channels-last"),
    "bf16_channels_last_compile": ("--bf16", "--channels-last", "--compile"),
}


def _train_cmd(plan: Plan, data: Path, run: Path, flags: tuple[str, ...], epochs: int, seed: int = 0,
               sets: tuple[str, ...] = ()) -> list[str]:
    sets = tuple(a for s in (*plan.train_sets, *sets) for a in ("--set", s))
    return ["-m", "vggspec", "train", plan.spec, *sets, "--data", str(data), "-o", str(run),
            "--device", plan.device, "--batch-size", str(plan.train_batch), "--epochs", str(epochs),
            "--workers", str(plan.workers), "--lr", "0.01", "--no-progress", "--seed", str(seed), *flags]


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _train_run(plan: Plan, data: Path, name: str, flags: tuple[str, ...], seed: int = 0,
               sets: tuple[str, ...] = ()) -> dict[str, Any]:
    """One `vggspec train` on the device: its epochs' metrics and speed (metrics also copied to --out)."""
    run = plan.work / f"train_{name}"
    shutil.rmtree(run, ignore_errors=True)
    _log(f"train {name}")
    t = time.perf_counter()
    code, text = _sh([sys.executable, *_train_cmd(plan, data, run, flags, plan.train_epochs, seed, sets)],
                     timeout=400)
    rows = _metrics(run)
    if plan.device == "cuda" and rows:
        shutil.copy(run / "metrics.jsonl", plan.out / f"metrics_{name}.jsonl")
    return {"flags": " ".join(flags), "seed": seed, "sets": list(sets), "rc": code,
            "wall_s": time.perf_counter() - t, "epochs": rows, "tail": text[-1500:] if code else "",
            # the first epoch holds cuDNN's autotuning and torch.compile's compilation
            "images_per_s_after_first_epoch": float(np.median([x["images_per_s"] for x in rows[1:]]))
            if len(rows) > 1 else None}


def phase_train(plan: Plan) -> dict[str, Any]:
    data = _digits(plan)
    r: dict[str, Any] = {"spec": plan.spec, "sets": plan.train_sets, "batch": plan.train_batch,
                         "epochs": plan.train_epochs, "data": f"digits at {plan.digit_size} px", "modes": {}}
    for mode, flags in TRAIN_MODES.items():
        r["modes"][mode] = _train_run(plan, data, mode, flags)
    return r


def phase_compile_gap(plan: Plan) -> dict[str, Any]:
    """The first lease's compiled run trailed eager by up to 0.74 in loss, on one seed. Is it compile, or
    dropout drawing other masks from another random stream? bf16 + channels_last, eager against compiled,
    on two new seeds with the spec's dropout and on one seed with none."""
    data = _digits(plan)
    base = TRAIN_MODES["bf16_channels_last"]
    r: dict[str, Any] = {"spec": plan.spec, "sets": plan.train_sets, "batch": plan.train_batch,
                         "epochs": plan.train_epochs, "runs": {}}
    for seed, sets in ((1, ()), (2, ()), (1, ("dropout=0",))):
        for compiled in (False, True):
            name = f"{'compile' if compiled else 'eager'}_seed{seed}" + ("_nodropout" if sets else "")
            flags = (*base, "--compile") if compiled else base
            r["runs"][name] = _train_run(plan, data, name, flags, seed, sets)
    return r


def phase_torchrun(plan: Plan) -> dict[str, Any]:
    """One process under torchrun (nccl on CUDA) against a plain run: the same files, the same keys."""
    data = _digits(plan)
    runs = {"plain": plan.work / "run_plain", "torchrun": plan.work / "run_torchrun"}
    r: dict[str, Any] = {}
    for name, run in runs.items():
        shutil.rmtree(run, ignore_errors=True)
        cmd = _train_cmd(plan, data, run, (), 1)
        if name == "torchrun":
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", *cmd]
        code, text = _sh([sys.executable, *cmd], timeout=300, env={"NCCL_DEBUG": "INFO"})
        files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()) if run.exists() else []
        nccl_lines = [ln for ln in text.splitlines() if "NCCL INFO" in ln]
        r[name] = {"rc": code, "files": files, "nccl_info_lines": len(nccl_lines),
                   "nccl_sample": nccl_lines[:3], "tail": text[-1500:] if code else ""}
    r["same_layout"] = r["plain"]["files"] == r["torchrun"]["files"]
    r["same_keys"] = _checkpoint_keys(runs["plain"]) == _checkpoint_keys(runs["torchrun"])
    return r


def _checkpoint_keys(run: Path) -> list[str]:
    from safetensors import safe_open

    files = sorted(run.glob("*.safetensors"))
    if not files:
        return []
    with safe_open(str(files[0]), "np") as f:
        return sorted(f.keys())


# ---------------------------------------------------------------- torch inference


def phase_torch(plan: Plan) -> dict[str, Any]:
    import torch

    from vggspec import to_torch

    graph, weights = _weights(plan)
    dev = torch.device(plan.device)
    torch.backends.cudnn.benchmark = True
    c, h, w = graph.meta.input_shape
    r: dict[str, Any] = {"eager": {}, "compile": {}}
    variants = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "fp16": (torch.float16, False)}
    for name, (dtype, tf32) in variants.items():
        if plan.device == "cpu" and dtype == torch.float16:
            continue
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        model = to_torch(graph, weights=weights).eval().to(dev, dtype=dtype, memory_format=torch.channels_last)
        r["eager"][name] = {}
        for batch in plan.batches:
            x = torch.randn(batch, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            r["eager"][name][f"b{batch}"] = _rate(batch, _time_torch(model, x, plan))
        _log(f"torch eager {name}: {r['eager'][name]}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if plan.device == "cpu" else torch.float16
    model = to_torch(graph, weights=weights).eval().to(dev, dtype=dtype, memory_format=torch.channels_last)
    compiled = torch.compile(model, dynamic=False)  # one static graph per batch size
    for batch in reversed(plan.batches):  # the largest batch (the target's) first, while time lasts
        x = torch.randn(batch, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
        compile_s = time.perf_counter() - t
        r["compile"][f"b{batch}"] = {**_rate(batch, _time_torch(compiled, x, plan)), "compile_s": compile_s}
        _log(f"torch.compile {batch}: {r['compile'][f'b{batch}']}")
    r["compile_dtype"] = str(dtype)
    return r


def _time_torch(model: Any, x: Any, plan: Plan) -> float:
    import torch

    def call() -> None:
        with torch.inference_mode():
            model(x)
        if plan.device == "cuda":
            torch.cuda.synchronize()

    return _median_time(call, plan.reps, warmup=3, inner=10 if len(x) == 1 else 1)


# ---------------------------------------------------------------- onnxruntime


def _export(plan: Plan) -> dict[str, Path]:
    from vggspec import export_onnx

    graph, weights = _weights(plan)
    paths = {"fp32": plan.work / "d.onnx", "dense": plan.work / "d_dense.onnx", "fp16": plan.work / "d_fp16.onnx"}
    export_onnx(graph, paths["fp32"], weights=weights)
    export_onnx(graph, paths["dense"], weights=weights, fully_conv=True)
    export_onnx(graph, paths["fp16"], weights=weights, precision="fp16")
    return paths


def _session(path: Path, provider: str, profile: str | None = None, disabled: tuple[str, ...] = (),
             **extra: str) -> Any:
    import onnxruntime as ort

    from vggspec.runtime.session import session_options

    opts = session_options()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    kw: dict[str, Any] = {"disabled_optimizers": list(disabled)} if disabled else {}
    if provider == CPU:
        return ort.InferenceSession(str(path), sess_options=opts, providers=[CPU], **kw)
    # onnxruntime's defaults otherwise: TF32 on (use_tf32=1), NCHW; `extra` overrides.
    cuda_opts = {"cudnn_conv_algo_search": "EXHAUSTIVE", **extra}
    return ort.InferenceSession(str(path), sess_options=opts, providers=[(provider, cuda_opts), CPU], **kw)


def _placement(path: Path, provider: str, x: np.ndarray, work: Path) -> dict[str, Any]:
    """Which provider ran each node, read from onnxruntime's own profile of one run."""
    sess = _session(path, provider, profile=str(work / f"prof_{path.stem}"))
    sess.run(None, {"input": x})
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    nodes: dict[str, dict[str, float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            p = e.get("args", {}).get("provider", "?")
            d = nodes.setdefault(p, {"nodes": 0, "us": 0.0})
            d["nodes"] += 1
            d["us"] += float(e.get("dur", 0))
    cpu_ops = sorted({e["args"].get("op_name", "?") for e in events if e.get("cat") == "Node"
                      and e.get("args", {}).get("provider") == CPU and e["name"].endswith("_kernel_time")})
    return {"session_providers": sess.get_providers(), "by_provider": nodes, "cpu_ops": cpu_ops}


def _strict(path: Path, provider: str) -> str:
    """A session that may not hand any node to the CPU: 'ok', or onnxruntime's refusal."""
    import onnxruntime as ort

    from vggspec.runtime.session import session_options

    opts = session_options()
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(path), sess_options=opts, providers=[provider])
        return "ok"
    except Exception as exc:  # onnxruntime's own exception types
        return f"refused: {str(exc).strip()[:300]}"


def _vggspec_model(path: Path, device: str) -> dict[str, Any]:
    """The user's path: vggspec's runtime with --device cuda (which refuses a silent CPU fallback)."""
    from vggspec.runtime.session import Model

    free_before = _free_mib()
    m = Model(path, device=device)
    x = np.zeros((1, 3, *m.info.input_size), np.float32)
    m.run(x)
    return {"provider": m.provider, "io_binding": m.io_binding, "device_mib_taken": free_before - _free_mib()}


def _free_mib() -> float:
    try:
        import torch

        return torch.cuda.mem_get_info()[0] / 2**20 if torch.cuda.is_available() else 0.0
    except Exception:  # no torch, no CUDA: not a proof either way
        return 0.0


def _with_logits(path: Path) -> tuple[Path, str]:
    """A copy of the model that also outputs fc8 (the scores before the soft-max): parity is judged there."""
    import onnx

    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.name == "fc8")
    half = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    elem = onnx.TensorProto.FLOAT16 if half else onnx.TensorProto.FLOAT
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], elem, None))
    out = path.with_name(path.stem + "_logits.onnx")
    onnx.save(model, str(out))
    return out, node.output[0]


def _parity(path: Path, provider: str, x: np.ndarray, reference: Path | None = None) -> dict[str, Any]:
    """The GPU's logits and posteriors against the CPU provider's (on `reference`, the fp32 model, if given)."""
    model, logits = _with_logits(path)
    ref, ref_logits = _with_logits(reference) if reference else (model, logits)
    cpu = [a.astype(np.float64) for a in _session(ref, CPU).run([ref_logits, "probs"], {"input": x})]
    r: dict[str, Any] = {"logit_std": float(cpu[0].std()), "max_prob": float(cpu[1].max())}
    for name, extra in (("strict_fp32", {"use_tf32": "0"}), ("tf32", {}), ("tf32_nhwc", {"prefer_nhwc": "1"})):
        gpu = [a.astype(np.float64) for a in _session(model, provider, **extra).run([logits, "probs"], {"input": x})]
        flat_g, flat_c = gpu[0].reshape(len(x), -1), cpu[0].reshape(len(x), -1)
        r[name] = {"logits_relative_l2": float(np.linalg.norm(gpu[0] - cpu[0]) / np.linalg.norm(cpu[0])),
                   "probs_max_abs": float(np.abs(gpu[1] - cpu[1]).max()),
                   "top1_agreement": float(np.mean(flat_g.argmax(1) == flat_c.argmax(1)))}
    return r


def _dense(path: Path, device: str, plan: Plan) -> dict[str, Any]:
    """Dense evaluation (flip on) through vggspec's protocol code, on `device` and on the CPU."""
    from vggspec.imaging import load_image, rescale, to_array
    from vggspec.runtime.protocols import dense_posterior
    from vggspec.runtime.session import Model

    images = _images(plan.work / "dense_images", 3, max(plan.scales) + 64)
    gpu, cpu = Model(path, device=device), Model(path, device="cpu")
    r: dict[str, Any] = {"provider": gpu.provider}
    for q in plan.scales:
        diffs, agree, secs = [], 0, []
        for img in images:
            px = to_array(rescale(load_image(str(img), 3), q))
            dense_posterior(gpu, px, flip=True, q=q)  # first call at a new shape: cuDNN's search
            t = time.perf_counter()
            pg = dense_posterior(gpu, px, flip=True, q=q)
            secs.append(time.perf_counter() - t)
            pc = dense_posterior(cpu, px, flip=True, q=q)
            diffs.append(float(np.abs(pg - pc).max()))
            agree += int(pg.argmax() == pc.argmax())
        r[f"Q{q}"] = {"max_abs_vs_cpu": max(diffs), "top1_agreement": agree / len(images),
                      "ms_per_image_with_flip": 1e3 * float(np.median(secs)), "shape": list(px.shape)}
    return r


def _ort_rate(sess: Any, x: np.ndarray, plan: Plan, device: str) -> float:
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output("probs", device)

    def call() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return _median_time(call, plan.reps, warmup=3, inner=10 if len(x) == 1 else 1)


def _int8(plan: Plan, provider: str, device: str) -> dict[str, Any]:
    from vggspec import export_onnx

    graph, weights = _weights(plan)
    calib = plan.work / "calib"
    _images(calib / "any", 8, 256)
    path = plan.work / "d_int8.onnx"
    t = time.perf_counter()
    export_onnx(graph, path, weights=weights, precision="int8", calibration=calib)
    r: dict[str, Any] = {"export_s": time.perf_counter() - t}
    x = np.random.default_rng(1).standard_normal((plan.batches[-1], 3, *graph.meta.input_shape[1:]), np.float32)
    r["placement"] = _placement(path, provider, x[:1], plan.work)
    sess = _session(path, provider)
    r[f"b{len(x)}"] = _rate(len(x), _ort_rate(sess, x, plan, device))
    return r


def _cli(paths: dict[str, Path], plan: Plan) -> dict[str, Any]:
    """`vggspec predict` as a user runs it (a fresh process, no torch imported): --device cuda and auto."""
    images = _images(plan.work / "cli_images", 2, 300)
    r = {}
    for device in ("cuda", "auto"):
        args = ["predict", str(paths["dense"]), *map(str, images), "--scales", ",".join(map(str, plan.scales)),
                "--device", "cpu" if plan.dry else device, "--top", "1"]
        probe = ("import sys, atexit; atexit.register(lambda: print('torch loaded:', 'torch' in sys.modules, "
                 f"file=sys.stderr)); from vggspec.cli import main; main({args!r}, prog_name='vggspec')")
        code, text = _sh([sys.executable, "-c", probe], timeout=300)
        r[device] = {"rc": code, "output": text[-1200:], "torch_loaded": "torch loaded: True" in text}
    return r


def _throughput_variants(paths: dict[str, Path]) -> list[tuple[str, Path, dict[str, str], tuple[str, ...]]]:
    """(name, model, CUDA provider options, graph optimizers disabled) of each throughput row.

    The last three are the levers left untried by the first lease, on the fastest setting it found
    (fp16 NHWC, 0.89x torch eager): cuDNN refused its fused conv+bias+ReLU plans for fp16 ("No execution
    plans support the graph", once per layer), so onnxruntime's ConvActivationFusion may cost more than
    it saves there; CUDA graphs remove the per-kernel launch cost (IO binding keeps the addresses fixed,
    as they require); and the heuristic algorithm search is what a user gets without EXHAUSTIVE."""
    nhwc = {"prefer_nhwc": "1"}
    return [("strict_fp32", paths["fp32"], {"use_tf32": "0"}, ()), ("tf32", paths["fp32"], {}, ()),
            ("tf32_nhwc", paths["fp32"], nhwc, ()), ("fp16", paths["fp16"], {}, ()),
            ("fp16_nhwc", paths["fp16"], nhwc, ()),
            ("fp16_nhwc_unfused", paths["fp16"], nhwc, ("ConvActivationFusion",)),
            ("fp16_nhwc_cuda_graph", paths["fp16"], {**nhwc, "enable_cuda_graph": "1"}, ()),
            ("fp16_nhwc_heuristic", paths["fp16"], {**nhwc, "cudnn_conv_algo_search": "HEURISTIC"}, ())]


def phase_ort(plan: Plan) -> dict[str, Any]:
    import onnxruntime as ort

    provider = CPU if plan.dry else CUDA
    device = "cpu" if plan.dry else "cuda"
    r: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                         "provider": provider}
    t = time.perf_counter()
    paths = _export(plan)
    r["export_s"] = time.perf_counter() - t
    r["cli"] = _cli(paths, plan)
    _log(f"cli: {r['cli']}")
    graph, _ = _weights(plan)
    size = graph.meta.input_shape[1:]
    x = np.random.default_rng(0).standard_normal((8, 3, *size), np.float32)
    for form in ("fp32", "dense"):
        xin = x if form == "fp32" else np.random.default_rng(0).standard_normal((2, 3, 256, 256), np.float32)
        r[f"{form}_vggspec_model"] = _vggspec_model(paths[form], device)
        r[f"{form}_vggspec_auto"] = _vggspec_model(paths[form], "auto")
        r[f"{form}_placement"] = _placement(paths[form], provider, xin[:1], plan.work)
        r[f"{form}_strict"] = "not tried on the CPU" if plan.dry else _strict(paths[form], provider)
        r[f"{form}_parity"] = _parity(paths[form], provider, xin)
        _log(f"ort {form}: {r[f'{form}_placement']} {r[f'{form}_parity']}")
    r["fp16_parity"] = _parity(paths["fp16"], provider, x, reference=paths["fp32"])
    r["dense"] = _dense(paths["dense"], device, plan)
    _log(f"ort dense: {r['dense']}")
    r["throughput"] = {}
    # use_tf32=0 only for strict fp32: with it, cuDNN's fp16 convolutions also lose their fast kernels
    # (measured on the H200: fp16 at batch 64 went from 5,885 to 3,431 images/s).
    for name, path, extra, disabled in _throughput_variants(paths):
        try:
            def new_session() -> Any:
                return _session(path, provider, disabled=disabled, **({} if plan.dry else extra))  # noqa: B023

            sess = new_session()
            dtype = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
            r["throughput"][name] = {}
            for batch in plan.batches:
                if "enable_cuda_graph" in extra and batch != plan.batches[0]:
                    sess = new_session()  # a captured graph is for one input shape
                xb = np.random.default_rng(batch).standard_normal((batch, 3, *size)).astype(dtype)
                r["throughput"][name][f"b{batch}"] = _rate(batch, _ort_rate(sess, xb, plan, device))
        except Exception as exc:  # one variant's failure is a finding, not the end of the phase
            r["throughput"][name] = {"error": str(exc).strip()[:500]}
        _log(f"ort {name}: {r['throughput'][name]}")
    try:
        r["int8"] = _int8(plan, provider, device)
    except Exception as exc:  # the QDQ graph may not run on the provider: report it
        r["int8"] = {"error": str(exc).strip()[:500]}
    _log(f"ort int8: {r['int8']}")
    return r


PHASES: dict[str, Callable[[Plan], dict[str, Any]]] = {
    "env": phase_env, "train": phase_train, "torchrun": phase_torchrun, "torch": phase_torch, "ort": phase_ort,
    "compile_gap": phase_compile_gap,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phases", nargs="+", choices=list(PHASES))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vggspec-gpu")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    plan = Plan(args.dry_run, args.work)
    plan.out = args.out  # type: ignore[attr-defined]
    failed = 0
    for name in args.phases:
        _log(f"phase {name}")
        t = time.perf_counter()
        try:
            result = PHASES[name](plan)
        except Exception as exc:  # keep going: the other phases' figures are still worth having
            import traceback

            result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
            failed += 1
        result.update(phase_seconds=time.perf_counter() - t, dry_run=plan.dry,
                      when=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        _write(args.out, name, result)
        _log(f"phase {name} done in {result['phase_seconds']:.0f} s" + (f": {result.get('error')}" if
                                                                           "error" in result else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
