"""The ONNX backend against torch, on onnxruntime's CPU provider."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import vggspec
from vggspec.backends import onnx as onnx_backend
from vggspec.errors import DataError, VggspecError, WeightsError
from vggspec.graph import Preprocessing, kernel_hw
from vggspec.weights import param_shapes, to_dense

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

SMALL = """name: small
input: 32x32x3
classes: 7
norm: batch
conv3-8 LRN maxpool conv3-16 conv1-16 maxpool
FC-32 FC-24 FC-7 soft-max
"""
# Five stages to a 7 x 7 map at 224, as in the paper, so fc6 becomes a 7 x 7 convolution.
DENSE = """name: dense224
input: 224x224x3
classes: 6
conv3-4 maxpool conv3-8 maxpool conv3-8 maxpool conv3-16 maxpool conv3-16 maxpool
FC-32 FC-32 FC-6 soft-max
"""


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_weights(graph: vggspec.LayerGraph, seed: int = 0) -> dict[str, np.ndarray]:
    """He-scaled weights with non-trivial biases and bn statistics, so the logits spread (unlike paper init)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in param_shapes(graph).items():
        name = key.rsplit(".", 1)[1]
        if name == "num_batches_tracked":
            out[key] = np.zeros((), np.int64)
        elif name == "weight" and len(shape) > 1:  # float32 draws: config D's 138M take a second, not five
            out[key] = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif name in ("weight", "running_var") and key.startswith("bn"):
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            out[key] = rng.normal(0, 0.1, shape).astype(np.float32)
    return out


def reference(graph: vggspec.LayerGraph, tensors: dict[str, np.ndarray]) -> torch.nn.Module:
    """An independent torch implementation of a (standard or dense) graph, built in the test."""
    nn = torch.nn
    mods: list[torch.nn.Module] = []
    for layer in graph.layers:
        a, c_in = layer.attrs, layer.in_shape[0]
        if layer.op == "conv":
            mods.append(nn.Conv2d(c_in, a["out_channels"], kernel_hw(layer), a["stride"], a["padding"]))
        elif layer.op == "bn":
            mods.append(nn.BatchNorm2d(c_in, eps=a["eps"]))
        elif layer.op == "lrn":
            mods.append(nn.LocalResponseNorm(a["size"], a["alpha"], a["beta"], a["k"]))
        elif layer.op == "maxpool":
            mods.append(nn.MaxPool2d(a["kernel"], a["stride"]))
        elif layer.op == "fc":
            mods.append(nn.Linear(c_in, a["out_features"]))
        elif layer.op in ("relu", "flatten", "dropout", "softmax"):
            mods.append({"relu": nn.ReLU(), "flatten": nn.Flatten(), "dropout": nn.Dropout(a.get("p", 0)),
                         "softmax": nn.Softmax(1)}[layer.op])
        elif layer.op == "mean":
            mods.append(_Mean())
        else:
            continue
        mods[-1]._vgg_name = layer.name  # type: ignore[attr-defined]
    for m in mods:
        for key, param in m.state_dict().items():
            param.copy_(torch.from_numpy(np.asarray(tensors[f"{m._vgg_name}.{key}"])))
    return nn.Sequential(*mods).eval().double()


class _Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def run_torch(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(x).double()).numpy()


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto | Path, x: np.ndarray, name: str = "input") -> list[np.ndarray]:
    return session(model).run(None, {name: x})


def images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, h, w)).astype(np.float32)


@pytest.fixture(scope="module")
def small():
    graph = vggspec.loads_spec(SMALL)
    return graph, random_weights(graph)


@pytest.fixture(scope="module")
def dense_spec():
    graph = vggspec.loads_spec(DENSE)
    return graph, random_weights(graph, 1)


# --- the standard graph -----------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_standard_matches_torch(small, batch):
    graph, w = small
    model = vggspec.export_onnx(graph, weights=w, scores=True)
    x = images(batch, 32, 32, batch)
    probs, scores = run(model, x)
    ref_logits = run_torch(reference(graph, w)[:-1], x)
    ref = run_torch(reference(graph, w), x)
    assert probs.shape == (batch, 7) and scores.shape == (batch, 7, 1, 1)
    assert rel_err(probs, ref) < 1e-5
    assert rel_err(scores[:, :, 0, 0], ref_logits) < 1e-5
    assert ref.max() > 0.3  # the weights give a confident, meaningful output, not a uniform one


