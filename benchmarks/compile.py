"""Section 1: compile time of the six paper configurations.

- spec -> graph -> torch source: parse, shape inference, template rendering (`render_source`).
- spec -> ONNX without a checkpoint, in memory and checked: what `vggspec export SPEC -o X` does with
  no --weights. That is two steps, timed apart: drawing the seeded initialisation (`init_weights`), and
  building + checking the ModelProto from given weights (`export_onnx(graph, weights=w)`), the step a
  checkpoint export shares.

Quick mode shrinks the ONNX half to A at 32 x 32 input, so the smoke test stays short.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .common import Config, interleave, median, spread
from .report import Section

TITLE = "1. Compile time (six paper configurations)"
CONFIGS = ("A", "A-LRN", "B", "C", "D", "E")


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only compile" + (" --quick" if cfg.quick else "")


def _source_fn(name: str) -> Callable[[], Any]:
    from vggspec import load_spec
    from vggspec.backends.torch import render_source

    return lambda: render_source(load_spec(name))


def _graph_fn(name: str) -> Callable[[], Any]:
    from vggspec import load_spec

    return lambda: load_spec(name)


def _onnx_fns(name: str, overrides: tuple[str, ...]) -> dict[str, Callable[[], Any]]:
    from vggspec import export_onnx, load_spec
    from vggspec.weights import init_weights

    graph = load_spec(name, overrides)
    weights = init_weights(graph)  # built once: the ONNX step is timed on its own
    return {"init": lambda: init_weights(graph), "onnx": lambda: export_onnx(graph, weights=weights)}


def _template_note(section: Section, reps: int) -> str:
    """How much of render_source is jinja2 building its Environment and compiling the template (done per call)."""
    from vggspec.backends import torch as backend

    t = interleave({"template": lambda: backend._environment().get_template(backend.TEMPLATE),
                    "source": _source_fn("D")}, reps)
    share = median(t["template"]) / median(t["source"])
    if share < 0.2:  # cached (functools.lru_cache on _environment since 2026-11-28)
        return (f"Getting the jinja2 Environment and template takes {median(t['template']) * 1e3:.2f} ms "
                f"({share:.0%} of D's spec -> torch source): it is built once and cached.")
    return (f"{share:.0%} of D's spec -> torch source time ({median(t['template']) * 1e3:.0f} ms) is "
            "vggspec.backends.torch._environment() building a jinja2 Environment and compiling the template, "
            "which render_source does anew on every call.")


def run(cfg: Config) -> Section:
    section = Section("compile", TITLE, command(cfg))
    reps = cfg.reps(7, 2)
    for name in CONFIGS:
        t = interleave({"graph": _graph_fn(name), "source": _source_fn(name)}, reps)
        section.add(f"{name}: spec -> graph", median(t["graph"]) * 1e3, "ms", detail=f"+-{spread(t['graph']):.0%}")
        section.add(f"{name}: spec -> graph -> torch source", median(t["source"]) * 1e3, "ms",
                    detail=f"+-{spread(t['source']):.0%}, {reps} reps")
    onnx_configs = ("A",) if cfg.quick else CONFIGS
    overrides = ("input=32x32x3",) if cfg.quick else ()
    onnx_reps = cfg.reps(1, 1)  # ~10 s each at full size: one interleaved round per config keeps this ~2 min
    for name in onnx_configs:
        label = f"{name}{' @32x32' if cfg.quick else ''}"
        t = interleave(_onnx_fns(name, overrides), onnx_reps, warmup=0)
        total = median(t["init"]) + median(t["onnx"])
        section.add(f"{label}: spec -> ONNX, no checkpoint (init + build + check)", total, "s",
                    detail=f"init {median(t['init']):.2f} s, build+check {median(t['onnx']):.2f} s, {onnx_reps} run")
    section.notes.append(_template_note(section, reps))
    section.notes.append(
        "Torch source is pure text (jinja2), so it takes milliseconds; the ONNX figure is dominated by the "
        "weights: drawing the seeded random weights (133M to 144M numbers at full size), copying them into "
        "protobuf and onnx.checker's full check (which serialises the whole model once more). See section 2 for "
        "the checkpoint path.")
    return section
