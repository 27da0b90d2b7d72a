"""Syntax tree to LayerGraph: expand repetitions, name layers as the original release did, infer shapes."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import DataError
from ..labels import read_labels, spec_labels
from ..preprocessing import Preprocessing
from ..spec import DiagnosticSink, Span, SpecTree
from ..spec.parser import OVERRIDE_PATH
from .infer import ShapeError, annotate
from .layer import Layer
from .layergraph import GraphMeta, LayerGraph

MAX_PARAMS = 10**10  # 40 GB of float32: beyond any machine this runs on
MAX_MACS = 10**15
MAX_LAYERS = 2048  # layer tokens after repetition: E has 25, a 100-stage network 500

# AlexNet's LRN: b = a / (k + alpha * sum a^2)^beta. PyTorch and ONNX divide alpha by n,
# so the graph stores alpha * n to compute the same function.
LRN_SIZE, LRN_ALPHA_ALEXNET, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


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
    classes = _check_classes(tree, layers, sink)
    labels = _read_labels(tree, classes, sink)
    sink.raise_if_any()
    meta = GraphMeta(
        name=header.name,
        input_shape=(c, h, w),
        classes=classes,
        norm=header.norm,
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


def _expand(tree: SpecTree, sink: DiagnosticSink) -> list[Layer]:
    header = tree.header
    assert header is not None
    if _too_many_layers(tree, sink):
        return [Layer("input", "input", {}, 1)]
    namer = _Namer()
    layers = [Layer("input", "input", {}, 1)]
    fcs = [t for t in tree.layers if t.kind == "fc"]
    total_fc = sum(t.repeat for t in fcs)
    adapt = _classes_override(tree)
    seen_fc = seen_softmax = 0
    for token in tree.layers:
        loc = (token.span.line, token.span.col, token.span.length)
        base: dict = {}
        if seen_softmax:
            sink.error(token.span, f"'{token.text}' after soft-max", "soft-max must be the last layer")
            continue
        if token.kind in ("conv", "lrn", "maxpool") and seen_fc:
            sink.error(
                token.span,
                f"'{token.text}' after a fully connected layer",
                "convolutions, LRN and pooling come before the FC layers",
            )
            continue
        for _ in range(token.repeat):
            if token.kind == "conv":
                suffix, name = namer.conv()
                attrs = {
                    **base,
                    "kernel": token.kernel,
                    "out_channels": scaled(token.channels, header.width),
                    "padding": token.kernel // 2,
                    "stride": 1,
                }
                layers.append(Layer(name, "conv", attrs, namer.stage, loc))
                if header.norm == "batch":
                    layers.append(Layer(f"bn{suffix}", "bn", {**base, "eps": 1e-5, "momentum": 0.1}, namer.stage, loc))
                layers.append(Layer(f"relu{suffix}", "relu", dict(base), namer.stage, loc))
            elif token.kind == "lrn":
                if any(layer.name == f"norm{namer.stage}" for layer in layers):
                    sink.error(token.span, f"a second LRN in stage {namer.stage}",
                               f"a stage has at most one LRN, named norm{namer.stage} as in the Caffe release; "
                               "the paper's A-LRN has one, after conv1_1")
                    break
                attrs = {**base, "size": LRN_SIZE, "alpha": LRN_ALPHA_ALEXNET * LRN_SIZE, "beta": LRN_BETA, "k": LRN_K}
                layers.append(Layer(f"norm{namer.stage}", "lrn", attrs, namer.stage, loc))
            elif token.kind == "maxpool":
                stage = namer.stage
                layers.append(Layer(namer.pool(), "maxpool", {**base, "kernel": 2, "stride": 2}, stage, loc))
            elif token.kind == "fc":
                n = namer.next_fc()
                if not seen_fc:
                    layers.append(Layer("flatten", "flatten", dict(base), namer.stage, loc))
                seen_fc += 1
                last = seen_fc == total_fc
                units = (adapt or token.channels) if last else scaled(token.channels, header.width)
                layers.append(Layer(f"fc{n}", "fc", {**base, "out_features": units}, namer.stage, loc))
                if seen_fc < total_fc:
                    layers.append(Layer(f"relu{n}", "relu", dict(base), namer.stage, loc))
                    if header.dropout > 0:
                        layers.append(Layer(f"drop{n}", "dropout", {**base, "p": header.dropout}, namer.stage, loc))
            else:
                seen_softmax = 1
                layers.append(Layer("prob", "softmax", {**base, "axis": 1}, namer.stage, loc))
                break
    if not fcs:
        sink.error(tree.end, "spec has no FC layer", "end the network with FC-N soft-max, N the number of classes")
    elif not seen_softmax:
        sink.error(tree.end, "spec does not end with soft-max", "add soft-max after the last FC layer")
    return layers


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
