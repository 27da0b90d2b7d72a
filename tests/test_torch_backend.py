"""The PyTorch backend: generated source, its classes, the dense form, and torchvision parity."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import vggspec
from vggspec.backends.torch import class_name, load_module_class, render_source, state_dict_to_numpy, to_torch
from vggspec.errors import ModelError, WeightsError
from vggspec.weights import init_weights

torch = pytest.importorskip("torch")
F = torch.nn.functional
ROOT = Path(__file__).resolve().parents[1]

# Three pools on 32 x 32 leave a 4 x 4 map: the dense form's first FC is a 4 x 4 convolution.
SMALL = """\
name: small_net
input: 32x32x3
classes: 5
norm: batch
conv3-8 maxpool
conv3-16 LRN maxpool
conv3-16 conv1-16 maxpool
FC-32 FC-32 FC-5 soft-max
"""
# A non-square input: the first FC becomes a 3 x 4 convolution.
WIDE = """\
name: wide-net
input: 24x32x3
classes: 4
conv3-8 maxpool conv3-8 maxpool conv3-8 maxpool
FC-16 FC-4 soft-max
"""


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


def _graph(text: str = SMALL, sets: tuple[str, ...] = ()) -> vggspec.LayerGraph:
    return vggspec.loads_spec(text, overrides=sets)


def _ruff(path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args, str(path)],
                          capture_output=True, text=True, cwd=path.parent)


def test_class_names():
    assert class_name(vggspec.load_spec("D")) == "VggD"
    assert class_name(vggspec.load_spec("A-LRN")) == "VggALrn"
    assert class_name(_graph(WIDE)) == "WideNet"


@pytest.mark.parametrize("spec, sets", [("D", ()), ("A-LRN", ("norm=batch",)), ("C", ("dropout=0",))])
def test_source_is_deterministic_and_passes_ruff(tmp_path, spec, sets):
    graph = vggspec.load_spec(spec, sets)
    source = render_source(graph)
    assert source == render_source(vggspec.load_spec(spec, sets))
    path = tmp_path / "generated.py"
    path.write_text(source)
    for args in ((), ("--config", str(ROOT / "pyproject.toml"))):
        result = _ruff(path, *args)
        assert result.returncode == 0, result.stdout + result.stderr
    name = class_name(graph)
    assert f'__all__ = ["{name}", "{name}Dense"]' in source
    assert "        self.conv1_1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)\n" in source
    assert "        x = self.fc6(x)\n" in source
    assert graph.meta.spec_text.splitlines()[1] in source  # the spec in the docstring
    assert "softmax" not in source.lower().replace("soft-max", "")


def test_awkward_spec_text_stays_valid_python(tmp_path):
    awkward = '# a """quoted""" comment with a \\ backslash,\ta tab and trailing space   \n'
    text = awkward + "# " + "x" * 150 + "\n" + SMALL
    source = render_source(_graph(text))
    path = tmp_path / "awkward.py"
    path.write_text(source)
    compile(source, str(path), "exec")
    assert _ruff(path, "--config", str(ROOT / "pyproject.toml")).returncode == 0
    assert _ruff(path, "--select", "E,F,W,I,B,UP").returncode == 0


def test_to_torch_default_weights_are_the_numpy_init():
    graph = _graph()
    model = to_torch(graph, seed=3, init="xavier")
    expected = init_weights(graph, "xavier", 3)
    got = state_dict_to_numpy(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value)
    assert model.training and type(model).__name__ == "SmallNet"
    assert load_module_class(graph) is type(model)  # one executed source, cached


def test_to_torch_checks_weights():
    graph = _graph()
    weights = init_weights(graph)
    weights["conv2_1.weight"] = weights["conv2_1.weight"][:, :4]
    with pytest.raises(WeightsError, match="conv2_1"):
        to_torch(graph, weights=weights)
    with pytest.raises(ModelError):
        to_torch(vggspec.fully_conv(graph))


def test_forward_returns_logits_and_names_match_graph():
    graph = _graph()
    model = to_torch(graph).eval()
    names = [name for name, _ in model.named_children()]
    assert names == [layer.name for layer in graph.layers if layer.op not in ("input", "softmax")]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    assert not torch.allclose(out.sum(1), torch.ones(2))  # logits, not probabilities


def _features_and_head(model):
    """Split the training module at flatten: the conv stack and the FC stack."""
    children = list(model.named_children())
    cut = [name for name, _ in children].index("flatten")
    conv = torch.nn.Sequential(*[m for _, m in children[:cut]])
    head = torch.nn.Sequential(*[m for _, m in children[cut + 1:]])
    return conv, head


def _unfold_check(model, x, k):
    """Every score-map position equals the FC stack on the matching k x k window of the last map."""
    dense = model.dense()
    conv, head = _features_and_head(model)
    with torch.no_grad():
        scores = dense(x)
        feats = conv(x)
        cols = F.unfold(feats, k)  # (N, C*kh*kw, L): channel-major, as flatten reads a map
        n, _, positions = cols.shape
        windows = head(cols.transpose(1, 2).reshape(n * positions, -1))
    expected = windows.reshape(n, positions, -1).transpose(1, 2).reshape(scores.shape)
    assert scores.shape[2:] == (feats.shape[2] - k[0] + 1, feats.shape[3] - k[1] + 1)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    return scores


@pytest.mark.parametrize("text, kernel, larger", [(SMALL, (4, 4), (56, 72)), (WIDE, (3, 4), (40, 41))])
def test_dense_form(text, kernel, larger):
    graph = _graph(text)
    dense_graph = vggspec.fully_conv(graph)
    first = next(layer for layer in dense_graph.layers if layer.attrs.get("from_fc"))
    assert vggspec.graph.kernel_hw(first) == kernel  # derived from the graph, checked here
    model = to_torch(graph, seed=1).eval()
    c, h, w = graph.meta.input_shape
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        torch.testing.assert_close(model.dense()(x)[:, :, 0, 0], model(x), rtol=1e-5, atol=1e-6)
    scores = _unfold_check(model, torch.randn(2, c, *larger), kernel)
    assert scores.shape[1] == graph.meta.classes and scores.shape[2] * scores.shape[3] > 1
    dense = to_torch(graph, seed=1, dense=True)
    assert type(dense) is load_module_class(graph, dense=True)
    assert dense.training  # dense() keeps the mode of the module it came from


def test_generated_file_runs_where_vggspec_is_not_importable(tmp_path):
    (tmp_path / "small_net.py").write_text(render_source(_graph()))
    code = textwrap.dedent(
        """
        import sys
        class _NoVggspec:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "vggspec":
                    raise ModuleNotFoundError("No module named 'vggspec' (blocked by the test)")
        sys.meta_path.insert(0, _NoVggspec())
        try:
            import vggspec  # noqa: F401
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit("vggspec is importable")
        sys.path.insert(0, ".")
        import torch
        from small_net import SmallNet, SmallNetDense
        torch.manual_seed(0)
        model = SmallNet().eval()
        with torch.no_grad():
            x = torch.randn(2, 3, 32, 32)
            logits, scores = model(x), model.dense()(torch.randn(1, 3, 64, 48))
        assert logits.shape == (2, 5), logits.shape
        assert scores.shape == (1, 5, 5, 3), scores.shape
        assert isinstance(model.dense(), SmallNetDense)
        assert not [m for m in sys.modules if m.startswith("vggspec")]
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


