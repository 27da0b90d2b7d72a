"""Section 4: fp16 and int8 (static QDQ) against fp32 on the CPU, all through vggspec export + onnxruntime.

- speed: D at 224, batch 1 (and 8 in a full run), fp32 / fp16 / int8 interleaved;
- accuracy on real data: a digits model trained here with `vggspec data digits` + `vggspec train`
  (a short schedule; or `--digits-run RUNDIR` to reuse one), exported three ways, int8 calibrated on
  the val split; top-1 agreement with fp32 and top-1 accuracy on the test split;
- D's posteriors: relative L2 error against fp32 on held-out synthetic images (the calibration set
  is disjoint), and the same for the centred log-posteriors (the logits up to a constant), because
  D's seeded weights give flat posteriors whose error says little on its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .common import (
    ROOT,
    Config,
    d_onnx,
    interleave,
    median,
    ort_session,
    paired_ratio,
    run_child,
    spread,
    thread_env,
)
from .report import Section

TITLE = "4. Precision: fp16 and int8 (static QDQ) against fp32, CPU"
PRECISIONS = ("fp32", "fp16", "int8")
N_CALIBRATION = 8
N_HELD_OUT = 4
DIGITS_SPEC = "examples/digits.vgg"


def command(cfg: Config) -> str:
    run = f" --digits-run {cfg.digits_run}" if cfg.digits_run else ""
    return ".venv/bin/python -m benchmarks --only precision" + (" --quick" if cfg.quick else "") + run


def synthetic_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (256, 320)) -> list[Path]:
    """Smooth random colour images (bilinear-upsampled noise): image-like statistics, no download needed."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        if not path.exists():
            coarse = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
            Image.fromarray(coarse).resize((size[1], size[0]), Image.BILINEAR).save(path)
        paths.append(path)
    return paths


def _d_models(cfg: Config) -> dict[str, Path]:
    calib = cfg.path("calibration_d")
    synthetic_images(calib, N_CALIBRATION, seed=1)
    return {"fp32": d_onnx(cfg, "d_fp32.onnx"), "fp16": d_onnx(cfg, "d_fp16.onnx", precision="fp16"),
            "int8": d_onnx(cfg, "d_int8.onnx", precision="int8", calibration=calib)}


def _d_inputs(cfg: Config, model: Path) -> np.ndarray:
    """Held-out images rescaled to Q = 256, centre 224 crops, normalised as the model's metadata says."""
    from vggspec.imaging import load_pixels
    from vggspec.runtime import load
    from vggspec.runtime.preprocess import to_input

    info = load(model, device="cpu", threads=cfg.threads).info
    h, w = info.input_size
    crops = []
    for path in synthetic_images(cfg.path("held_out_d"), N_HELD_OUT, seed=2):
        px = load_pixels(path, info.channels, 256)
        top, left = (px.shape[0] - h) // 2, (px.shape[1] - w) // 2
        crops.append(px[top:top + h, left:left + w])
    return to_input(np.stack(crops), info)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _centred_log(p: np.ndarray) -> np.ndarray:
    lp = np.log(np.maximum(p.astype(np.float64), 1e-30))
    return lp - lp.mean(axis=1, keepdims=True)


def _d_rows(cfg: Config, section: Section, vnni: bool) -> None:
    models = _d_models(cfg)
    sessions = {k: ort_session(v, cfg.threads) for k, v in models.items()}
    x = _d_inputs(cfg, models["fp32"])
    probs = {k: s.run(["probs"], {"input": x})[0] for k, s in sessions.items()}
    for k in ("fp16", "int8"):
        agree = float(np.mean(probs[k].argmax(1) == probs["fp32"].argmax(1)))
        section.add(f"D {k}: posterior relative error vs fp32", _rel(probs[k], probs["fp32"]), "",
                    detail=f"centred log-posteriors {_rel(_centred_log(probs[k]), _centred_log(probs['fp32'])):.3g}; "
                           f"top-1 same on {agree:.0%} of {len(x)} images; max p {probs['fp32'].max():.3g}")
    for batch in (1,) if cfg.quick else (1, 8):
        xb = np.repeat(x[:1], batch, axis=0)
        fns = {k: (lambda s=s, xb=xb: s.run(["probs"], {"input": xb})) for k, s in sessions.items()}
        t = interleave(fns, cfg.reps(5 if batch == 1 else 3, 2), prime=True)
        for k in ("fp16", "int8"):
            speed = paired_ratio(t["fp32"], t[k])
            target = ">= 2x (VNNI CPU)" if k == "int8" and vnni else ""
            section.add(f"D b{batch} {k}: speed-up over fp32", speed, "x", target, speed >= 2 if target else None,
                        detail=f"fp32 {median(t['fp32']) * 1e3:.0f} ms, {k} {median(t[k]) * 1e3:.0f} ms "
                               f"(+-{spread(t[k]):.0%}); best-of-{len(t[k])} {min(t['fp32']) / min(t[k]):.2f}x")


