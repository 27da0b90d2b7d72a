"""A spec (a file, or a shipped configuration's name) to its layer graph: parse, then build."""

from __future__ import annotations

from pathlib import Path

from ..resources import resolve_spec
from ..spec import parse, parse_file
from .build import build
from .layergraph import LayerGraph


def load_spec(spec: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> LayerGraph:
    """Parse a spec file (or a shipped name such as "D") into its layer graph."""
    return build(parse_file(resolve_spec(spec), tuple(overrides)))


def loads_spec(text: str, path: str = "<spec>", overrides: tuple[str, ...] | list[str] = ()) -> LayerGraph:
    """Parse spec text into its layer graph."""
    return build(parse(text, path, tuple(overrides), keep_going=True))
