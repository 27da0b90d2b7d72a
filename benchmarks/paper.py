"""Section 8: the paper in miniature. Tables 3 to 6 as trends, on scale-varying handwriting, on 2 cores.

The data set is `vggspec data scenes`: one handwritten digit per 96 x 96 cluttered scene, 20 to 64 px,
splits from disjoint source scans. The networks are the paper's six configurations, eight times narrower
(`--set width=1/8`), on 64 x 64 crops instead of 224 x 224: every scale is the paper's times 64/224, so
S = 256 -> 73, [256, 512] -> [73, 146], Q = {S - 32, S, S + 32} -> {64, 73, 82}, {256, 384, 512} ->
{73, 110, 146}. Everything goes through the command line a user runs: `vggspec train` with the paper's
recipe, `vggspec export`, and `vggspec eval` on onnxruntime, whose per-image predictions give paired
standard errors for every comparison.

Run: `.venv/bin/python -m benchmarks --only paper` (about 40 minutes) or `--quick` (a few minutes).
Writes benchmarks/paper.json (full run only), this section of RESULTS.md, and the heat map picture.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import ROOT, Config
from .report import Section

TITLE = "8. The paper in miniature: Tables 3 to 6 on scale-varying handwriting"
PAPER_JSON = ROOT / "benchmarks" / "paper.json"
HEATMAP_PNG = ROOT / "examples" / "heatmap_scenes.png"

# The paper's networks, narrowed; settings chosen on validation runs (see RESULTS.md notes).
SETS = ("width=1/8", "input=64x64x3", "classes=10", "norm=batch", "init=xavier", "dropout=0")
S_FIXED, JITTER = 73, (73, 146)
Q_FIXED, Q_JITTER = (64, 73, 82), (73, 110, 146)
HEAT_Q = 192  # dense score map (192 / 32 - 2 + 1)^2 = 5 x 5


@dataclass(frozen=True)
class Plan:
    train: int
    val: int
    test: int
    epochs: int  # from scratch (A, A-LRN) and from A (the deeper nets), at fixed S
    tune_epochs: int  # the jittered nets, fine-tuned from their fixed-S twins
    nets: tuple[str, ...]  # fixed S
    jittered: tuple[str, ...]
    batch: int = 32
    patience: int = 3
    jobs: int = 2  # trainings and evaluations side by side, one thread each


FULL = Plan(7000, 1000, 2000, 12, 10, ("A", "A-LRN", "B", "C", "D", "E"), ("D", "E"))
QUICK = Plan(1000, 300, 500, 2, 1, ("A", "D", "E"), ("D", "E"))
SCRATCH = ("A", "A-LRN")  # the paper trained A from random weights; the deeper nets started from A's layers

# The paper's figures (top-1 validation error, %), for the table.
PAPER = {
    ("A", "fixed"): 29.6, ("A-LRN", "fixed"): 29.7, ("B", "fixed"): 28.7, ("C", "fixed"): 28.1,
    ("D", "fixed"): 27.0, ("E", "fixed"): 27.3, ("D", "jittered"): 25.6, ("E", "jittered"): 25.5,
}


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only paper" + (" --quick" if cfg.quick else "")


# ---------------------------------------------------------------- running the CLI


def vggspec(*args: str, log: Path, threads: int = 1) -> str:
    """Run `python -m vggspec ARGS` with its thread pools pinned; the output goes to `log` and is returned."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vggspec", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ vggspec {' '.join(args)}\n{proc.stdout}{proc.stderr}\n[{time.perf_counter() - start:.0f} s]\n")
    if proc.returncode:
        raise RuntimeError(f"vggspec {' '.join(args[:3])} failed ({proc.returncode}): {proc.stderr[-600:]}")
    return proc.stdout


def sets_args(spec_sets: tuple[str, ...]) -> list[str]:
    return [a for s in spec_sets for a in ("--set", s)]


@dataclass
class Net:
    """One trained network: configuration, training scale, its run folder and results."""

    config: str
    jittered: bool
    rundir: Path
    train_seconds: float = 0.0
    val_err: float = math.nan
    rows: dict[str, list[int]] = field(default_factory=dict)  # eval row -> per-image wrong (0/1)

    @property
    def name(self) -> str:
        return f"{self.config} {'S=73..146' if self.jittered else 'S=73'}"

    @property
    def key(self) -> str:
        return f"{self.config}-{'jit' if self.jittered else 'fix'}"

    @property
    def dense(self) -> Path:
        return self.rundir / "dense.onnx"


