"""torchvision's VGG layout (`features.N`, `classifier.N`) to and from vggspec's layer names.

torchvision's vgg11, vgg13, vgg16 and vgg19 are configurations A, B, D and E; the `_bn` variants
are the same with `norm: batch`. Its `features` Sequential holds, in order, every conv, its batch
norm, its ReLU and every max-pool; `classifier` holds each FC, then for every FC but the last a
ReLU and a Dropout (always there, whatever the rate). The indices are derived from the graph by
that rule, so any spec of the same shape maps, not just a table of four.

Reading a .pth uses `torch.load(weights_only=True)`, which refuses to unpickle arbitrary objects.
torch is imported inside the functions that read or write .pth files: this module imports without it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import WeightsError
from ..files import require_file
from ..graph import LayerGraph, Preprocessing
from .checkpoint import check_tensors

# torchvision's ImageNet transforms: ToTensor (1/255), then Normalize.
PREPROCESSING = Preprocessing(
    scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="RGB", layout="NCHW",
)
ARCHITECTURES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}  # torchvision name -> shipped spec

_PARAM_OPS = ("conv", "bn", "fc")


def spec_for(arch: str) -> tuple[str, tuple[str, ...]]:
    """The shipped spec and --set overrides of a torchvision architecture (`vgg16_bn` -> D, norm=batch)."""
    base, bn = (arch[:-3], True) if arch.endswith("_bn") else (arch, False)
    if base not in ARCHITECTURES:
        names = ", ".join(ARCHITECTURES)
        raise WeightsError(f"unknown torchvision architecture {arch!r}", hint=f"use one of {names}, or with _bn")
    return ARCHITECTURES[base], ("norm=batch",) if bn else ()


def layer_map(graph: LayerGraph) -> dict[str, str]:
    """vggspec layer name -> torchvision module path (`conv1_1` -> `features.0`), for layers with tensors."""
    mapping: dict[str, str] = {}
    features = classifier = 0
    in_classifier = False
    last_fc = graph.of_op("fc")[-1].name
    for layer in graph.layers:
        if layer.op in ("input", "softmax"):
            continue
        if layer.op == "lrn":
            raise WeightsError(f"layer {layer.name}: torchvision's VGG has no LRN layer", hint="use a spec without LRN")
        if layer.op == "flatten":
            in_classifier = True  # torchvision's avgpool and flatten sit between the two Sequentials
            continue
        if not in_classifier:
            if layer.op in _PARAM_OPS:
                mapping[layer.name] = f"features.{features}"
            features += 1
            continue
        if layer.op == "fc":
            mapping[layer.name] = f"classifier.{classifier}"
            # each hidden FC is followed by ReLU and Dropout in torchvision, dropout 0 or not
            classifier += 1 if layer.name == last_fc else 3
    return mapping


def _suffixes(op: str) -> tuple[str, ...]:
    if op == "bn":
        return ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return ("weight", "bias")


def from_torchvision(graph: LayerGraph, state: Mapping[str, Any], path: str | None = None) -> dict[str, np.ndarray]:
    """torchvision state_dict (tensors or arrays) -> vggspec tensors, checked against the graph."""
    state = _strip_prefix({k: v for k, v in state.items()})
    _check_architecture(graph, state, path)
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name, module in layer_map(graph).items():
        op = graph.layer(name).op
        for suffix in _suffixes(op):
            key = f"{module}.{suffix}"
            if key not in state:
                if suffix == "num_batches_tracked":  # very old torchvision files lack the counter
                    out[f"{name}.{suffix}"] = np.zeros((), np.int64)
                    continue
                raise WeightsError(f"missing {key} for layer {name} (torchvision layout of {graph.meta.name})", path)
            out[f"{name}.{suffix}"] = _numpy(state[key])
            used.add(key)
    extra = sorted(set(state) - used, key=_natural)
    if extra:
        raise WeightsError(
            f"unexpected tensor {extra[0]} in a torchvision checkpoint for {graph.meta.name}", path,
            "is it another architecture, or does the spec need --set norm=batch?",
        )
    check_tensors(graph, out, path)
    return out


def _check_architecture(graph: LayerGraph, state: Mapping[str, Any], path: str | None) -> None:
    """Say which architecture the file holds when it is not the spec's, before naming a missing key."""
    has_bn = any(k.endswith(".running_mean") for k in state)
    convs = sum(1 for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.ndim == 4)
    fcs = sum(1 for k, v in state.items() if k.startswith("classifier.") and k.endswith(".weight") and v.ndim == 2)
    want_bn, want = bool(graph.of_op("bn")), (len(graph.of_op("conv")), len(graph.of_op("fc")))
    if (convs, fcs) != want or has_bn != want_bn:
        found = f"{convs} conv and {fcs} FC layers{', batch norm' if has_bn else ''}"
        needs = f"{want[0]} conv and {want[1]} FC layers{', batch norm' if want_bn else ''}"
        name = _architecture_with(convs, fcs)
        arch = f"{name}{'_bn' if has_bn else ''}"
        hint = f"it looks like torchvision's {arch}: pass --spec {arch}" if name else None
        raise WeightsError(f"the file holds {found}; {graph.meta.name} has {needs}", path, hint)