def test_standard_matches_to_torch(small):
    graph, w = small
    try:
        module = vggspec.to_torch(graph, weights=w).eval()
    except ImportError as exc:  # backends/torch.py is being written alongside
        pytest.skip(f"vggspec.to_torch unavailable: {exc}")
    x = images(3, 32, 32)
    with torch.no_grad():
        ref = torch.softmax(module(torch.from_numpy(x)), 1).numpy()
    assert rel_err(run(vggspec.export_onnx(graph, weights=w), x)[0], ref) < 1e-5


def test_names_follow_the_graph(small):
    graph, w = small
    model = vggspec.export_onnx(graph, weights=w)
    nodes = {n.name: n for n in model.graph.node}
    inits = {t.name for t in model.graph.initializer}
    assert {"conv1_1", "bn1_1", "relu1_1", "norm1", "pool1", "flatten", "fc3", "relu3", "fc5", "prob"} <= set(nodes)
    ops = {name: nodes[name].op_type for name in ("fc3", "norm1", "bn1_1")}
    assert ops == {"fc3": "Gemm", "norm1": "LRN", "bn1_1": "BatchNormalization"}
    assert not any(n.op_type == "Dropout" for n in model.graph.node)
    assert {"conv1_1.weight", "conv1_1.bias", "bn1_1.running_var", "fc3.weight"} <= inits
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["probs"]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, 32, 32]
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.slow
def test_full_d_matches_torchvision(tmp_path):
    """Config D (138M parameters) against torchvision's vgg16 with the same weights, loaded by layer order."""
    tv = pytest.importorskip("torchvision")
    graph = vggspec.load_spec("D")
    w = random_weights(graph, 3)
    out = tmp_path / "d.onnx"
    vggspec.export_onnx(graph, out, weights=w, scores=True)
    with torch.device("meta"):  # skip torchvision's own initialisation: every tensor is overwritten below
        net = tv.models.vgg16(weights=None)
    net = net.to_empty(device="cpu").eval()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    fcs = [m for m in net.classifier if isinstance(m, torch.nn.Linear)]
    names = [layer.name for layer in graph.layers if layer.op in ("conv", "fc")]
    with torch.no_grad():
        for m, name in zip(convs + fcs, names, strict=True):
            m.weight.copy_(torch.from_numpy(w[f"{name}.weight"]))
            m.bias.copy_(torch.from_numpy(w[f"{name}.bias"]))
        x = images(1, 224, 224)
        # float64 reference: the error measured is onnxruntime's alone, not the sum of two float32 errors
        logits = net.double()(torch.from_numpy(x).double()).numpy()
    probs, scores = run(out, x)
    assert out.stat().st_size > 138_357_544 * 4
    out.unlink()  # pytest keeps the last runs' tmp folders: do not leave 550 MB behind each time
    ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    errs = rel_err(probs, ref), rel_err(scores[:, :, 0, 0], logits)
    print(f"\nD vs torchvision vgg16 (float64): relative error of probs {errs[0]:.2e}, of logits {errs[1]:.2e}")
    assert max(errs) < 1e-5


# --- dense evaluation -------------------------------------------------------------------------

@pytest.mark.parametrize("hw", [(224, 224), (256, 256), (288, 352), (512, 512)])
def test_fully_conv_matches_dense_reference(dense_spec, hw):
    graph, w = dense_spec
    model = vggspec.export_onnx(graph, weights=w, fully_conv=True, scores=True)
    dense = vggspec.fully_conv(graph, hw)
    x = images(1 if hw[0] > 300 else 2, *hw, seed=hw[1])
    probs, scores = run(model, x)
    ref_module = reference(dense, to_dense(dense, w))
    ref_scores = run_torch(ref_module[:-2], x)  # up to fc8: the class score map
    assert scores.shape == (x.shape[0], 6, *dense.layers[-3].out_shape[1:]) == ref_scores.shape
    assert rel_err(scores, ref_scores) < 1e-5
    assert rel_err(probs, run_torch(ref_module, x)) < 1e-5


