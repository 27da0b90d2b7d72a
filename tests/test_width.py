"""The `width` header key: the paper's networks, narrower, with their depth and layer pattern."""

from __future__ import annotations

import json

import pytest

import vggspec
from vggspec.errors import SpecError

# torchvision's table of configuration D (vgg16): channels, "M" for max-pool.
TORCHVISION_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _independent_count(width: float, side: int, classes: int) -> int:
    """torchvision's own feature builder on the narrowed table, and its classifier's Linear layers."""
    torch = pytest.importorskip("torch")
    from torchvision.models.vgg import make_layers

    cfg = [v if v == "M" else max(1, int(v * width + 0.5)) for v in TORCHVISION_D]
    features = make_layers(cfg)
    hidden = int(4096 * width + 0.5)
    flat = cfg[-2] * (side // 32) ** 2
    classifier = torch.nn.Sequential(torch.nn.Linear(flat, hidden), torch.nn.Linear(hidden, hidden),
                                     torch.nn.Linear(hidden, classes))
    return sum(p.numel() for m in (features, classifier) for p in m.parameters())


@pytest.mark.parametrize("width", ["1/4", "1/8", "0.3"])
def test_parameter_counts_of_narrow_d(width: str) -> None:
    graph = vggspec.load_spec("D", [f"width={width}", "input=64x64x3", "classes=10"])
    from fractions import Fraction

    assert graph.params == _independent_count(float(Fraction(width)), 64, 10)
    assert graph.meta.width == float(Fraction(width))


def test_width_keeps_depth_pattern_and_the_classes() -> None:
    full = vggspec.load_spec("D", ["input=64x64x3"])
    narrow = vggspec.load_spec("D", ["width=1/8", "input=64x64x3"])
    assert [x.name for x in full.layers] == [x.name for x in narrow.layers]
    convs = [x.attrs["out_channels"] for x in narrow.layers if x.op == "conv"]
    assert convs == [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    fcs = [x.attrs["out_features"] for x in narrow.layers if x.op == "fc"]
    assert fcs == [512, 512, 1000]  # the last FC stays at the number of classes


def test_width_rounds_to_nearest_and_at_least_one() -> None:
    graph = vggspec.load_spec("A", ["width=1/200", "input=32x32x3", "classes=3"])
    convs = [x.attrs["out_channels"] for x in graph.layers if x.op == "conv"]
    assert convs == [1, 1, 1, 1, 3, 3, 3, 3]  # 64/200 -> 1 (at least one), 512/200 = 2.56 -> 3


def test_width_in_a_spec_file_and_bad_values(tmp_path) -> None:
    spec = tmp_path / "n.vgg"
    spec.write_text("width: 0.5\ninput: 32x32x3\nconv3-64 maxpool FC-100 FC-10 soft-max\n")
    graph = vggspec.load_spec(str(spec))
    assert [x.attrs.get("out_channels") or x.attrs.get("out_features") for x in graph.layers
            if x.op in ("conv", "fc")] == [32, 50, 10]
    for bad in ("0", "-1", "17", "x"):
        spec.write_text(f"width: {bad}\nconv3-64 maxpool FC-10 soft-max\n")
        with pytest.raises(SpecError) as err:
            vggspec.load_spec(str(spec))
        assert err.value.diagnostics[0].span.line == 1


def test_width_follows_into_both_backends_and_summary(tmp_path, vggspec_cli) -> None:
    torch = pytest.importorskip("torch")
    sets = ["width=1/8", "input=64x64x3", "classes=10"]
    graph = vggspec.load_spec("D", sets)
    module = vggspec.to_torch(graph, seed=0)
    assert sum(p.numel() for p in module.parameters()) == graph.params
    assert module(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    vggspec.export_onnx(graph, tmp_path / "d.onnx")
    import onnx

    model = onnx.load(str(tmp_path / "d.onnx"))
    weights = {t.name: t.dims for t in model.graph.initializer}
    assert list(weights["conv1_1.weight"]) == [8, 3, 3, 3] and list(weights["fc7.weight"])[0] == 512
    out = vggspec_cli("summary", "D", *[a for s in sets for a in ("--set", s)], "--json")
    summary = json.loads(out.stdout)
    assert summary["width"] == 0.125 and summary["params"] == graph.params
    from vggspec.backends.torch import render_source

    assert "width 0.125" in render_source(graph)
    onnx.checker.check_model(str(tmp_path / "d.onnx"))
