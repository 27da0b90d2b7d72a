"""Section 7: the GPU, as one short prepared script (GPU time is scarce).

    .venv/bin/python benchmarks/gpu.py [--spec D] [--out DIR]   # standalone: prints JSON, writes DIR/gpu.json
    .venv/bin/python -m benchmarks --only gpu                   # inside the suite

Measures, when onnxruntime has the CUDA provider and torch sees a CUDA device:
1. parity: onnxruntime CUDA against CPU on the same batch (max relative error of posteriors, top-1 agreement);
2. throughput of D at batch 1 and 64 on CUDA with IO binding (input copied once, outputs left on the
   device), against plain session.run (host copies every call), interleaved;
3. a bf16-autocast training step of the generated module at 224, against the same step in fp32.
Where there is no GPU it says so, plainly, and measures nothing.

Needs onnxruntime-gpu (vggspec[gpu]) in place of onnxruntime for the CUDA provider.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from .common import D_GMACS, Config, d_onnx, interleave, median, paired_ratio  # noqa: E402
from .report import Section  # noqa: E402

TITLE = "7. GPU"
CUDA = "CUDAExecutionProvider"


def command(cfg: Config) -> str:
    return ".venv/bin/python benchmarks/gpu.py --out DIR"


def detect() -> tuple[bool, str]:
    """(usable, why): both onnxruntime's CUDA provider and a torch CUDA device are needed."""
    import onnxruntime as ort

    reasons = []
    if CUDA not in ort.get_available_providers():
        have = ", ".join(ort.get_available_providers())
        reasons.append(f"onnxruntime {ort.__version__} has no {CUDA} (providers: {have})")
    try:
        import torch

        if not torch.cuda.is_available():
            reasons.append(f"torch {torch.__version__} sees no CUDA device")
    except ImportError:
        reasons.append("torch is not installed")
    return not reasons, "; ".join(reasons)


def _session(path: Path, provider: str) -> Any:
    import onnxruntime as ort

    from vggspec.runtime.session import session_options

    return ort.InferenceSession(str(path), sess_options=session_options(), providers=[provider, "CPUExecutionProvider"])


def parity(model: Path, batch: int = 4) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), np.float32)
    cpu = _session(model, "CPUExecutionProvider").run(["probs"], {"input": x})[0]
    gpu = _session(model, CUDA).run(["probs"], {"input": x})[0]
    rel = float(np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu))
    return {"relative_error": rel, "top1_agreement": float(np.mean(gpu.argmax(1) == cpu.argmax(1)))}


def _bound_runner(sess: Any, x: np.ndarray) -> Any:
    """A run with the input on the device (copied once, here) and the output allocated there."""
    import onnxruntime as ort

    binding = sess.io_binding()
    binding.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output("probs", "cuda")

    def run() -> None:
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def throughput(model: Path, batches: tuple[int, ...], reps: int) -> dict[str, dict[str, float]]:
    sess = _session(model, CUDA)
    out = {}
    for batch in batches:
        x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), np.float32)
        t = interleave({"iobinding": _bound_runner(sess, x),
                        "run": lambda x=x: sess.run(["probs"], {"input": x})}, reps, warmup=3, prime=True)
        sec = median(t["iobinding"])
        out[f"b{batch}"] = {"ms": sec * 1e3, "images_per_s": batch / sec, "tflops": 2 * D_GMACS * batch / sec / 1e3,
                            "iobinding_speedup_over_run": paired_ratio(t["run"], t["iobinding"])}
    return out


def bf16_training(spec: str, batch: int, reps: int) -> dict[str, float]:
    """Training steps of the generated module at its input size: bf16 autocast against fp32, interleaved."""
    import torch
    import torch.nn.functional as F

    from vggspec import load_spec, to_torch

    graph = load_spec(spec)
    model = to_torch(graph).cuda().train()
    c, h, w = graph.meta.input_shape
    x = torch.randn(batch, c, h, w, device="cuda")
    y = torch.randint(0, graph.meta.classes, (batch,), device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()

    t = interleave({"bf16": lambda: step(True), "fp32": lambda: step(False)}, reps, warmup=2, prime=True)
    return {"batch": batch, "bf16_images_per_s": batch / median(t["bf16"]),
            "fp32_images_per_s": batch / median(t["fp32"]), "bf16_speedup": paired_ratio(t["fp32"], t["bf16"])}


def measure(cfg: Config, reps: int = 20) -> dict[str, Any]:
    import torch

    model = d_onnx(cfg, "d_fp32.onnx")
    return {"card": torch.cuda.get_device_name(0), "parity": parity(model),
            "inference": throughput(model, (1, 64), reps),
            "bf16_training": bf16_training("D", 64, max(5, reps // 4))}


def _rows(section: Section, r: dict[str, Any]) -> None:
    section.notes.append(f"Card: {r['card']}.")
    p = r["parity"]
    section.add("CUDA vs CPU: posterior relative error", p["relative_error"], "", "< 1e-3", p["relative_error"] < 1e-3,
                detail=f"top-1 agreement {p['top1_agreement']:.0%}")
    for b, v in r["inference"].items():
        section.add(f"D {b} IO binding: images/s", v["images_per_s"], "img/s",
                    detail=f"{v['ms']:.2f} ms, {v['tflops']:.1f} TFLOP/s, {v['iobinding_speedup_over_run']:.2f}x "
                           "over session.run")
    t = r["bf16_training"]
    section.add(f"D b{t['batch']} bf16 training step", t["bf16_images_per_s"], "img/s",
                detail=f"{t['bf16_speedup']:.2f}x fp32 ({t['fp32_images_per_s']:.0f} img/s)")


def run(cfg: Config) -> Section:
    section = Section("gpu", TITLE, command(cfg))
    ok, why = detect()
    if not ok:
        section.add("GPU", "not measured: no GPU on this machine")
        section.notes.append(f"No GPU was available to this run ({why}), so nothing in this section was measured. "
                             f"`{command(cfg)}` (or `.venv/bin/python -m benchmarks --only gpu`) is the prepared "
                             "script to run where one is; it needs onnxruntime-gpu in place of onnxruntime.")
        return section
    _rows(section, measure(cfg, reps=5 if cfg.quick else 20))
    return section


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for gpu.json")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    ok, why = detect()
    if not ok:
        print(json.dumps({"gpu": None, "reason": why}))
        return 0
    result = measure(Config(quick=args.quick), reps=5 if args.quick else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