def test_fully_conv_matches_to_torch_dense(dense_spec):
    graph, w = dense_spec
    try:
        module = vggspec.to_torch(graph, weights=w, dense=True).eval()
    except ImportError as exc:
        pytest.skip(f"vggspec.to_torch unavailable: {exc}")
    x = images(1, 288, 352)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    scores = run(vggspec.export_onnx(graph, weights=w, fully_conv=True, scores=True), x)[1]
    assert rel_err(scores, ref) < 1e-5


def test_fully_conv_at_spec_size_equals_standard(dense_spec):
    graph, w = dense_spec
    x = images(2, 224, 224)
    standard = run(vggspec.export_onnx(graph, weights=w), x)[0]
    dense = run(vggspec.export_onnx(graph, weights=w, fully_conv=True), x)[0]
    assert rel_err(dense, standard) < 1e-5


def test_fully_conv_dims_are_dynamic(dense_spec):
    graph, w = dense_spec
    model = vggspec.export_onnx(graph, weights=w, fully_conv=True, scores=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    assert any(n.op_type in ("GlobalAveragePool", "ReduceMean") for n in model.graph.node)
    assert {n.name for n in model.graph.node} >= {"fc6", "fc7", "fc8", "mean", "prob"}
    assert [d for d in model.graph.initializer if d.name == "fc6.weight"][0].dims == [32, 16, 7, 7]


# --- flip, scores -------------------------------------------------------------------------------

@pytest.mark.parametrize("dense,hw", [(False, (32, 32)), (True, (40, 56))])
def test_flip_is_average_of_two_runs(small, dense, hw):
    graph, w = small
    plain = vggspec.export_onnx(graph, weights=w, fully_conv=dense, scores=True)
    flipped = vggspec.export_onnx(graph, weights=w, fully_conv=dense, flip=True, scores=True)
    x = images(3, *hw)
    p1, s1 = run(plain, x)
    p2, _ = run(plain, np.ascontiguousarray(x[..., ::-1]))
    probs, scores = run(flipped, x)
    assert rel_err(probs, (p1 + p2) / 2) < 1e-5
    assert np.allclose(scores, s1, rtol=1e-5, atol=1e-6)  # the unflipped image's scores
    assert np.abs(p1 - p2).max() > 1e-3  # the flip changes the output, so the test means something


# --- precision --------------------------------------------------------------------------------

def test_fp16_within_1e_2(small):
    graph, w = small
    x = images(3, 40, 48)
    ref, ref_scores = run(vggspec.export_onnx(graph, weights=w, fully_conv=True, scores=True), x)
    model = vggspec.export_onnx(graph, weights=w, fully_conv=True, precision="fp16", scores=True)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in model.graph.initializer if t.name.endswith(".weight")} == {onnx.TensorProto.FLOAT16}
    probs, scores = run(model, x)
    err = float(np.abs(probs - ref).max())
    print(f"\nfp16 vs fp32: max abs error of probs {err:.2e}, score map rel error {rel_err(scores, ref_scores):.2e}")
    assert err < 1e-2 and rel_err(scores, ref_scores) < 1e-2
    assert 0 < rel_err(scores, ref_scores)  # it did compute in half precision


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 52)) -> list[np.ndarray]:
    """Smooth colour blobs plus noise, in varied sizes: images with structure, not white noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = size[0] + i % 5, size[1] - i % 7
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        waves = [np.sin(rng.uniform(1, 9) * xx + rng.uniform(0, 6) * yy + rng.uniform(0, 6)) for _ in range(3)]
        base = np.stack(waves, -1)
        img = np.clip((base * 0.5 + 0.5) * 255 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.png")
        out.append(img)
    return out


def test_int8_agrees_with_fp32(tmp_path, small):
    from vggspec.backends.onnx_quant import Feed, calibration_inputs

    graph, w = small
    write_images(tmp_path / "cal", 24, seed=1)
    write_images(tmp_path / "test", 64, seed=2)
    out = tmp_path / "int8.onnx"
    model = vggspec.export_onnx(graph, out, weights=w, precision="int8", calibration=tmp_path / "cal")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("conv1_1.weight")]
    assert dq and any(a.name == "axis" for a in dq[0].attribute)  # per-channel weights
    fp32 = vggspec.export_onnx(graph, weights=w)
    c, h, wd = graph.meta.input_shape
    feed = Feed(c, (h, wd), graph.meta.preprocessing)
    x = np.concatenate(list(calibration_inputs(feed, sorted((tmp_path / "test").iterdir()))))
    ref = run(fp32, x)[0]
    probs = run(out, x)[0]
    agree = float((probs.argmax(1) == ref.argmax(1)).mean())
    print(f"\nint8 vs fp32 on 64 images: top-1 agreement {agree:.1%}, max prob diff {np.abs(probs - ref).max():.3f}")
    assert agree >= 0.85
    assert dict_of(model)["vggspec.precision"] == "int8"


def test_int8_with_embedded_preprocessing(tmp_path, small):
    graph, w = small
    write_images(tmp_path / "cal", 6, seed=3)
    model = vggspec.export_onnx(graph, weights=w, precision="int8", calibration=tmp_path / "cal",
                                embed_preprocessing=True, fully_conv=True, flip=True)
    image = np.random.default_rng(0).integers(0, 256, (2, 36, 40, 3), dtype=np.uint8)
    assert run(model, image, "image")[0].shape == (2, 7)
    onnx.checker.check_model(model, full_check=True)


# --- embedded preprocessing, metadata ------------------------------------------------------------

def dict_of(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_embedded_preprocessing(small, order):
    graph, w = small
    pre = Preprocessing(1 / 255, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), order)
    model = vggspec.export_onnx(graph, weights=w, embed_preprocessing=True, preprocessing=pre)
    vi = model.graph.input[0]
    assert vi.name == "image" and vi.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] == ["N", 32, 32, 3]
    image = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    rgb = image.astype(np.float32)[..., ::-1] if order == "BGR" else image.astype(np.float32)
    x = ((rgb / 255 - np.array(pre.mean, np.float32)) / np.array(pre.std, np.float32)).transpose(0, 3, 1, 2)
    expected = run(vggspec.export_onnx(graph, weights=w), np.ascontiguousarray(x, np.float32))[0]
    assert rel_err(run(model, image, "image")[0], expected) < 1e-5
    assert dict_of(model)["vggspec.embedded_preprocessing"] == "true"


def test_metadata_contract(small):
    graph, w = small
    labels = [f"class {i}" for i in range(7)]
    model = vggspec.export_onnx(graph, weights=w, fully_conv=True, flip=True, labels=labels)
    meta = dict_of(model)
    assert meta["vggspec.version"] == vggspec.__version__ and meta["vggspec.name"] == "small"
    assert meta["vggspec.spec"] == SMALL and meta["vggspec.classes"] == "7"
    assert json.loads(meta["vggspec.input_size"]) == [32, 32] and meta["vggspec.channels"] == "3"
    assert json.loads(meta["vggspec.preprocessing"]) == graph.meta.preprocessing.to_dict()
    assert set(json.loads(meta["vggspec.preprocessing"])) == {"scale", "mean", "std", "channel_order", "layout"}
    assert json.loads(meta["vggspec.labels"]) == labels
    assert (meta["vggspec.fully_conv"], meta["vggspec.flip"], meta["vggspec.scores"]) == ("true", "true", "false")
    assert meta["vggspec.embedded_preprocessing"] == "false" and meta["vggspec.precision"] == "fp32"
    assert model.producer_name == "vggspec" and model.doc_string and model.model_version >= 1
    assert "vggspec.labels" not in dict_of(vggspec.export_onnx(graph, weights=w))


# --- writing, errors ----------------------------------------------------------------------------

def test_write_is_checked_and_leaves_nothing_else(tmp_path, small):
    graph, w = small
    out = tmp_path / "m.onnx"
    vggspec.export_onnx(graph, out, weights=w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    onnx.checker.check_model(str(out), full_check=True)


def test_external_data_when_large(tmp_path, small, monkeypatch):
    graph, w = small
    from vggspec.backends import onnx_stream

    for module in (onnx_backend, onnx_stream):  # pretend the weights pass 2 GB
        monkeypatch.setattr(module, "EXTERNAL_DATA_BYTES", 0)
    in_memory = vggspec.export_onnx(graph, weights=w)  # checked through a temporary copy on disk
    assert in_memory.graph.initializer[0].raw_data and list(tmp_path.iterdir()) == []
    out = tmp_path / "big.onnx"
    vggspec.export_onnx(graph, out, weights=w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    x = images(2, 32, 32)
    monkeypatch.undo()
    assert rel_err(run(out, x)[0], run(vggspec.export_onnx(graph, weights=w), x)[0]) < 1e-6


def _bad_weights(graph, w):
    wrong_shape = dict(w, **{"conv2_1.weight": np.zeros((16, 8, 5, 5), np.float32)})
    missing = {k: v for k, v in w.items() if k != "fc4.bias"}
    extra = dict(w, **{"fc6.weight": w["fc5.weight"]})
    return [(wrong_shape, "conv2_1.weight"), (missing, "fc4.bias"), (extra, "fc6.weight")]


def test_bad_weights_name_the_first_mismatch_and_write_nothing(tmp_path, small):
    graph, w = small
    for bad, name in _bad_weights(graph, w):
        with pytest.raises(WeightsError, match=name.replace(".", r"\.")):
            vggspec.export_onnx(graph, tmp_path / "m.onnx", weights=bad)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,err,match", [
    ({"precision": "int4"}, VggspecError, "unknown precision"),
    ({"precision": "int8"}, VggspecError, "calibration"),
    ({"precision": "int8", "calibration": "missing"}, DataError, "does not exist"),
    ({"precision": "int8", "calibration": "empty"}, DataError, "no images"),
    ({"precision": "int8", "calibration": "junk"}, DataError, "not an image"),
    ({"calibration": "empty"}, VggspecError, "only used by int8"),
    ({"opset": 9}, VggspecError, "opset 9"),
    ({"labels": ["a", "b"]}, VggspecError, "2 labels for 7 classes"),
])
def test_bad_options_write_nothing(tmp_path, small, kwargs, err, match):
    graph, w = small
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"not a png")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if "calibration" in kwargs:
        kwargs = dict(kwargs, calibration=tmp_path / kwargs["calibration"])
    with pytest.raises(err, match=match):
        vggspec.export_onnx(graph, out_dir / "m.onnx", weights=w, **kwargs)
    assert list(out_dir.iterdir()) == []


def test_missing_output_folder(tmp_path, small):
    graph, w = small
    with pytest.raises(VggspecError, match="does not exist"):
        vggspec.export_onnx(graph, tmp_path / "nope" / "m.onnx", weights=w)
    assert not (tmp_path / "nope").exists()


def test_export_without_torch(run_without_torch, tmp_path):
    write_images(tmp_path / "cal", 4, seed=5)
    code = f"""
    import sys, onnx, numpy as np, onnxruntime as ort, vggspec
    g = vggspec.loads_spec({SMALL!r})
    out = {str(tmp_path)!r}
    vggspec.export_onnx(g, out + "/a.onnx", fully_conv=True, flip=True, scores=True, embed_preprocessing=True)
    vggspec.export_onnx(g, out + "/b.onnx", precision="fp16")
    vggspec.export_onnx(g, out + "/c.onnx", precision="int8", calibration=out + "/cal")
    s = ort.InferenceSession(out + "/a.onnx", providers=["CPUExecutionProvider"])
    print(s.run(None, {{"image": np.zeros((1, 40, 48, 3), np.uint8)}})[1].shape)
    assert "torch" not in sys.modules
    """
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert "(1, 7, 3, 5)" in result.stdout  # 40x48 -> 10x12 after two pools -> 8x8 fc3 kernel
    assert {"a.onnx", "b.onnx", "c.onnx"} <= {p.name for p in tmp_path.iterdir()}
