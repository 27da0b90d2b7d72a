"""Property tests: random valid specs build; random corruptions fail with a located error, never a crash."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vggspec
from vggspec.spec import SpecError

conv = st.builds(
    lambda k, c, r: f"conv{k}-{c}" + (f"*{r}" if r > 1 else ""),
    st.sampled_from([1, 3, 5]),
    st.integers(1, 64),
    st.integers(1, 3),
)
stage = st.builds(
    lambda convs, lrn: " ".join(convs) + (" LRN" if lrn else "") + " maxpool",
    st.lists(conv, min_size=1, max_size=3),
    st.booleans(),
)


@st.composite
def valid_specs(draw) -> str:
    stages = draw(st.lists(stage, min_size=0, max_size=4))
    side = draw(st.integers(2 ** len(stages), 64))
    fcs = draw(st.lists(st.integers(1, 64), min_size=1, max_size=3))
    header = f"name: net\ninput: {side}x{side}x{draw(st.sampled_from([1, 3]))}\n"
    header += draw(st.sampled_from(["", "norm: batch\n", "dropout: 0\n", "init: xavier\n"]))
    return header + "\n".join(stages) + "\n" + " ".join(f"FC-{n}" for n in fcs) + " soft-max\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs())
def test_random_valid_specs_build(text: str):
    g = vggspec.loads_spec(text, "r.vgg")
    assert g.layers[-1].name == "prob"
    assert g.params == sum(x.params for x in g.layers) > 0
    assert all(min(x.out_shape) >= 1 for x in g.layers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_specs(), st.data())
def test_random_corruptions_fail_with_a_located_error(text: str, data):
    pos = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.text(alphabet="-*:x#0123456789abcXYZ_ \n\t", min_size=1, max_size=4))
    mode = data.draw(st.sampled_from(["insert", "replace", "delete"]))
    if mode == "insert":
        mutated = text[:pos] + junk + text[pos:]
    elif mode == "replace":
        mutated = text[:pos] + junk + text[pos + len(junk) :]
    else:
        mutated = text[:pos] + text[pos + len(junk) :]
    try:
        vggspec.loads_spec(mutated, "m.vgg")
    except SpecError as exc:
        lines = mutated.splitlines() or [""]
        for d in exc.diagnostics:
            assert d.path in ("m.vgg", "<--set>")
            assert 1 <= d.span.line <= max(1, len(lines))
            assert d.format().startswith(f"{d.path}:{d.span.line}:{d.span.col}: error: ")


KEYS = ["name", "input", "classes", "norm", "dropout", "init", "scale", "mean", "std", "width", "labels", "nme"]
VALUES = ["", "D", "None", "1", "0", "-3", "1e999", "nan", "9" * 5000, "224x224x3", "0x4x3", "8x8", "1/255",
          "0.5 0.5 0.5", "batch", "paper", "xavier", "1/8", "/dev/zero", "é", "a b c", "3" * 20]
WORDS = ["conv3-64", "conv1-1*1024", "conv3-" + "9" * 5000, "maxpool", "maxpool*9", "LRN", "FC-4096", "FC-0",
         "soft-max", "conv3-", "conv-3", "FC--1", "*3", "conv3-64*0", "Ω", "conv3-2*1024", "FC-10", "#", ""]


@st.composite
def hostile_specs(draw) -> str:
    lines = [f"{draw(st.sampled_from(KEYS))}:{draw(st.sampled_from([' ', '', '  ']))}"
             f"{draw(st.sampled_from(VALUES))}" for _ in range(draw(st.integers(0, 5)))]
    lines += [" ".join(draw(st.lists(st.sampled_from(WORDS), max_size=8))) for _ in range(draw(st.integers(0, 4)))]
    return "\n".join(lines) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_specs())
def test_hostile_specs_give_a_graph_or_located_errors_in_bounded_time(text: str):
    import time

    from vggspec.errors import VggspecError

    start = time.perf_counter()
    try:
        graph = vggspec.loads_spec(text, "h.vgg")
    except SpecError as exc:
        assert exc.diagnostics and all(d.span.line >= 1 and d.span.col >= 1 for d in exc.diagnostics)
        assert all(d.format().startswith(f"{d.path}:{d.span.line}:{d.span.col}: error: ") for d in exc.diagnostics)
    except VggspecError as exc:  # e.g. a labels file that is not there: named, not located
        assert exc.message
    else:
        assert graph.layers and graph.params >= 0
    assert time.perf_counter() - start < 2.0, "a spec under the size limit must be judged in a second or two"
