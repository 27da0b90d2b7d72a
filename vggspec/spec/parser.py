"""Text to syntax tree: header lines, then layer tokens in the paper's notation."""

from __future__ import annotations

import difflib
import re
from dataclasses import fields

from .errors import DiagnosticSink, Span, shorten
from .header import KEYS, HeaderValueError
from .syntax import Header, HeaderEntry, LayerToken, SpecTree

MAX_KERNEL = 31
MAX_WIDTH = 1 << 20
MAX_REPEAT = 1024
OVERRIDE_PATH = "<--set>"

_HEADER = re.compile(r"^(\s*)([A-Za-z_][\w\-]*)[ \t]*:(.*)$")  # greedy and trimmed below: linear time
_WORD = re.compile(r"\S+")
_CANONICAL = ("maxpool", "lrn", "soft-max")


def parse(source: str, path: str = "<spec>", overrides: tuple[str, ...] = (), keep_going: bool = False) -> SpecTree:
    """Parse spec text into a SpecTree, collecting every error before raising SpecError.

    keep_going: when the only errors are header values that cannot change the layers or their shapes
    (say `std: 0`), return the tree with them in `tree.pending`, so that build() reports them together
    with its own. Bad layer tokens, `input:` and `width:` stop here: what build would find after them
    could be a consequence of the typo rather than a second mistake.
    """
    sink = DiagnosticSink(path, source)
    tree = SpecTree(path=path, source=source)
    in_layers = blocking = False
    lines = source.splitlines()
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0]
        if not line.strip():
            continue
        m = _HEADER.match(line)
        if m:
            span = Span(lineno, len(m.group(1)) + 1, len(m.group(2)))
            if in_layers:
                sink.error(span, "header line after the first layer", "move header lines to the top of the spec")
                continue
            value = m.group(3).strip()
            value_col = m.start(3) + (len(m.group(3)) - len(m.group(3).lstrip())) + 1 if value else len(line) + 1
            entry = HeaderEntry(m.group(2).lower(), value, span, Span(lineno, value_col, max(1, len(value))), path)
            _add_entry(tree, entry, sink)
            continue
        in_layers = True
        for word in _WORD.finditer(line):
            token = _lex(word.group(), Span(lineno, word.start() + 1, len(word.group())), sink)
            if token is not None:
                tree.layers.append(token)
            else:
                blocking = True
    tree.end = Span(max(1, len(lines)), max(1, len(lines[-1]) + 1 if lines else 1))
    _apply_overrides(tree, overrides)
    tree.header, shaping = _validate_header(tree, sink)
    if not tree.layers and not sink.diagnostics:
        sink.error(Span(1, 1), "empty spec: no layers", "list layers such as: conv3-64 maxpool FC-10 soft-max")
    if not keep_going or blocking or shaping or not tree.layers:
        sink.raise_if_any()
    tree.pending = list(sink.diagnostics)
    return tree


def _add_entry(tree: SpecTree, entry: HeaderEntry, sink: DiagnosticSink) -> None:
    if entry.key not in KEYS:
        close = difflib.get_close_matches(entry.key, KEYS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(KEYS)}"
        sink.error(entry.key_span, f"unknown header key '{entry.key}'", hint)
    elif entry.key in tree.entries:
        first = tree.entries[entry.key].key_span
        sink.error(entry.key_span, f"header key '{entry.key}' repeated", f"first given on line {first.line}")
    else:
        tree.entries[entry.key] = entry


def _apply_overrides(tree: SpecTree, overrides: tuple[str, ...]) -> None:
    """`--set key=value` replaces a header entry; its errors point into the override text."""
    problems = DiagnosticSink(OVERRIDE_PATH, "\n".join(overrides))
    for lineno, text in enumerate(overrides, start=1):
        key, sep, value = text.partition("=")
        key = key.strip().lower()
        if not sep and key in KEYS:
            problems.error(Span(lineno, 1, max(1, len(text))), f"--set {key} has no value",
                           f"write --set {key}=VALUE")
            continue
        if not sep or key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "write --set key=value with a header key"
            problems.error(Span(lineno, 1, max(1, len(text.partition("=")[0]))), f"cannot set '{key}'", hint)
            continue
        col = len(text.partition("=")[0]) + 2
        tree.entries[key] = HeaderEntry(
            key, value.strip(), Span(lineno, 1, len(key)), Span(lineno, col, max(1, len(value))), OVERRIDE_PATH
        )
    problems.raise_if_any()
    tree.overrides = list(overrides)


