"""The spec language: tokens, headers, overrides, and the located errors of bad specs."""

from __future__ import annotations

import keyword

import pytest

import vggspec
from vggspec.spec import SpecError, decode, parse

SMALL = "name: small\ninput: 32x32x3\nconv3-8 maxpool conv3-16 maxpool FC-32 FC-5 soft-max\n"


def errors(text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        vggspec.loads_spec(text, "t.vgg", overrides)
    return [d.format() for d in info.value.diagnostics]


def test_tokens_are_case_insensitive_and_repeat():
    g = vggspec.loads_spec("input: 32x32\nCONV3-8*2 MaxPool fc-10 Soft-Max\n")
    assert [x.name for x in g.layers if x.op == "conv"] == ["conv1_1", "conv1_2"]
    assert g.layer("fc2").attrs["out_features"] == 10


def test_comments_and_header_defaults():
    g = vggspec.loads_spec("# a comment\nconv3-8 # trailing\nmaxpool FC-3 soft-max\n", "net.vgg")
    assert g.meta.name == "net"
    assert g.meta.input_shape == (3, 224, 224)
    assert g.meta.dropout == 0.5 and g.meta.init == "paper" and g.meta.norm == "none"


def test_names_follow_the_original_release():
    names = [x.name for x in vggspec.load_spec("D").layers]
    assert names[:4] == ["input", "conv1_1", "relu1_1", "conv1_2"]
    assert "conv5_3" in names and "pool5" in names
    assert names[-9:] == ["flatten", "fc6", "relu6", "drop6", "fc7", "relu7", "drop7", "fc8", "prob"]


def test_batch_norm_and_dropout_headers():
    g = vggspec.loads_spec(SMALL, overrides=("norm=batch", "dropout=0"))
    assert [x.name for x in g.layers][:4] == ["input", "conv1_1", "bn1_1", "relu1_1"]
    assert not g.of_op("dropout")


def test_norm_except_leaves_named_convolutions_without_batch_norm():
    # The LRN comparison's setting: an LRN after an un-normalised conv1_1 sees the input's own scale.
    g = vggspec.load_spec("A-LRN", ("norm=batch", "norm_except=conv1_1"))
    names = [x.name for x in g.layers]
    assert names[:7] == ["input", "conv1_1", "relu1_1", "norm1", "pool1", "conv2_1", "bn2_1"]
    assert len(g.of_op("bn")) == len(g.of_op("conv")) - 1 and g.meta.norm_except == ("conv1_1",)
    both = vggspec.load_spec("A", ("norm=batch", "norm_except=conv2_1, conv1_1"))
    assert {x.name for x in both.of_op("bn")} == {"bn3_1", "bn3_2", "bn4_1", "bn4_2", "bn5_1", "bn5_2"}


def test_norm_except_errors_are_located():
    (found,) = errors(SMALL, ("norm=batch", "norm_except=conv9_1"))
    assert found.startswith("<--set>:2:13: error: norm_except names conv9_1, which this spec does not have")
    (found,) = errors(SMALL, ("norm_except=conv1_1",))
    assert "norm_except without norm: batch" in found and "add norm: batch" in found
    (found,) = errors(SMALL, ("norm=batch", "norm_except=bn1_1"))
    assert "'bn1_1' is not a convolution's name" in found
    (found,) = errors("norm: batch\nnorm_except: conv3_1\n" + SMALL)
    assert found.startswith("t.vgg:2:14: error: norm_except names conv3_1")


def test_lrn_alpha_sets_the_lrns_alpha_and_needs_an_lrn():
    (lrn,) = vggspec.load_spec("A-LRN", ("lrn_alpha=0.33",)).of_op("lrn")
    assert lrn.attrs["alpha"] == pytest.approx(0.33 * 5)  # stored in PyTorch's and ONNX's convention
    (found,) = errors(SMALL, ("lrn_alpha=0.5",))
    assert found.startswith("<--set>:1:11: error: lrn_alpha, but this spec has no LRN")
    (found,) = errors(SMALL.replace("maxpool", "LRN maxpool", 1), ("lrn_alpha=-1",))
    assert "lrn_alpha -1 is outside (0, 1000]" in found


def test_set_classes_adapts_the_last_fc():
    g = vggspec.load_spec("D", ("classes=10",))
    assert g.layer("fc8").out_shape == (10,) and g.meta.classes == 10


def test_lrn_converts_alexnet_alpha_to_the_pytorch_convention():
    (lrn,) = vggspec.load_spec("A-LRN").of_op("lrn")
    assert lrn.name == "norm1"
    assert lrn.attrs == {"size": 5, "alpha": pytest.approx(5e-4), "beta": 0.75, "k": 2.0}


def test_fraction_and_list_header_values():
    g = vggspec.loads_spec("scale: 1/255\nmean: 1, 2, 3\nstd: 4 5 6\n" + SMALL.split("\n", 2)[2])
    assert g.meta.preprocessing.scale == pytest.approx(1 / 255)
    assert g.meta.preprocessing.mean == (1, 2, 3)


GOLDEN = {
    "conv3_64 FC-3 soft-max": [
        "t.vgg:1:1: error: unknown layer 'conv3_64'",
        "    conv3_64 FC-3 soft-max",
        "    ^~~~~~~~",
        "  hint: did you mean 'conv3-64'?",
    ],
    "conv3-0 FC-3 soft-max": ["t.vgg:1:1: error: channel count 0 is out of range"],
    "conv4-8 FC-3 soft-max": ["t.vgg:1:1: error: kernel size 4 is even"],
    "conv99-8 FC-3 soft-max": ["t.vgg:1:1: error: kernel size 99 is out of range"],
    "conv3--5 FC-3 soft-max": ["t.vgg:1:1: error: channel count -5 is out of range"],
    "conv3-abc FC-3 soft-max": ["t.vgg:1:1: error: channel count 'abc' is not a number"],
    "FC-3 soft-max conv3-8": ["t.vgg:1:15: error: 'conv3-8' after soft-max"],
    "colour: red\nFC-3 soft-max": ["t.vgg:1:1: error: unknown header key 'colour'"],
    "name: a\nname: b\nFC-3 soft-max": ["t.vgg:2:1: error: header key 'name' repeated"],
    "classes: 5\nFC-3 soft-max": ["t.vgg:1:10: error: classes: 5 disagrees with the last FC layer, FC-3"],
    "input: 8x8\nconv3-4 maxpool maxpool maxpool maxpool FC-3 soft-max": [
        "t.vgg:2:33: error: pool4 shrinks the 1x1 map below 1x1"
    ],
    "": ["t.vgg:1:1: error: empty spec: no layers"],
    "conv3-8 maxpool soft-max": ["t.vgg:1:25: error: spec has no FC layer"],
    "input: 224x224\nconv3-1048576 conv3-1048576 FC-3 soft-max": ["error: spec too large to build"],
    "maxpol FC-3 soft-max": ["hint: did you mean 'maxpool'?"],
    "fc4096 soft-max": ["hint: did you mean 'FC-4096'?"],
    "input: 224xabc\nFC-3 soft-max": ["t.vgg:1:8: error: input: input width 'abc' is not a positive integer"],
    "conv3-8*0 FC-3 soft-max": ["repetition '*0' must be an integer from 1 to 1024"],
    "FC-3 conv3-8 FC-3 soft-max": ["'conv3-8' after a fully connected layer"],
    "FC-3": ["spec does not end with soft-max"],
}


@pytest.mark.parametrize("text", GOLDEN)
def test_golden_errors(text: str):
    out = "\n".join(errors(text))
    for expected in GOLDEN[text]:
        assert expected in out, out


def test_all_errors_of_a_file_are_reported_together():
    found = errors("conv3_8 conv4-8\nbogus FC-3 soft-max")
    assert len(found) == 3
    assert [f.split(": error")[0] for f in found] == ["t.vgg:1:1", "t.vgg:1:9", "t.vgg:2:1"]


def test_override_errors_point_into_the_override():
    (found,) = errors(SMALL, ("norm=layer",))
    assert found.startswith("<--set>:1:6: error: norm: 'layer' is not one of none, batch")
    (found,) = errors(SMALL, ("colour=red",))
    assert "cannot set 'colour'" in found


def test_not_utf8_is_located():
    with pytest.raises(SpecError) as info:
        decode(b"conv3-8\nFC-3 \xff soft-max", "bad.vgg")
    assert info.value.diagnostics[0].format().startswith("bad.vgg:2:6: error: file is not UTF-8 text")
    with pytest.raises(SpecError, match="binary"):
        decode(b"\x00\x01\x02", "bin.vgg")


def test_parse_keeps_positions():
    tree = parse("name: x\n\n  conv3-8*2   maxpool\nFC-2 soft-max\n", "p.vgg")
    conv, pool = tree.layers[:2]
    assert (conv.span.line, conv.span.col, conv.span.length, conv.repeat) == (3, 3, 9, 2)
    assert (pool.span.line, pool.span.col) == (3, 15)
    assert tree.entries["name"].value_span.col == 7


def test_shipped_specs_resolve_by_bare_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert vggspec.load_spec("d").meta.name == "vgg_d"
    assert vggspec.load_spec("A-LRN.vgg").meta.name == "vgg_a_lrn"
    with pytest.raises(vggspec.SpecNotFoundError):
        vggspec.load_spec("F")


def test_labels_file_is_read_beside_the_spec(tmp_path):
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    spec = tmp_path / "pets.vgg"
    spec.write_text("labels: names.txt\ninput: 32x32\nconv3-4 maxpool FC-2 soft-max\n")
    assert vggspec.load_spec(spec).meta.labels == ("cat", "dog")
    spec.write_text("labels: names.txt\ninput: 32x32\nconv3-4 maxpool FC-3 soft-max\n")
    with pytest.raises(SpecError, match="2 labels for 3 classes"):
        vggspec.load_spec(spec)
    spec.write_text("labels: missing.txt\ninput: 32x32\nconv3-4 maxpool FC-3 soft-max\n")
    with pytest.raises(SpecError, match="missing.txt: no such file"):
        vggspec.load_spec(spec)


def test_compiled_text_writes_the_set_options_into_the_header() -> None:
    """The metadata's spec: --set applied (a header line replaced or added, the last FC following classes), a
    labels line commented out (the file is not beside the text), unchanged without either."""
    from vggspec import loads_spec
    from vggspec.spec.compiled import compiled_text

    source = "# a net\nname: n\ninput: 16x16x3  # small\nlabels: l.txt\n\nconv3-8 maxpool FC-32*3 soft-max\n"
    sets = ("input=24x24", "classes=4", "norm=batch", "input=32x32x3", "labels=")
    text = compiled_text(source, sets)
    assert "input: 32x32x3  # --set (spec: 16x16x3)" in text and "norm: batch  # --set" in text
    assert "FC-32*2 FC-4 soft-max  # --set classes=4 (spec: FC-32*3)" in text
    assert "\n# labels: l.txt" in text and text.index("norm:") < text.index("conv3-8")
    rebuilt, compiled = loads_spec(text), loads_spec(source.replace("labels: l.txt\n", ""), overrides=sets)
    assert [(x.name, x.attrs, x.out_shape) for x in rebuilt.layers] == \
           [(x.name, x.attrs, x.out_shape) for x in compiled.layers]
    plain = "name: n\nconv3-8 maxpool FC-2 soft-max\n"
    assert compiled_text(plain) == plain
    assert compiled_text(plain, ("classes=2",)) == "name: n\nclasses: 2  # --set\nconv3-8 maxpool FC-2 soft-max\n"


def test_zero_classes_is_a_located_spec_error():
    with pytest.raises(SpecError) as info:
        vggspec.load_spec("D", ("classes=0",))
    assert "classes: '0' is not a positive integer" in str(info.value)
    with pytest.raises(SpecError) as info:
        parse("name: t\ninput: 32x32\nclasses: 0\nconv3-8 maxpool FC-10 soft-max\n", "t.vgg")
    assert "t.vgg:3:10: error: classes: '0' is not a positive integer" in str(info.value)


# --- Hostile specs: every one is a located error (never an internal error), found in linear time and memory.
#
# The timeouts are not timing assertions: each case takes well under a second, and the quadratic or
# unbounded behaviour they guard against takes minutes (the timeout only turns a hang into a failure).

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
