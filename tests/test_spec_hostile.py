"""Hostile specs: every one is a located error (never an internal error), found in linear time and memory.

The timeouts are not timing assertions: each case takes well under a second, and the quadratic or
unbounded behaviour they guard against takes minutes (the timeout only turns a hang into a failure).
"""

from __future__ import annotations

import keyword

import pytest

import vggspec
from vggspec.errors import SpecError

TAIL = "\ninput: 32x32\nconv3-4 maxpool FC-2 soft-max\n"


def _errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as err:
        vggspec.loads_spec(text, "hostile.vgg")
    return [d.message for d in err.value.diagnostics]


@pytest.mark.timeout(60)
def test_numbers_beyond_int_conversion_are_located_errors() -> None:
    nines = "9" * 5000
    layers = f"conv3-{nines} conv3-4*{nines} maxpool FC-{nines} soft-max"
    messages = _errors(f"classes: {nines}\ninput: {nines}x32\n{layers}\n")
    assert len(messages) == 5, messages
    assert all("internal" not in m and len(m) < 200 for m in messages)


@pytest.mark.parametrize("line", ["scale: 1e999", "mean: 1e400 0 0", "std: 1e309 1 1", "dropout: 1e999",
                                  "scale: nan", "scale: 1e999999999", "mean: 1/0 0 0"])
def test_overflowing_floats_are_located_errors(line: str) -> None:
    messages = _errors(line + TAIL)
    assert len(messages) == 1 and ("finite" in messages[0] or "not a number" in messages[0]), messages


@pytest.mark.timeout(60)
def test_a_long_header_line_parses_in_linear_time() -> None:
    assert any("not an identifier" in m for m in _errors("name:a" + " " * 300_000 + "b" + TAIL))
    graph = vggspec.loads_spec("name:   spaced   " + " " * 300_000 + TAIL)
    assert graph.meta.name == "spaced"


@pytest.mark.timeout(60)
def test_the_whole_network_is_bounded_before_it_is_built() -> None:
    messages = _errors("input: 32x32\n" + "conv1-1*1024 " * 200 + "\nFC-2 soft-max\n")
    assert len(messages) == 1 and "204,802 layer tokens" in messages[0]
    messages = _errors("input: 32x32\n" + "conv1-1 " * 130_000 + "\nFC-2 soft-max\n")
    assert len(messages) == 1 and "at most" in messages[0]


@pytest.mark.parametrize("name", ["None", "True", "False", "class", "lambda"])
def test_keyword_names_make_valid_python(name: str) -> None:
    pytest.importorskip("torch")
    from vggspec.backends.torch import class_name, render_source

    graph = vggspec.loads_spec(f"name: {name}" + TAIL)
    source = render_source(graph)
    compile(source, "generated.py", "exec")
    generated = class_name(graph)
    assert generated.isidentifier() and not keyword.iskeyword(generated)
    if name in ("None", "True", "False"):
        assert generated == f"Vgg{name}"


def test_errors_of_every_phase_are_reported_in_one_run() -> None:
    from vggspec.graph.load import loads_spec
    from vggspec.spec import SpecError

    text = "name: t\ninput: 32x32x3\nclasses: 5\nstd: 0 1 1\nconv3-4 maxpool*6 FC-10 soft-max\n"
    with pytest.raises(SpecError) as err:
        loads_spec(text, "t.vgg")
    found = [(d.span.line, d.message.split(":")[0]) for d in err.value.diagnostics]
    assert found == [(3, "classes"), (4, "std"), (5, "pool6 shrinks the 1x1 map below 1x1")]


def test_a_bad_layer_token_stops_before_the_shape_checks() -> None:
    from vggspec.graph.load import loads_spec
    from vggspec.spec import SpecError

    # 'maxpol' is dropped: checking shapes without it would report consequences of the typo.
    text = "name: t\ninput: 32x32x3\nclasses: 5\nstd: 0 1 1\nconv3-4 maxpol FC-10 soft-max\n"
    with pytest.raises(SpecError) as err:
        loads_spec(text, "t.vgg")
    assert [d.span.line for d in err.value.diagnostics] == [4, 5]
