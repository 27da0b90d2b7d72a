"""Syntax tree to LayerGraph: expand repetitions, name layers as the original release did, infer shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..labels import read_labels, spec_labels
from ..preprocessing import Preprocessing
from ..spec import DiagnosticSink, Header, HeaderEntry, LayerToken, Span, SpecTree
from ..spec.parser import OVERRIDE_PATH
from .infer import ShapeError, annotate
from .layer import Layer
from .layergraph import GraphMeta, LayerGraph

MAX_PARAMS = 10**10  # 40 GB of float32: beyond any machine this runs on
MAX_MACS = 10**15
MAX_LAYERS = 2048  # layer tokens after repetition: E has 25, a 100-stage network 500

# AlexNet's LRN: b = a / (k + alpha * sum a^2)^beta. PyTorch and ONNX divide alpha by n,
# so the graph stores alpha * n to compute the same function.
# The header's `lrn_alpha` (default AlexNet's 1e-4) is the alpha of this formula.
LRN_SIZE, LRN_BETA, LRN_K = 5, 0.75, 2.0


def build(tree: SpecTree) -> LayerGraph:
    """Build the layer graph of a parsed spec, reporting every located error together."""
    sink = DiagnosticSink(tree.path, tree.source)
    sink.diagnostics.extend(tree.pending)
    header = tree.header
    assert header is not None, "parse() validates the header before build()"
    found = len(sink.diagnostics)
    layers = _expand(tree, sink)
    if len(sink.diagnostics) > found:  # layers in error: shapes would only report consequences
        sink.raise_if_any()
    h, w, c = header.input
    try:
        layers = annotate(layers, (c, h, w))
    except ShapeError as exc:  # the checks below need no shapes: their errors are reported with this one
        sink.error(_span_of(exc.layer), str(exc), exc.hint)
    else:
        _check_size(layers, sink)
    _check_norm_except(tree, layers, sink)
    _check_lrn_alpha(tree, layers, sink)
    classes = _check_classes(tree, layers, sink)
    labels = _read_labels(tree, classes, sink)
    sink.raise_if_any()
    meta = GraphMeta(
        name=header.name,
        input_shape=(c, h, w),
        classes=classes,
        norm=header.norm,
        norm_except=header.norm_except,
        dropout=header.dropout,
        init=header.init,
        width=header.width,
        preprocessing=Preprocessing(header.scale, header.mean, header.std),
        spec_text=tree.source,
        spec_path=tree.path,
        overrides=tuple(tree.overrides),
        labels=labels,
    )
    return LayerGraph.from_layers(layers, meta)


def _span_of(layer: Layer) -> Span:
    return Span(*layer.loc) if layer.loc else Span(1, 1)


class _Namer:
    """Names layers conv{stage}_{i}, pool{stage}, fc{n}, as the original Caffe release did."""

    def __init__(self) -> None:
        self.stage, self.index, self.fc = 1, 0, 0

    def conv(self) -> tuple[str, str]:
        self.index += 1
        return f"{self.stage}_{self.index}", f"conv{self.stage}_{self.index}"

    def pool(self) -> str:
        name = f"pool{self.stage}"
        self.stage, self.index = self.stage + 1, 0
        return name

    def next_fc(self) -> int:
        if self.fc == 0:
            self.fc = self.stage + (1 if self.index else 0)
        else:
            self.fc += 1
        return self.fc


@dataclass
class _Expansion:
    """What expanding a spec's layer tokens carries from one token to the next."""

    header: Header
    sink: DiagnosticSink
    total_fc: int  # FC layers after repetition: the last is the classifier
    adapt: int | None  # `--set classes=N`: the last FC layer's width
    namer: _Namer = field(default_factory=_Namer)
    layers: list[Layer] = field(default_factory=lambda: [Layer("input", "input", {}, 1)])
    seen_fc: int = 0
    seen_softmax: bool = False

    def add(self, name: str, op: str, attrs: dict, loc: tuple[int, int, int], stage: int | None = None) -> None:
        self.layers.append(Layer(name, op, attrs, self.namer.stage if stage is None else stage, loc))


# One function per token kind, called once per repetition; each returns False to stop the token's repetitions.
Expander = Callable[[_Expansion, LayerToken, tuple[int, int, int]], bool]