def make_data(cfg: Config, plan: Plan) -> Path:
    data = cfg.path("paper-quick" if cfg.quick else "paper") / "scenes"
    want = {"train": plan.train, "val": plan.val, "test": plan.test}
    meta = data / "scenes.json"
    if meta.exists() and json.loads(meta.read_text()).get("counts") == want:
        return data
    vggspec("data", "scenes", str(data), "--train", str(plan.train), "--val", str(plan.val),
            "--test", str(plan.test), "--seed", "0", "--force", log=data.parent / "log.txt")
    return data


def _last_train_command(log: Path) -> str | None:
    lines = log.read_text().splitlines() if log.exists() else []
    return next((line for line in reversed(lines) if line.startswith("$ vggspec train ")), None)


def start_from(net: Net, root: Path) -> list[str]:
    """Section 3.1's initialisations: deeper nets take A's first four conv and last three FC layers; jittered
    nets are fine-tuned from the fixed-S net of their configuration at a tenth of the rate."""
    if net.jittered:
        return ["--weights", str(root / f"{net.config}-fix" / "model.safetensors"), "--lr", "0.001"]
    if net.config not in SCRATCH:
        return ["--init-from", str(root / "A-fix" / "model.safetensors")]
    return []


def train(net: Net, data: Path, plan: Plan) -> Net:
    """`vggspec train` with the paper's recipe (scaled down), then the dense ONNX form; skipped when done."""
    metrics = net.rundir / "metrics.jsonl"
    epochs = plan.tune_epochs if net.jittered else plan.epochs
    log = net.rundir.parent / f"{net.key}.log"
    scale = f"{JITTER[0]}:{JITTER[1]}" if net.jittered else str(S_FIXED)
    args = ["train", net.config, *sets_args(SETS), "--data", str(data), "-o", str(net.rundir),
            *start_from(net, net.rundir.parent), "--scale", scale, "--batch-size", str(plan.batch),
            "--epochs", str(epochs), "--patience", str(plan.patience), "--no-flip", "--workers", "0",
            "--threads", "1", "--no-progress"]
    # A cached run counts only when the log says it was trained by this very command: other settings retrain.
    done = metrics.exists() and _last_train_command(log) == f"$ vggspec {' '.join(args)}"
    if not done:
        if net.rundir.exists():
            import shutil

            shutil.rmtree(net.rundir)
        start = time.perf_counter()
        vggspec(*args, log=log)
        (net.rundir / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    wall = net.rundir / "wall_seconds.txt"  # the whole `vggspec train` command: set-up, epochs, validation
    net.train_seconds = float(wall.read_text()) if wall.exists() else math.nan
    last = json.loads(metrics.read_text().splitlines()[-1])
    net.val_err = 100 * last["val_top1_err"]
    weights = net.rundir / "model.safetensors"
    if not net.dense.exists() or net.dense.stat().st_mtime < weights.stat().st_mtime:
        vggspec("export", "--weights", str(weights), "--fully-conv", "--scores", "-o", str(net.dense), log=log)
    return net


# ---------------------------------------------------------------- evaluation


def row_name(protocol: str, scales: tuple[int, ...]) -> str:
    return f"{protocol}@{','.join(map(str, scales))}"


def evaluate(models: list[Net], rows: list[tuple[str, tuple[int, ...]]], data: Path, out: Path) -> dict[str, list[int]]:
    """One `vggspec eval` over the test split (an ensemble when several models): per-image wrong flags per row.

    Flips are off in training and testing: a mirrored digit is another glyph (a mirrored 2 is no 2).
    """
    if _fresh(out, models, rows):  # this run's predictions are there already: the report is redone, not the work
        return _read_flags(out, rows)
    args = ["eval", str(models[0].dense), "--data", str(data / "test"), "--no-flip", "--threads", "1",
            "--predictions", str(out)]
    for other in models[1:]:
        args += ["--ensemble", str(other.dense)]
    protocols = sorted({p for p, _ in rows})
    scale_sets = sorted({s for _, s in rows})
    for p in protocols:
        args += ["--protocol", p]
    for s in scale_sets:
        args += ["--scales", ",".join(map(str, s))]
    vggspec(*args, log=out.with_suffix(".log"))
    return _read_flags(out, rows)


def _fresh(out: Path, models: list[Net], rows: list[tuple[str, tuple[int, ...]]]) -> bool:
    if not out.exists() or any(out.stat().st_mtime < m.dense.stat().st_mtime for m in models):
        return False
    with open(out, newline="") as f:
        header = next(csv.reader(f), [])
    return all(row_name(p, s) in header for p, s in rows)


def _read_flags(out: Path, rows: list[tuple[str, tuple[int, ...]]]) -> dict[str, list[int]]:
    with open(out, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = list(reader)
    flags = {}
    for col, name in enumerate(header[2:], start=2):
        flags[name] = [int(r[col] != r[1]) for r in table]
    return {row_name(p, s): flags[row_name(p, s)] for p, s in rows}


def net_rows(net: Net, fusion_q: tuple[int, ...] | None) -> list[tuple[str, tuple[int, ...]]]:
    """Table 3 (one Q), Table 4 (three Q), for jittered nets Table 5 (dense, multi-crop, combined), and for a
    fusion member the combined row the fusion is compared with."""
    if not net.jittered:
        rows = [("dense", (S_FIXED,)), ("dense", Q_FIXED)]
    else:
        rows = [("dense", (Q_JITTER[1],)), ("dense", Q_JITTER), ("multi-crop", Q_JITTER), ("combined", Q_JITTER)]
    return rows + ([("combined", fusion_q)] if fusion_q and ("combined", fusion_q) not in rows else [])


def fusion_scales(pair: list[Net]) -> tuple[int, ...]:
    """The test scales of a fusion: the paper's {S - 32, S, S + 32} when every member was trained at S = 73,
    else the jittered range's {Smin, middle, Smax}."""
    return Q_FIXED if not any(n.jittered for n in pair) else Q_JITTER


# ---------------------------------------------------------------- statistics


def err(flags: list[int]) -> float:
    return 100.0 * sum(flags) / len(flags)


def compare(worse: list[int], better: list[int]) -> dict[str, float]:
    """Paired difference (percentage points) of two error flag lists on the same images, and its standard error."""
    d = [a - b for a, b in zip(worse, better, strict=True)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(n - 1, 1)
    return {"diff": 100 * mean, "se": 100 * math.sqrt(var / n)}


def trend(description: str, errors: dict[str, float], worse: list[int], better: list[int],
          not_better: bool = False) -> dict[str, Any]:
    """A paper trend: `better` should have the lower error by more than 2 standard errors of the paired
    difference; with `not_better` (LRN), it holds unless `worse` is lower by more than 2 standard errors."""
    c = compare(worse, better)
    holds = c["diff"] > -2 * c["se"] if not_better else c["diff"] > 2 * c["se"]
    return {"description": description, "errors": errors, "difference": round(c["diff"], 3),
            "se": round(c["se"], 3), "holds": bool(holds)}


# ---------------------------------------------------------------- the section


def run(cfg: Config) -> Section:
    section = Section("paper", TITLE, command(cfg))
    plan = QUICK if cfg.quick else FULL
    start = time.perf_counter()
    data = make_data(cfg, plan)
    root = data.parent / "runs"
    nets = [Net(c, False, root / f"{c}-fix") for c in plan.nets] + [Net(c, True, root / f"{c}-jit")
                                                                     for c in plan.jittered]
    # Three stages, as the paper's initialisations chain: A (and A-LRN) from scratch, the deeper nets from A,
    # the jittered nets from their fixed-S twins. Longest first within a stage, so the two slots finish together.
    cost = {"A": 1, "A-LRN": 1.1, "B": 1.3, "C": 1.5, "D": 1.6, "E": 2}
    order = sorted(nets, key=lambda n: -cost[n.config])
    stages = [[n for n in order if not n.jittered and n.config in SCRATCH],
              [n for n in order if not n.jittered and n.config not in SCRATCH], [n for n in order if n.jittered]]
    for stage in stages:
        with ThreadPoolExecutor(plan.jobs) as pool:
            list(pool.map(lambda n: train(n, data, plan), stage))
    train_s = time.perf_counter() - start
    by = {n.key: n for n in nets}
    pair = sorted(nets, key=lambda n: n.val_err)[:2]  # fusion: the two best on validation
    fq = fusion_scales(pair)
    with ThreadPoolExecutor(plan.jobs) as pool:
        jobs = [pool.submit(evaluate, [n], net_rows(n, fq if n in pair else None), data, n.rundir / "test.csv")
                for n in order]
        fusion_rows = [("combined", fq)]
        fused = pool.submit(evaluate, pair, fusion_rows, data, root / "fusion.csv")
        for n, job in zip(order, jobs, strict=True):
            n.rows = job.result()
        fusion = fused.result()[row_name(*fusion_rows[0])]
    eval_s = time.perf_counter() - start - train_s
    record = root / "eval_seconds.txt"  # evaluations reused from the cache keep the time they took
    if eval_s > 30 or not record.exists():
        record.write_text(f"{eval_s:.0f}\n")
    eval_s = float(record.read_text())
    results = summarise(nets, by, pair, fusion, fq, plan)
    heat = heat_figure(by["D-jit"], data, cfg)
    walls = {n.key: round(n.train_seconds) for n in nets}
    results |= {"heatmap": heat, "seconds": {"training_this_run": round(train_s), "evaluation": round(eval_s),
                                             "training_per_net": walls, "training_two_slots": two_slots(stages)}}
    report(section, results, nets, plan, cfg)
    if not cfg.quick:
        PAPER_JSON.write_text(json.dumps(results, indent=2) + "\n")
    return section


def two_slots(stages: list[list[Net]]) -> int:
    """Wall time of the three training stages run two at a time, from each training's own wall time."""
    total = 0.0
    for stage in stages:
        slots = [0.0, 0.0]
        for net in stage:  # as ThreadPoolExecutor hands them out: to whichever slot frees first
            slots[slots.index(min(slots))] += net.train_seconds
        total += max(slots)
    return round(total)


def summarise(nets: list[Net], by: dict[str, Net], pair: list[Net], fusion: list[int], fq: tuple[int, ...],
              plan: Plan) -> dict:
    def r1(n: Net) -> list[int]:  # Table 3: one test scale, Q = S (fixed) or the middle of the range
        return n.rows[row_name("dense", (Q_JITTER[1],) if n.jittered else (S_FIXED,))]

    def rm(n: Net) -> list[int]:  # Table 4: three test scales
        return n.rows[row_name("dense", Q_JITTER if n.jittered else Q_FIXED)]

    fixed = [n for n in nets if not n.jittered]
    deep = min((by[k] for k in ("D-fix", "E-fix") if k in by), key=lambda n: n.val_err)  # chosen on val
    dj = by["D-jit"]
    trends: dict[str, Any] = {}
    if "A-LRN-fix" in by:
        a, lrn = by["A-fix"], by["A-LRN-fix"]
        trends["lrn_no_gain"] = trend("A-LRN not better than A (S=Q=73, dense)",
                                      {"A": err(r1(a)), "A-LRN": err(r1(lrn))}, r1(lrn), r1(a), not_better=True)
    trends["depth_helps"] = trend(f"{deep.config} better than A (S=Q=73, dense)",
                                  {"A": err(r1(by['A-fix'])), deep.config: err(r1(deep))}, r1(by["A-fix"]), r1(deep))
    if "C-fix" in by:
        trends["conv1_worse_than_conv3"] = trend("D better than C (S=Q=73, dense)",
                                                 {"C": err(r1(by["C-fix"])), "D": err(r1(by["D-fix"]))},
                                                 r1(by["C-fix"]), r1(by["D-fix"]))
    trends["jitter_helps"] = trend("jittered D better than fixed D at multi-scale test (dense)",
                                   {"D S=73, Q=64,73,82": err(rm(by["D-fix"])),
                                    "D S=73..146, Q=73,110,146": err(rm(dj))}, rm(by["D-fix"]), rm(dj))
    trends["multiscale_test_helps"] = trend("jittered D: Q = 73,110,146 better than Q = 110 (dense)",
                                            {"Q=110": err(r1(dj)), "Q=73,110,146": err(rm(dj))}, r1(dj), rm(dj))
    trends["multiscale_test_helps"]["fixed_D"] = trend(
        "fixed D: Q = 64,73,82 better than Q = 73 (dense)",
        {"Q=73": err(r1(by["D-fix"])), "Q=64,73,82": err(rm(by["D-fix"]))}, r1(by["D-fix"]), rm(by["D-fix"]))
    dense, crop = dj.rows[row_name("dense", Q_JITTER)], dj.rows[row_name("multi-crop", Q_JITTER)]
    combined = dj.rows[row_name("combined", Q_JITTER)]
    vs_dense = trend("combined better than dense", {}, dense, combined)
    vs_crop = trend("combined better than multi-crop", {}, crop, combined)
    trends["combined_best"] = {
        "description": "jittered D, Q = 73,110,146: combined better than dense and than multi-crop",
        "errors": {"dense": err(dense), "multi-crop": err(crop), "combined": err(combined)},
        "vs_dense": vs_dense, "vs_multi_crop": vs_crop, "holds": vs_dense["holds"] and vs_crop["holds"]}
    members = {n.name: n.rows[row_name("combined", fq)] for n in pair}
    best_name = min(members, key=lambda k: err(members[k]))  # the harder comparison: the better member on test
    q_text = ",".join(map(str, fq))
    errors = {**{k: err(v) for k, v in members.items()}, "fusion": err(fusion)}
    trends["fusion_helps"] = trend(f"fusion of {' and '.join(members)} (the two best on val) better than "
                                   f"{best_name} alone (combined, Q = {q_text})", errors, members[best_name], fusion)
    table3 = [{"net": n.name, "val_err": round(n.val_err, 2), "test_err_single_Q": err(r1(n)),
               "test_err_multi_Q": err(rm(n)), "rows": {k: err(v) for k, v in n.rows.items()},
               "train_s": round(n.train_seconds),
               "paper_top1": PAPER.get((n.config, "jittered" if n.jittered else "fixed"))} for n in nets]
    return {"plan": plan.__dict__, "sets": list(SETS), "scales": {"S_fixed": S_FIXED, "jitter": JITTER,
            "Q_fixed": Q_FIXED, "Q_jitter": Q_JITTER}, "test_images": len(fusion), "nets": table3,
            "fusion_pair": [n.name for n in pair], "fusion_scales": list(fq), "trends": trends,
            "fixed_nets": [n.name for n in fixed]}


def report(section: Section, results: dict, nets: list[Net], plan: Plan, cfg: Config) -> None:
    n = results["test_images"]
    for row in results["nets"]:
        paper = f"; paper {row['paper_top1']}% top-1 on ILSVRC" if row["paper_top1"] else ""
        section.add(f"{row['net']}: test error, dense, one Q / three Q", f"{row['test_err_single_Q']:.1f} / "
                    f"{row['test_err_multi_Q']:.1f} %", detail=f"val {row['val_err']:.1f}%, trained in "
                    f"{row['train_s']} s{paper}")
    for key, t in results["trends"].items():
        errors = ", ".join(f"{k} {v:.1f}%" for k, v in t["errors"].items())
        se = f"difference {t['difference']:+.1f} +- {t['se']:.1f} pp" if "se" in t else ""
        section.add(f"trend {key}", "holds" if t["holds"] else "does not hold", detail=f"{t['description']}: "
                    f"{errors}{'; ' + se if se else ''}")
    h = results["heatmap"]
    section.add("heat map: top score cell inside the digit's box", f"{h['hit_rate']:.0f} %",
                detail=f"jittered D, Q={HEAT_Q}, {h['map']} score map, {h['images']} test scenes; "
                       f"chance (box area share) {h['chance']:.0f} %")
    section.notes += [
        f"{n} test scenes from scans no training image used; errors are top-1 %, 10 classes (chance 90 %). "
        "Each trend compares two rows on the same images: a difference counts when it exceeds twice its paired "
        "standard error.",
        f"Scaled down from the paper: width 1/8 (`--set width=1/8`), 64 x 64 crops, {plan.train} training scenes, "
        f"batch {plan.batch}, momentum 0.9, weight decay 5e-4, lr / 10 after {plan.patience} epochs without a "
        "better val accuracy (at most 3 times), two trainings side by side on one thread each. As in section 3.1: "
        f"A and A-LRN from random weights and the deeper nets from A's first four conv and last three FC layers "
        f"(`--init-from`), {plan.epochs} epochs at lr 1e-2; the jittered nets fine-tuned from the fixed-S net of "
        f"their configuration (`--weights`, lr 1e-3, {plan.tune_epochs} epochs), as the paper fine-tuned its "
        "multi-scale models. Three departures from the paper's recipe, each chosen on validation pilots before "
        "any test run: batch norm and Glorot init (`norm=batch`, `init=xavier`), and no dropout (`dropout=0`). With "
        "dropout 0.5 on these 512-wide FC layers, A stayed at chance for about 2,400 SGD steps, most of its "
        "budget; without it, it left chance after about 800.",
        "Flips are off in training and testing (a mirrored digit is another glyph), so multi-crop is the 5 x 5 "
        "grid without mirrors (25 crops per scale) and dense has no mirror pass.",
        f"Training: {results['seconds']['training_two_slots']} s for the three stages two at a time (each net's "
        "`vggspec train` wall time is in its row; this run "
        + ("trained them" if results["seconds"]["training_this_run"] > 60 else "reused them from the cache")
        + f"); evaluation {results['seconds']['evaluation']} s.",
        "Validation error is the trainer's own: one centre 64 x 64 crop at the middle training scale (Q = 73 "
        "fixed, 109 jittered). At Q = 109 the centre crop misses digits near the border, so the jittered nets' "
        "validation error is far above their test error; it is still what chose the fusion pair.",
    ]


def heat_figure(net: Net, data: Path, cfg: Config, count: int = 300) -> dict[str, Any]:
    """Where the jittered D's score map peaks, on test scenes at Q = 192, and a picture of a few of them."""
    import numpy as np

    from vggspec.runtime import load
    from vggspec.runtime.heatmap import score_map

    meta = json.loads((data / "scenes.json").read_text())
    images = meta["splits"]["test"]["images"][:count]
    model = load(net.dense, device="cpu", threads=2)
    hits, chance, shown = 0, 0.0, []
    for item in images:
        pixels, scores = score_map(model, data / item["file"], HEAT_Q)
        label = int(item["label"])
        cells = scores[label]
        h, w = pixels.shape[:2]
        gy, gx = np.unravel_index(int(np.argmax(cells)), cells.shape)
        cy, cx = (gy + 0.5) * h / cells.shape[0], (gx + 0.5) * w / cells.shape[1]
        x, y, side = (v * h / meta["size"] for v in item["box"])
        hit = x <= cx <= x + side and y <= cy <= y + side
        hits += hit
        chance += side * side / (h * w)
        if len(shown) < 8 and item["box"][2] <= 40:
            shown.append((pixels, cells, (x, y, side), label, hit))
    _draw(shown, cfg)
    shape = "x".join(map(str, cells.shape))
    return {"images": len(images), "hit_rate": 100 * hits / len(images), "chance": 100 * chance / len(images),
            "map": shape, "q": HEAT_Q, "picture": str(HEATMAP_PNG.relative_to(ROOT)) if not cfg.quick else ""}


def _draw(shown: list, cfg: Config) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    cols = (len(shown) + 1) // 2
    fig = Figure(figsize=(2.4 * cols, 5.2), dpi=100)
    for i, (pixels, cells, (x, y, side), label, _) in enumerate(shown):
        ax = fig.add_subplot(2, cols, i + 1)
        h, w = pixels.shape[:2]
        ax.imshow(pixels, extent=(0, w, h, 0))
        ax.imshow(cells, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
        ax.add_patch(Rectangle((x, y), side, side, fill=False, edgecolor="white", linewidth=1.5, linestyle="--"))
        ax.set_title(f"'{label}' score map", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"Jittered narrow D, dense at Q={HEAT_Q}: the class score map (dashed: the digit)", fontsize=10)
    fig.tight_layout()
    out = HEATMAP_PNG if not cfg.quick else cfg.path("paper-quick") / "heatmap_scenes.png"
    fig.savefig(out)
