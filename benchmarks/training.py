"""Section 6: training throughput of the generated PyTorch module against torchvision's vgg16, CPU.

Both are configuration D at 64 x 64 x 3 input (`--set input=64x64x3`; 224 would make each step
tens of seconds on two cores), 1000 classes, dropout 0.5, holding the same initial weights, trained
on the same fixed random batch with SGD (momentum 0.9, weight decay 5e-4) and cross-entropy, on the
same threads. Steps alternate between the two models.

torchvision's vgg16 ends its features with AdaptiveAvgPool2d(7, 7), which at 64 x 64 would blow the
2 x 2 pool5 map up to 7 x 7 and feed a 25088-wide FC6: a different, larger network. To compare
like with like its avgpool is made an Identity and FC6 a 2048 -> 4096 layer, i.e. exactly the
network the spec describes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .common import Config, interleave, median, paired_ratio, ratio_range, spread
from .report import Section

TITLE = "6. Training throughput, generated module vs torchvision (CPU)"
INPUT = "input=64x64x3"


def command(cfg: Config) -> str:
    return ".venv/bin/python -m benchmarks --only training" + (" --quick" if cfg.quick else "")


def _models() -> tuple[Any, Any]:
    import torch
    import torchvision

    from vggspec import load_spec, to_torch
    from vggspec.weights import init_weights
    from vggspec.weights.torchvision import to_torchvision

    graph = load_spec("D", (INPUT,))
    weights = init_weights(graph, scheme="kaiming", seed=0)
    generated = to_torch(graph, weights=weights).train()
    with torch.device("meta"):
        tv = torchvision.models.vgg16()
        tv.avgpool = torch.nn.Identity()
        tv.classifier[0] = torch.nn.Linear(2048, 4096)
    state = {k: torch.from_numpy(v.copy()) for k, v in to_torchvision(graph, weights).items()}
    tv.load_state_dict(state, assign=True)
    return generated, tv.train()


def _step_fn(model: Any, x: Any, y: Any) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def run(cfg: Config) -> Section:
    import torch

    section = Section("training", TITLE, command(cfg))
    batch = 8 if cfg.quick else 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 64, 64, generator=gen)
    y = torch.randint(0, 1000, (batch,), generator=gen)
    generated, tv = _models()
    fns = {"generated": _step_fn(generated, x, y), "torchvision": _step_fn(tv, x, y)}
    t = interleave(fns, cfg.reps(7, 2), prime=True)
    for name in fns:
        section.add(f"{name}: images/s", batch / median(t[name]), "img/s",
                    detail=f"step {median(t[name]) * 1e3:.0f} ms +-{spread(t[name]):.0%}, {len(t[name])} steps")
    section.add("generated / torchvision throughput", paired_ratio(t["torchvision"], t["generated"]), "x",
                detail=f"1.0 = same speed; per-round range {ratio_range(t['torchvision'], t['generated'])}")
    section.notes.append(f"D with `--set {INPUT}` on both sides, batch {batch}, {cfg.threads} threads, fp32, "
                         "SGD step included; torchvision's avgpool -> Identity and FC6 -> 2048 -> 4096 so both "
                         "are the same network.")
    return section