def _conv(ex: _Expansion, token: LayerToken, loc: tuple[int, int, int]) -> bool:
    suffix, name = ex.namer.conv()
    attrs = {"kernel": token.kernel, "out_channels": scaled(token.channels, ex.header.width),
             "padding": token.kernel // 2, "stride": 1}
    ex.add(name, "conv", attrs, loc)
    if ex.header.norm == "batch" and name not in ex.header.norm_except:
        ex.add(f"bn{suffix}", "bn", {"eps": 1e-5, "momentum": 0.1}, loc)
    ex.add(f"relu{suffix}", "relu", {}, loc)
    return True


def _lrn(ex: _Expansion, token: LayerToken, loc: tuple[int, int, int]) -> bool:
    name = f"norm{ex.namer.stage}"
    if any(layer.name == name for layer in ex.layers):
        ex.sink.error(token.span, f"a second LRN in stage {ex.namer.stage}",
                      f"a stage has at most one LRN, named {name} as in the Caffe release; "
                      "the paper's A-LRN has one, after conv1_1")
        return False
    ex.add(name, "lrn", {"size": LRN_SIZE, "alpha": ex.header.lrn_alpha * LRN_SIZE, "beta": LRN_BETA, "k": LRN_K}, loc)
    return True


def _maxpool(ex: _Expansion, token: LayerToken, loc: tuple[int, int, int]) -> bool:
    stage = ex.namer.stage  # the pool closes its stage: it belongs to the one before the namer moves on
    ex.add(ex.namer.pool(), "maxpool", {"kernel": 2, "stride": 2}, loc, stage)
    return True


def _fc(ex: _Expansion, token: LayerToken, loc: tuple[int, int, int]) -> bool:
    n = ex.namer.next_fc()
    if not ex.seen_fc:
        ex.add("flatten", "flatten", {}, loc)
    ex.seen_fc += 1
    last = ex.seen_fc == ex.total_fc
    units = (ex.adapt or token.channels) if last else scaled(token.channels, ex.header.width)
    ex.add(f"fc{n}", "fc", {"out_features": units}, loc)
    if not last:
        ex.add(f"relu{n}", "relu", {}, loc)
        if ex.header.dropout > 0:
            ex.add(f"drop{n}", "dropout", {"p": ex.header.dropout}, loc)
    return True


def _softmax(ex: _Expansion, token: LayerToken, loc: tuple[int, int, int]) -> bool:
    ex.seen_softmax = True
    ex.add("prob", "softmax", {"axis": 1}, loc)
    return False


EXPANDERS: dict[str, Expander] = {"conv": _conv, "lrn": _lrn, "maxpool": _maxpool, "fc": _fc, "softmax": _softmax}


def _expand(tree: SpecTree, sink: DiagnosticSink) -> list[Layer]:
    """The layers of the spec's tokens, repetitions expanded and named; misplaced tokens reported and skipped."""
    assert tree.header is not None
    if _too_many_layers(tree, sink):
        return [Layer("input", "input", {}, 1)]
    fcs = [t for t in tree.layers if t.kind == "fc"]
    ex = _Expansion(tree.header, sink, sum(t.repeat for t in fcs), _classes_override(tree))
    for token in tree.layers:
        if _misplaced(ex, token):
            continue
        loc = (token.span.line, token.span.col, token.span.length)
        expand = EXPANDERS[token.kind]
        for _ in range(token.repeat):
            if not expand(ex, token, loc):
                break
    if not fcs:
        sink.error(tree.end, "spec has no FC layer", "end the network with FC-N soft-max, N the number of classes")
    elif not ex.seen_softmax:
        sink.error(tree.end, "spec does not end with soft-max", "add soft-max after the last FC layer")
    return ex.layers


def _misplaced(ex: _Expansion, token: LayerToken) -> bool:
    """Report a token that cannot come where it stands: anything after soft-max, a feature layer after an FC."""
    if ex.seen_softmax:
        ex.sink.error(token.span, f"'{token.text}' after soft-max", "soft-max must be the last layer")
        return True
    if token.kind in ("conv", "lrn", "maxpool") and ex.seen_fc:
        ex.sink.error(token.span, f"'{token.text}' after a fully connected layer",
                      "convolutions, LRN and pooling come before the FC layers")
        return True
    return False


def scaled(channels: int, width: float) -> int:
    """A layer's width under the `width` multiplier: the nearest integer (halves up), at least 1."""
    return max(1, math.floor(channels * width + 0.5))


def _too_many_layers(tree: SpecTree, sink: DiagnosticSink) -> bool:
    """Bound the whole network before expanding it: the per-token *1024 cap alone lets a few kilobytes of
    spec ask for hundreds of thousands of layers."""
    total = 0
    for token in tree.layers:
        total += token.repeat
        if total > MAX_LAYERS:
            count = sum(t.repeat for t in tree.layers)
            sink.error(token.span, f"the network has {count:,} layer tokens after repetition; "
                       f"vggspec builds at most {MAX_LAYERS:,}", "VGG's deepest configuration, E, has 25")
            return True
    return False


def _check_size(layers: list[Layer], sink: DiagnosticSink) -> None:
    params = macs = 0
    for layer in layers:
        params += layer.params
        macs += layer.macs
        if params > MAX_PARAMS or macs > MAX_MACS:
            sink.error(
                _span_of(layer),
                f"spec too large to build: {params:.3g} parameters and {macs:.3g} MACs by {layer.name}",
                f"vggspec builds at most {MAX_PARAMS:.0e} parameters and {MAX_MACS:.0e} MACs",
            )
            return


def _read_labels(tree: SpecTree, classes: int, sink: DiagnosticSink) -> tuple[str, ...]:
    """The `labels:` file, one label per line, relative to the spec's folder and confined to it; one given by
    --set is the user's own choice, read where it is (relative to the current folder)."""
    entry = tree.entries.get("labels")
    if entry is None or not tree.header or not tree.header.labels:
        return ()
    base = Path(tree.path).parent if entry.origin == tree.path else Path.cwd()
    path = base / tree.header.labels
    # An error points where the value was written: the spec, or the --set that overrode it.
    target = DiagnosticSink(OVERRIDE_PATH, "\n".join(tree.overrides)) if entry.origin == OVERRIDE_PATH else sink
    labels: tuple[str, ...] = ()
    try:
        labels = read_labels(path) if target is not sink else spec_labels(base, tree.header.labels)
    except DataError as exc:
        target.error(entry.value_span, f"labels file {path}: {exc.message}", exc.hint)
    if labels and classes and len(labels) != classes:
        target.error(entry.value_span, f"labels file {path} has {len(labels)} labels for {classes} classes")
    if target is not sink:
        sink.diagnostics.extend(target.diagnostics)
    return labels


def _check_norm_except(tree: SpecTree, layers: list[Layer], sink: DiagnosticSink) -> None:
    """`norm_except` names convolutions of this spec, and means something only under `norm: batch`."""
    entry = tree.entries.get("norm_except")
    if entry is None or tree.header is None or not tree.header.norm_except:
        return
    convs = [layer.name for layer in layers if layer.op == "conv"]
    missing = [n for n in tree.header.norm_except if n not in convs]
    if tree.header.norm != "batch":
        _entry_error(tree, entry, sink, "norm_except without norm: batch leaves nothing out",
                     "add norm: batch, or drop norm_except")
    elif missing:
        _entry_error(tree, entry, sink, f"norm_except names {missing[0]}, which this spec does not have",
                     f"its convolutions are {', '.join(convs[:3])}{' ...' if len(convs) > 3 else ''}")


def _check_lrn_alpha(tree: SpecTree, layers: list[Layer], sink: DiagnosticSink) -> None:
    entry = tree.entries.get("lrn_alpha")
    if entry is not None and not any(layer.op == "lrn" for layer in layers):
        _entry_error(tree, entry, sink, "lrn_alpha, but this spec has no LRN",
                     "add LRN after a convolution, or drop lrn_alpha")


def _entry_error(tree: SpecTree, entry: HeaderEntry, sink: DiagnosticSink, message: str, hint: str) -> None:
    """An error at a header value: where it was written, the spec or the --set that overrode it."""
    if entry.origin != OVERRIDE_PATH:
        sink.error(entry.value_span, message, hint)
        return
    target = DiagnosticSink(OVERRIDE_PATH, "\n".join(tree.overrides))
    target.error(entry.value_span, message, hint)
    sink.diagnostics.extend(target.diagnostics)


def _classes_override(tree: SpecTree) -> int | None:
    """`--set classes=N` adapts the last FC layer to N classes instead of disagreeing with it."""
    entry = tree.entries.get("classes")
    if entry is not None and entry.origin == OVERRIDE_PATH and tree.header is not None:
        return tree.header.classes
    return None


def _check_classes(tree: SpecTree, layers: list[Layer], sink: DiagnosticSink) -> int:
    fcs = [layer for layer in layers if layer.op == "fc"]
    if not fcs:
        return 0
    last = fcs[-1].attrs["out_features"]
    declared = tree.header.classes if tree.header else None
    if declared is not None and declared != last:
        entry = tree.entries["classes"]
        sink.error(
            entry.value_span,
            f"classes: {declared} disagrees with the last FC layer, FC-{last}",
            f"set classes: {last}, or end with FC-{declared}",
        )
    return last
