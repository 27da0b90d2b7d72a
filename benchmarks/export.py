"""Section 2: exporting D with its 138M weights, `vggspec export` against `torch.onnx.export`.

Each export runs in a fresh process (so neither inherits the other's heap), interleaved A B A B;
wall time is the whole process (imports, reading the weights, building, checking, writing) and
memory is that process's own peak RSS (VmHWM, via wait4's rusage).

Both start from the same weights on disk: vggspec from its safetensors checkpoint, torchvision's
vgg16 from the same tensors saved as a .pth. The torchvision model is built on the meta device and
the weights assigned, so torch is not charged for a random initialisation it would then overwrite.
"""

from __future__ import annotations

import importlib.util

from .common import Config, d_checkpoint, median, paired_ratio, run_child, spread, thread_env
from .report import Section

TITLE = "2. Export of D with weights (138M parameters)"

TORCH_EXPORT = """
import sys, torch, torchvision
pth, out, dynamo = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
with torch.device("meta"):
    model = torchvision.models.vgg16()
model.load_state_dict(torch.load(pth, map_location="cpu", weights_only=True), assign=True)
model.eval()
x = torch.zeros(1, 3, 224, 224)
kw = {} if dynamo else {"dynamic_axes": {"input": {0: "N"}, "logits": {0: "N"}}}
torch.onnx.export(model, (x,), out, opset_version=17, input_names=["input"], output_names=["logits"],
                  dynamo=dynamo, **kw)
"""


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only export" + (" --quick" if cfg.quick else "")


def _torch_dynamo() -> bool:
    """torch 2.14's default exporter (dynamo=True) needs onnxscript; without it, the TorchScript one is used."""
    return importlib.util.find_spec("onnxscript") is not None


def run(cfg: Config) -> Section:
    section = Section("export", TITLE, command(cfg))
    ckpt = d_checkpoint(cfg)
    pth = cfg.path("d_torchvision.pth")
    env = thread_env(cfg.threads)
    dynamo = _torch_dynamo()
    jobs = {
        "vggspec": ["-m", "vggspec", "export", "D", "--weights", str(ckpt),
                    "-o", str(cfg.path("export_vggspec.onnx"))],
        "torch": ["-c", TORCH_EXPORT, str(pth), str(cfg.path("export_torch.onnx")), "1" if dynamo else "0"],
    }
    results: dict[str, list] = {name: [] for name in jobs}
    for r in range(cfg.reps(3, 1)):
        names = list(jobs)
        for name in names[r % 2:] + names[:r % 2]:
            res = run_child(jobs[name], env)
            if res.returncode:
                raise RuntimeError(f"{name} export failed (exit {res.returncode}): {res.output[-800:]}")
            results[name].append(res)
    _rows(section, results)
    if not all(r.met for r in section.rows if r.met is not None):
        section.notes.append(_profile_note(cfg))
    section.notes.append(
        "vggspec export streams each tensor from its numpy buffer into the file (vggspec/backends/onnx_stream.py: "
        "the same ModelProto onnx.save_model writes, tested), reads the checkpoint as memory maps, and runs "
        "onnx.checker's full check on the graph with the weights declared as typed inputs, before writing.")
    exporter = "dynamo=True (torch.export)" if dynamo else "dynamo=False (TorchScript exporter)"
    section.notes.append(f"torch.onnx.export used {exporter}, opset 17, from a fresh process each time"
                         + ("" if dynamo else "; torch 2.14's default dynamo=True needs onnxscript, not installed here")
                         + ".")
    section.notes.append("Peak memory includes each process's imports: torch + torchvision alone are a few hundred MB "
                         "resident; vggspec export imports neither torch nor onnxruntime.")
    return section


def _rows(section: Section, results: dict[str, list]) -> None:
    wall = {k: [r.wall_s for r in v] for k, v in results.items()}
    rss = {k: [r.peak_rss_mb for r in v] for k, v in results.items()}
    speed = paired_ratio(wall["torch"], wall["vggspec"])
    mem = paired_ratio(rss["vggspec"], rss["torch"])
    n = len(wall["torch"])
    for name, label in (("vggspec", "vggspec export"), ("torch", "torch.onnx.export")):
        section.add(f"{label}: wall time", median(wall[name]), "s", detail=f"+-{spread(wall[name]):.0%}, {n} runs")
    section.add("speed-up (torch time / vggspec time)", speed, "x", ">= 3x", speed >= 3)
    section.add("vggspec export: peak RSS", median(rss["vggspec"]), "MB")
    section.add("torch.onnx.export: peak RSS", median(rss["torch"]), "MB")
    section.add("peak memory ratio (vggspec / torch)", mem, "", "<= 0.5", mem <= 0.5)


# The profile: cProfile for where the time goes, and VmHWM read as each stage returns for where the memory
# peaks (a sampling thread cannot see inside C++ calls that hold the GIL, such as onnx.checker's).
STAGES = ("vggspec.weights:load_checkpoint", "vggspec.backends.onnx:build_model",
          "vggspec.backends.onnx_stream:write_streamed", "onnx:save_model", "vggspec.backends.onnx_stream:check_model")

PROFILE_SCRIPT = """
import cProfile, functools, importlib, json, pstats, sys
def hwm():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
marks = [('start', hwm())]
def watch(spec):
    mod, _, attr = spec.partition(':')
    module = importlib.import_module(mod)
    fn = getattr(module, attr, None)
    if fn is None:
        return
    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        finally:
            marks.append((attr, hwm()))
    setattr(module, attr, wrapper)
for spec in json.loads(sys.argv[3]):
    watch(spec)
from vggspec.cli import main
prof = cProfile.Profile()
prof.enable()
main(['export', 'D', '--weights', sys.argv[1], '-o', sys.argv[2]], standalone_mode=False)
prof.disable()
ours = lambda f: any(k in f for k in ('/vggspec/', '/onnx/', '/safetensors/')) and '/vggspec/cli/' not in f
short = lambda f: f.split('/site-packages/')[-1].split('/work/main/')[-1]
top = sorted(((v[3], f'{k[2]} ({short(k[0])})') for k, v in pstats.Stats(prof).stats.items()
              if ours(k[0]) and k[2] not in ('wrapper', '<module>')), reverse=True)
print('PROFILE' + json.dumps({'top': top[:6], 'marks': marks}))
"""


def _profile_note(cfg: Config) -> str:
    """Where `vggspec export` spends its time and memory: cProfile plus a VmRSS sampler thread, in a child."""
    import json

    res = run_child(["-c", PROFILE_SCRIPT, str(d_checkpoint(cfg)), str(cfg.path("export_profile.onnx")),
                     json.dumps(STAGES)], thread_env(cfg.threads))
    line = next((ln for ln in res.output.splitlines() if ln.startswith("PROFILE")), None)
    if res.returncode or line is None:
        return f"Profiling vggspec export failed: {res.output[-300:]}"
    prof = json.loads(line[len("PROFILE"):])
    top = "; ".join(f"{name} {sec:.2f} s" for sec, name in prof["top"])
    marks = ", ".join(f"{name} {mb:,.0f} MB" for name, mb in prof["marks"])
    return (f"Profile of `vggspec export D --weights` in a child (whole run {res.wall_s:.1f} s, VmHWM "
            f"{res.peak_rss_mb:,.0f} MB). Heaviest functions by cumulative time: {top}. Peak RSS (VmHWM) as each "
            f"stage returned: {marks}: the stage after which it jumps is the one that holds the most at once.")
