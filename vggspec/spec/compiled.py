"""A spec's text with its `--set` overrides written into the header: the spec of the network compiled.

The ONNX metadata carries this text, so that a model says what network it is (D eight times narrower at
64 x 64 with 10 classes, not plain D) and compiling the text gives exactly that network again.
"""

from __future__ import annotations

from .errors import SpecError
from .parser import _HEADER, KEYS, parse

DROPPED_LABELS = "the labels travel with the model"


def compiled_text(source: str, overrides: tuple[str, ...] | list[str] = (), drop_labels: bool = True) -> str:
    """`source` with each `--set key=value` replacing its header line (or added after the last one), the
    later of two on one key winning as in parse(). Each changed line ends in a `# --set` comment naming the
    spec's own value. With `drop_labels`, a `labels:` line is commented out: the file it names is not beside
    the text wherever the text goes. A source without overrides or labels comes back unchanged."""
    wanted: dict[str, str] = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if sep and key.strip().lower() in KEYS:
            wanted[key.strip().lower()] = " ".join(value.split())  # one line: a value never spans two
    lines = source.splitlines()
    if "classes" in wanted:
        lines = _adapted_last_fc(source, tuple(overrides), wanted["classes"], lines)
    out: list[str] = []
    in_layers, after_header = False, None
    for raw in lines:
        code = raw.split("#", 1)[0]
        m = None if in_layers else _HEADER.match(code)
        if m is None:
            out.append(raw)
            in_layers |= bool(code.strip())  # parse() allows no header line after the first layer
            continue
        key = m.group(2).lower()
        out.append(_line(key, m.group(3).strip(), wanted.pop(key, None), drop_labels, m.group(1)) or raw)
        after_header = len(out)
    added = [_line(key, None, value, drop_labels) for key, value in wanted.items()]
    at = after_header if after_header is not None else _first_layer(out)
    out[at:at] = [line for line in added if line]
    text = "\n".join(out)
    return text + "\n" if source.endswith("\n") or not source else text


def _line(key: str, old: str | None, new: str | None, drop_labels: bool, indent: str = "") -> str | None:
    """The header line of `key` after the overrides; None: the source line as it is."""
    value = old if new is None else new
    if key == "labels" and drop_labels and value:
        return f"# {indent}labels: {value}  ({DROPPED_LABELS})"
    if key == "labels" and not value:  # `--set labels=` clears the spec's file
        return f"# {indent}labels: {old}  # --set labels=" if old else ""
    if new is None:
        return None
    was = "" if old is None else f" (spec: {old})"
    return f"{indent}{key}: {new}  # --set{was}"


def _adapted_last_fc(source: str, overrides: tuple[str, ...], classes: str, lines: list[str]) -> list[str]:
    """`--set classes=N` also makes the last FC layer FC-N (graph.build adapts it rather than disagree): the
    text says so, else compiling it would find `classes: N` against `FC-1000`."""
    try:
        tree = parse(source, "<spec>", overrides, keep_going=True)
    except SpecError:  # the text did not compile with these overrides: nothing to adapt
        return lines
    fcs = [t for t in tree.layers if t.kind == "fc"]
    if not fcs or str(fcs[-1].channels) == classes:
        return lines
    token = fcs[-1]
    word = f"FC-{classes}"
    if token.repeat > 1:  # FC-4096*3: the first two stay, the third becomes FC-N
        head = token.text.rsplit("*", 1)[0]
        word = f"{head if token.repeat == 2 else f'{head}*{token.repeat - 1}'} {word}"
    i, col = token.span.line - 1, token.span.col - 1
    line = lines[i][:col] + word + lines[i][col + len(token.text):]
    return [*lines[:i], f"{line}  # --set classes={classes} (spec: {token.text})", *lines[i + 1:]]


def _first_layer(lines: list[str]) -> int:
    """Where added header lines go in a spec without any: before its first layer line."""
    for i, raw in enumerate(lines):
        if raw.split("#", 1)[0].strip():
            return i
    return len(lines)