def _architecture_with(convs: int, fcs: int) -> str | None:
    """The torchvision architecture with that many conv and FC layers, from the shipped specs."""
    from ..graph.load import load_spec

    for arch, spec in ARCHITECTURES.items():
        graph = load_spec(spec)
        if (len(graph.of_op("conv")), len(graph.of_op("fc"))) == (convs, fcs):
            return arch
    return None


def to_torchvision(graph: LayerGraph, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vggspec tensors -> torchvision's state_dict keys (arrays; write them with `save_pth`)."""
    check_tensors(graph, dict(tensors))
    out: dict[str, np.ndarray] = {}
    for name, module in layer_map(graph).items():
        for suffix in _suffixes(graph.layer(name).op):
            out[f"{module}.{suffix}"] = np.asarray(tensors[f"{name}.{suffix}"])
    return out


def load_pth(path: str | Path) -> dict[str, np.ndarray]:
    """A .pth state_dict as numpy arrays, read with torch.load(weights_only=True)."""
    import torch

    path = Path(path)
    require_file(path, WeightsError, "a .pth file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... by kind of damage
        raise WeightsError(f"cannot read as a state_dict with torch.load(weights_only=True): {_reason(exc)}", str(path),
                           "give a .pth saved with torch.save(model.state_dict(), ...)") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # training scripts often wrap it
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError("not a state_dict (expected a mapping of names to tensors)", str(path))
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"entry {bad[0]!r} is not a tensor", str(path), "give a plain state_dict")
    return {str(k): v.detach().cpu().numpy() for k, v in obj.items()}


def save_pth(path: str | Path, state: Mapping[str, np.ndarray]) -> None:
    """Write a state_dict of torch tensors atomically (loadable with weights_only=True)."""
    import torch

    from ..atomic import atomic_path

    tensors = {k: torch.from_numpy(np.require(v, requirements="C")) for k, v in state.items()}  # keeps 0-d
    with atomic_path(path, ".pth") as tmp:
        torch.save(tensors, str(tmp))


def _reason(exc: Exception) -> str:
    """torch's errors run to paragraphs: keep the unpickler's complaint, or the first sentence."""
    text = str(exc).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    reason = " ".join((found.group(1) if found else text.split(". ")[0]).split())
    # Some unpickler errors carry only a number (the bad magic); the type says more than that.
    return reason if re.search(r"[A-Za-z]", reason) else f"not a PyTorch file ({type(exc).__name__} {reason})"


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _strip_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """DataParallel/DDP checkpoints prefix every key with `module.`."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _natural(key: str) -> tuple[tuple[int, str], ...]:
    """`features.10` after `features.9`."""
    return tuple((int(p), "") if p.isascii() and p.isdigit() else (-1, p) for p in key.split("."))