TORCHVISION = ["vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn"]


@pytest.mark.parametrize("arch", TORCHVISION)
def test_matches_torchvision(arch):
    """torchvision with seeded random weights vs the generated module with the imported weights."""
    torchvision = pytest.importorskip("torchvision")
    from vggspec.weights.torchvision import from_torchvision, spec_for

    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    with torch.no_grad():  # batch norm's fresh statistics are the identity: make them count
        for module in reference.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    spec, sets = spec_for(arch)
    graph = vggspec.load_spec(spec, sets)
    model = to_torch(graph, weights=from_torchvision(graph, reference.state_dict())).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference(x), model(x)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-5, error
    if arch == "vgg16":  # the paper's dense evaluation of D at 256: a 2 x 2 score map of 7 x 7 windows
        scores = _unfold_check(model, torch.randn(1, 3, 256, 256), (7, 7))
        assert scores.shape == (1, 1000, 2, 2)


@pytest.mark.parametrize("size", [5, 4, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_generated_lrn_computes_torchs_local_response_norm(size, channels_last):
    """The generated LRN (a band convolution, for speed) against torch's own nn.LocalResponseNorm: values and
    gradients, odd and even windows, either memory layout, channels fewer than the window at the edges."""
    module = load_module_class(_graph(SMALL))
    lrn = sys.modules[module.__module__].LocalResponseNorm(size, alpha=0.33, beta=0.75, k=2.0)
    reference = torch.nn.LocalResponseNorm(size, alpha=0.33, beta=0.75, k=2.0)
    x = torch.randn(3, 7, 9, 11, dtype=torch.float64) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (lrn(ours) * torch.arange(11.0, dtype=torch.float64)).sum().backward()
    (reference(theirs) * torch.arange(11.0, dtype=torch.float64)).sum().backward()
    assert torch.allclose(lrn(x), reference(x), rtol=1e-12, atol=1e-12)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-10, atol=1e-12)


def test_lrn_class_only_where_the_spec_has_an_lrn():
    assert "class LocalResponseNorm" in render_source(vggspec.load_spec("A-LRN"))
    assert "LocalResponseNorm" not in render_source(vggspec.load_spec("A"))
