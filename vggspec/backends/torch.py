"""The PyTorch backend: a LayerGraph rendered as standalone PyTorch source, and loaded from it.

Public API (other packages build on it; keep it stable):

- `render_source(graph) -> str`: the source of a module that imports only torch and the standard
  library. It defines the training class (named from the spec: `vgg_d` -> `VggD`) and its
  dense-evaluation twin (`VggDDense`), both in `__all__`. Deterministic: the same graph gives
  the same bytes.
- `class_name(graph)`, `dense_class_name(graph)`: those two names.
- `load_module_class(graph, dense=False)`: the class, from exec'ing `render_source(graph)` in a fresh
  module namespace. The one code path: `to_torch` and a written file run the same source.
- `to_torch(graph, weights=None, seed=0, init=None, dense=False) -> nn.Module`: an instance with
  `weights` (numpy arrays keyed as the state_dict, `conv1_1.weight`, `fc6.weight` (out, in), ...),
  or else `vggspec.weights.init_weights(graph, init, seed)`, so that torch and ONNX get identical
  weights for a seed. The module is in training mode, as a fresh nn.Module is. `dense=True`
  returns the dense form (same as `to_torch(...).dense()`).
- `state_dict_to_numpy(module) -> dict[str, np.ndarray]`: the inverse, for checkpoints.

The generated training class has `forward(x) -> logits (N, classes)` at the spec's input size and
`dense() -> DenseClass`, a copy whose first FC is a k x k convolution (k from `fully_conv`), the
other FCs 1 x 1 convolutions, returning the class score map (N, classes, h, w).

torch is imported inside the functions that need it: rendering source needs only jinja2.
"""

from __future__ import annotations

import functools
import hashlib
import keyword
import re
import sys
import types
from typing import TYPE_CHECKING, Any

import jinja2
import numpy as np

from ..errors import ModelError
from ..graph import LayerGraph, fully_conv, kernel_hw, reshape
from ..resources import resource_dir

if TYPE_CHECKING:
    from torch import nn

TEMPLATE = "torch_module.py.j2"
MAX_LINE = 120  # the project's ruff line length; longer spec lines get a file-level noqa
_MODULE_PREFIX = "vggspec_generated"
_MODULES: dict[str, types.ModuleType] = {}  # source digest -> executed module, so a class is made once

# Ops the generated forward runs; input has no module, softmax and mean belong to the exported graph.
_FORWARD_OPS = ("conv", "bn", "relu", "lrn", "maxpool", "flatten", "fc", "dropout")


def class_name(graph: LayerGraph) -> str:
    """The training class's name: the spec name in CamelCase (`vgg_d` -> `VggD`, `vgg-a-lrn` -> `VggALrn`)."""
    parts = [p for p in re.split(r"[_\-]+", graph.meta.name) if p]
    name = "".join(p[:1].upper() + p[1:] for p in parts) or "Network"
    # `name: None` must not become `class None(nn.Module)`: keywords and non-identifiers get a prefix.
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"Vgg{name}"


def dense_class_name(graph: LayerGraph) -> str:
    return f"{class_name(graph)}Dense"


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    """One environment per process: compiling the template is most of a render's cost."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined, autoescape=False,
    )
    env.filters["py"] = _py
    return env


def _py(value: Any) -> str:
    """A Python literal; tuples of floats as the shortest repr, so output is stable."""
    if isinstance(value, (list, tuple)):
        items = ", ".join(_py(v) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    return repr(value)


def _standard(graph: LayerGraph) -> LayerGraph:
    """The graph at the spec's input size: the training class has one input size."""
    if graph.meta.fully_conv:
        raise ModelError(
            f"{graph.meta.name} is already in its dense form",
            hint="pass the standard graph; the generated class's dense() gives the dense form",
        )
    return reshape(graph, None) if graph.meta.eval_input else graph


def _docstring_lines(text: str) -> list[str]:
    """The spec text made safe inside a triple-quoted docstring: no escapes, no trailing space, no tabs."""
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return [line.expandtabs(4).rstrip() for line in text.strip("\n").splitlines()]


def render_source(graph: LayerGraph) -> str:
    """The generated PyTorch module for `graph`, as Python source (deterministic)."""
    from ..version import __version__

    graph = _standard(graph)
    dense = fully_conv(graph)
    fcs = graph.of_op("fc")
    first = next(layer for layer in dense.layers if layer.attrs.get("from_fc"))
    kh, kw = kernel_hw(first)
    context = {
        "meta": graph.meta,
        "version": __version__,
        "cls": class_name(graph),
        "dense_cls": dense_class_name(graph),
        "layers": [layer for layer in graph.layers if layer.op in _FORWARD_OPS],
        "dense_layers": [layer for layer in dense.layers if layer.op in _FORWARD_OPS],
        "first_fc": fcs[0].name,
        "dense_kernel": f"{kh} x {kw}",
        "weight_layers": len(graph.of_op("conv", "fc")),
        "params": graph.params,
        "spec_lines": _docstring_lines(graph.meta.spec_text),
        "has_lrn": bool(graph.of_op("lrn")),
    }
    template = _environment().get_template(TEMPLATE)
    source = template.render(**context, long_lines=False)
    if any(len(line) > MAX_LINE for line in source.splitlines()):
        source = template.render(**context, long_lines=True)
    return source


def _load_module(graph: LayerGraph) -> types.ModuleType:
    """Exec the generated source as a module (cached by its digest, registered in sys.modules for pickle)."""
    source = render_source(graph)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    if digest in _MODULES:
        return _MODULES[digest]
    name = f"{_MODULE_PREFIX}_{re.sub(r'[^0-9A-Za-z_]', '_', graph.meta.name)}_{digest}"
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    sys.modules[name] = module
    try:
        exec(compile(source, module.__file__, "exec"), module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    _MODULES[digest] = module
    return module


def load_module_class(graph: LayerGraph, dense: bool = False) -> type[nn.Module]:
    """The generated training class (or its dense twin), from the generated source itself."""
    module = _load_module(graph)
    return getattr(module, dense_class_name(graph) if dense else class_name(graph))


def to_torch(
    graph: LayerGraph,
    weights: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    init: str | None = None,
    dense: bool = False,
) -> nn.Module:
    """An instance of the generated module holding `weights`, or the seeded numpy initialisation.

    weights: keyed as the training class's state_dict (FC weights (out, in)); checked against the
    graph first, so a mismatch is a WeightsError naming the first wrong layer. The instance is in
    training mode; call .eval() for inference. dense=True gives the dense-evaluation form.
    """
    import torch

    from ..weights import check_tensors, init_weights

    graph = _standard(graph)
    if weights is None:
        weights = init_weights(graph, init, seed)
    else:
        check_tensors(graph, weights)
    cls = load_module_class(graph)
    with torch.device("meta"):  # skip torch's own initialisation: every tensor is replaced
        model = cls()
    state = {key: torch.tensor(_float32(value)) for key, value in weights.items()}
    model.load_state_dict(state, assign=True)
    return model.dense() if dense else model


def state_dict_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's state_dict as numpy arrays (copies, on the CPU), ready for save_checkpoint."""
    return {key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


def _float32(value: Any) -> np.ndarray:
    """Floating tensors as float32 (the generated module's dtype); counters stay integers."""
    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