def fp16_note(cfg: Config, path: Path) -> str:
    """Why fp16 is no faster on this CPU, from onnxruntime's profile: the element type its Conv kernels ran on."""
    import json

    sess = ort_session(path, cfg.threads, profile=str(cfg.path("ort_profile_fp16")))
    x = np.zeros((1, 3, 224, 224), np.float32)
    for _ in range(2):
        sess.run(["probs"], {"input": x})
    nodes = [e for e in json.loads(Path(sess.end_profiling()).read_text())
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    convs = [e for e in nodes if e["args"].get("op_name") == "Conv"]
    types = sorted({t for e in convs for t in e["args"]["input_type_shape"][0]})
    freed = sum(e["name"].startswith("InsertedPrecisionFreeCast") for e in convs)
    return (f"fp16 profile (enable_profiling): the {len(convs) // 2} Conv kernels per run take {'/'.join(types)} "
            f"inputs and {freed // 2} of them are onnxruntime's `InsertedPrecisionFreeCast_*` nodes: its CPU "
            "provider has no x86 fp16 convolution, so at load it inserts casts and runs fp32 kernels (weights "
            "rounded to fp16, arithmetic in fp32). fp16 can only be as fast as fp32 here; it is a GPU/ARM format.")


# ---------------------------------------------------------------- digits


def _vggspec(*args: str, env: dict[str, str]) -> None:
    res = run_child(["-m", "vggspec", *args], env, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"vggspec {' '.join(args[:2])} failed (exit {res.returncode}): {res.output[-800:]}")


def digits_run(cfg: Config) -> tuple[Path, Path]:
    """(data folder, run folder): the given --digits-run, or a short training run made (once) in the cache."""
    data = cfg.path("digits")
    env = thread_env(cfg.threads)
    if not (data / "test").is_dir():
        _vggspec("data", "digits", str(data), "--force", env=env)
    if cfg.digits_run:
        return data, cfg.digits_run
    # Keyed by the example's text, so an edited examples/digits.vgg is trained afresh.
    digest = hashlib.sha256((ROOT / DIGITS_SPEC).read_bytes()).hexdigest()[:8]
    run = cfg.path(f"digits_run_{'quick' if cfg.quick else 'full'}_{digest}")
    if not (run / "model.safetensors").is_file():
        epochs = "2" if cfg.quick else "12"
        # No flips: a mirrored digit is another glyph.
        _vggspec("train", DIGITS_SPEC, "--data", str(data), "-o", str(run), "--epochs", epochs, "--batch-size", "64",
                 "--lr", "0.01", "--no-flip", "--workers", "0", "--no-progress", env=env)
    return data, run


def _digits_models(cfg: Config, data: Path, run: Path) -> dict[str, Path]:
    from vggspec import export_onnx
    from vggspec.cli.export import _graph_and_weights

    out = {}
    for p in PRECISIONS:
        path = cfg.path(f"digits_{run.name}_{p}.onnx")
        if not path.exists():
            graph, kw = _graph_and_weights(None, str(run / "model.safetensors"), ())
            calib = str(data / "val") if p == "int8" else None
            export_onnx(graph, path, precision=p, calibration=calib, **kw)
        out[p] = path
    return out


def _digits_test(data: Path, info: object) -> tuple[np.ndarray, np.ndarray]:
    from vggspec.imaging import load_pixels
    from vggspec.runtime import list_dataset
    from vggspec.runtime.preprocess import to_input

    items, _ = list_dataset(data / "test", info.labels)  # type: ignore[attr-defined]
    pixels = np.stack([load_pixels(p, info.channels) for p, _ in items])  # type: ignore[attr-defined]
    return to_input(pixels, info), np.array([t for _, t in items])


def _digits_rows(cfg: Config, section: Section) -> None:
    from vggspec.runtime import load

    data, run = digits_run(cfg)
    models = {k: load(v, device="cpu", threads=cfg.threads) for k, v in _digits_models(cfg, data, run).items()}
    x, y = _digits_test(data, models["fp32"].info)
    top1 = {k: m.run(x)[0].argmax(1) for k, m in models.items()}
    section.add("digits fp32: test top-1 accuracy", float(np.mean(top1["fp32"] == y)) * 100, "%",
                detail=f"{len(y)} test images, run {run}")
    for k in ("fp16", "int8"):
        agree = float(np.mean(top1[k] == top1["fp32"]))
        section.add(f"digits {k}: top-1 agreement with fp32", agree * 100, "%", ">= 99%" if k == "int8" else "",
                    agree >= 0.99 if k == "int8" else None, detail=f"accuracy {np.mean(top1[k] == y):.2%}")


def run(cfg: Config) -> Section:
    from .common import describe_machine

    section = Section("precision", TITLE, command(cfg))
    vnni = describe_machine().vnni
    _d_rows(cfg, section, vnni)
    section.notes.append(fp16_note(cfg, cfg.path("d_fp16.onnx")))
    _digits_rows(cfg, section)
    section.notes.append("CPU " + ("has" if vnni else "lacks") + " VNNI; the int8 target applies only with it.")
    section.notes.append("D's weights are seeded (kaiming), not trained: no ImageNet weights are available offline, "
                         "so D's precision error is measured on synthetic images; accuracy is judged on digits.")
    return section