def _validate_header(tree: SpecTree, sink: DiagnosticSink) -> tuple[Header | None, bool]:
    """The header (defaults standing in for values in error), and whether an error concerns the shapes."""
    values: dict[str, object] = {}
    override_sink = DiagnosticSink(OVERRIDE_PATH, "\n".join(tree.overrides))
    shaping = False
    for key, entry in tree.entries.items():
        target = override_sink if entry.origin == OVERRIDE_PATH else sink
        try:
            values[key] = KEYS[key].parse(entry.value)
        except HeaderValueError as exc:
            target.error(entry.value_span, f"{key}: {exc}", exc.hint)
            shaping |= key in SHAPING_KEYS
    sink.diagnostics.extend(override_sink.diagnostics)
    values.setdefault("name", _default_name(tree.path))
    values.setdefault("input", (224, 224, 3))
    channels = values["input"][2]  # type: ignore[index]
    for key in ("mean", "std"):
        if key in values and len(values[key]) != channels:  # type: ignore[arg-type]
            entry = tree.entries[key]
            sink.error(entry.value_span, f"{key} has {len(values[key])} values for {channels} input channels")  # type: ignore[arg-type]
    if channels != 3:
        values.setdefault("mean", (0.5,) * channels)
        values.setdefault("std", (0.5,) * channels)
    for key in ("mean", "std"):  # a count that does not match the channels is an error reported above
        if key in values and len(values[key]) != channels:  # type: ignore[arg-type]
            values[key] = (0.5,) * channels
    known = {f.name for f in fields(Header)}
    return Header(**{k: v for k, v in values.items() if k in known}), shaping  # type: ignore[arg-type]


# Header keys whose value decides the layers' shapes: with one of them in error, build() would only
# report consequences.
SHAPING_KEYS = frozenset({"input", "width"})


def _default_name(path: str) -> str:
    stem = re.sub(r"\.vgg$", "", path.replace("\\", "/").rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9_\-]", "_", stem)
    return stem if stem and stem[0].isalpha() else f"vgg_{stem}"


def _lex(word: str, span: Span, sink: DiagnosticSink) -> LayerToken | None:
    """Classify one whitespace-separated word; report and return None when it is not a layer."""
    text = word.lower()
    repeat = 1
    if "*" in text:
        text, _, count = text.rpartition("*")
        if not re.fullmatch(r"[0-9]{1,9}", count) or not 1 <= int(count) <= MAX_REPEAT:
            sink.error(
                span,
                f"repetition '*{shorten(count)}' must be an integer from 1 to {MAX_REPEAT}",
                f"write e.g. {text or 'conv3-64'}*3",
            )
            return None
        repeat = int(count)
    if text in ("maxpool", "lrn", "soft-max", "softmax"):
        kind = {"soft-max": "softmax"}.get(text, text)
        return LayerToken(kind, word, span, repeat=repeat)
    m = re.fullmatch(r"conv([^-]*)-(.*)", text)
    if m:
        kernel = _number_in(m.group(1), "kernel size", span, sink, 1, MAX_KERNEL)
        channels = _number_in(m.group(2), "channel count", span, sink, 1, MAX_WIDTH)
        if kernel and kernel % 2 == 0:
            sink.error(
                span,
                f"kernel size {kernel} is even",
                f"use an odd size such as conv{kernel + 1}-{m.group(2)}: padding k//2 keeps the size only for odd k",
            )
            return None
        return LayerToken("conv", word, span, kernel, channels, repeat) if kernel and channels else None
    m = re.fullmatch(r"fc-(.*)", text)
    if m:
        units = _number_in(m.group(1), "FC output count", span, sink, 1, MAX_WIDTH)
        return LayerToken("fc", word, span, 0, units, repeat) if units else None
    sink.error(span, f"unknown layer '{word}'", _suggest(text))
    return None


def _number_in(text: str, what: str, span: Span, sink: DiagnosticSink, low: int, high: int) -> int:
    if not re.fullmatch(r"-?[0-9]+", text):
        sink.error(span, f"{what} '{text}' is not a number")
        return 0
    if len(text.lstrip("-0")) > len(str(high)):  # before int(): thousands of digits must not reach it
        sink.error(span, f"{what} '{shorten(text)}' is out of range", f"it must be between {low} and {high}")
        return 0
    value = int(text)
    if not low <= value <= high:
        sink.error(span, f"{what} {value} is out of range", f"it must be between {low} and {high}")
        return 0
    return value


def _suggest(text: str) -> str | None:
    m = re.fullmatch(r"conv\D*(\d+)\D+(\d+)", text)
    if m:
        return f"did you mean 'conv{m.group(1)}-{m.group(2)}'?"
    m = re.fullmatch(r"(?:fc|dense|linear)\D*(\d+)", text)
    if m:
        return f"did you mean 'FC-{m.group(1)}'?"
    if "pool" in text:
        return "did you mean 'maxpool'?"
    if text in ("relu", "dropout", "bn", "batchnorm"):
        return "ReLU and dropout are implied; batch norm is the header 'norm: batch'"
    close = difflib.get_close_matches(text, _CANONICAL, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "layers are convK-C, maxpool, LRN, FC-N and soft-max"
