"""vggspec.runtime on hand-built ONNX models: preprocessing, sessions, protocols against numpy references, fusion.

The models here are Conv(3x3, valid) -> GlobalAveragePool -> Softmax, small enough that a numpy forward
pass is the reference for every protocol.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from vggspec.errors import DataError, ModelError
from vggspec.imaging import to_array
from vggspec.runtime import (
    Member,
    Model,
    Overrides,
    Protocol,
    Runner,
    crop_positions,
    fuse,
    grid_crops,
    load,
    load_image,
    normalise,
    rescale,
)
from vggspec.runtime.session import Preprocessing, create_session

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
CLASSES = 4


# ---------------------------------------------------------------- models built by hand


def conv_model(path: Path, hw=(8, 8), fully_conv=True, seed=0, meta=True, flip=False, channels=3, softmax=True,
               batch: int | str = "N", extra_meta=None) -> Path:
    """Conv 3x3 (valid) -> GAP -> Flatten -> Softmax, with a `scores` output and the vggspec metadata."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(CLASSES, channels, 3, 3)) * 0.8).astype(np.float32)
    b = rng.normal(size=CLASSES).astype(np.float32)
    dims = [batch, channels, "H", "W"] if fully_conv else [batch, channels, *hw]
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["scores"], kernel_shape=[3, 3]),
             helper.make_node("GlobalAveragePool", ["scores"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Softmax", ["flat"], ["probs"], axis=1) if softmax
             else helper.make_node("Identity", ["flat"], ["probs"])]
    outputs = [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, CLASSES]),
               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, CLASSES, "h", "w"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              outputs, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    if meta:
        props = {
            "vggspec.version": "0.1.0", "vggspec.name": f"conv{seed}", "vggspec.classes": str(CLASSES),
            "vggspec.input_size": json.dumps(list(hw)), "vggspec.channels": str(channels),
            "vggspec.preprocessing": json.dumps({"scale": 1 / 255, "mean": list(MEAN[:channels]),
                                                 "std": list(STD[:channels]), "channel_order": "RGB",
                                                 "layout": "NCHW"}),
            "vggspec.fully_conv": str(fully_conv).lower(), "vggspec.flip": str(flip).lower(),
            "vggspec.embedded_preprocessing": "false", "vggspec.scores": "true", "vggspec.precision": "fp32",
            "vggspec.labels": json.dumps(["cat", "dog", "eel", "fox"]), **(extra_meta or {}),
        }
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def ref_forward(model_path: Path, pixels: np.ndarray) -> np.ndarray:
    """numpy reference of conv_model on one uint8 H x W x 3 image: posteriors (CLASSES,)."""
    m = onnx.load(str(model_path))
    init = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    x = ((pixels.astype(np.float64) / 255 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    w, b = init["W"].astype(np.float64), init["B"].astype(np.float64)
    h, wd = x.shape[1] - 2, x.shape[2] - 2
    out = np.zeros((CLASSES, h, wd))
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("kc,chw->khw", w[:, :, dy, dx], x[:, dy:dy + h, dx:dx + wd])
    s = out.mean(axis=(1, 2)) + b
    e = np.exp(s - s.max())
    return e / e.sum()


def ref_positions(side: int, crop: int) -> list[int]:
    return [int(round(i * (side - crop) / 4)) for i in range(5)]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime")


@pytest.fixture(scope="module")
def models(tmp) -> dict[str, Path]:
    return {
        "dense": conv_model(tmp / "dense.onnx"),
        "standard": conv_model(tmp / "standard.onnx", fully_conv=False),
        "dense2": conv_model(tmp / "dense2.onnx", seed=1),
        "flip": conv_model(tmp / "flip.onnx", flip=True),
        "bare": conv_model(tmp / "bare.onnx", meta=False, softmax=False),
        "batch1": conv_model(tmp / "batch1.onnx", fully_conv=False, batch=1),
    }


@pytest.fixture(scope="module")
def image(tmp) -> Path:
    rng = np.random.default_rng(7)
    path = tmp / "img.png"
    Image.fromarray((rng.random((13, 19, 3)) * 255).astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("side,crop", [(224, 224), (256, 224), (384, 224), (10, 8), (9, 8), (30, 7)])
def test_crop_positions_match_reference(side, crop):
    assert crop_positions(side, crop) == ref_positions(side, crop)
    assert crop_positions(side, crop)[0] == 0 and crop_positions(side, crop)[-1] == side - crop


def test_grid_crops_are_the_5x5_grid_then_mirrors():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 255, (11, 14, 3), dtype=np.uint8)
    crops = grid_crops(px, (8, 8))
    assert crops.shape == (50, 8, 8, 3)
    ref = [px[y:y + 8, x:x + 8] for y in ref_positions(11, 8) for x in ref_positions(14, 8)]
    np.testing.assert_array_equal(crops[:25], np.stack(ref))
    np.testing.assert_array_equal(crops[25:], np.stack([c[:, ::-1] for c in ref]))
    assert grid_crops(px, (8, 8), flip=False).shape == (25, 8, 8, 3)


def test_normalise_matches_reference_and_channel_order():
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 255, (2, 4, 5, 3), dtype=np.uint8)
    prep = Preprocessing(1 / 255, MEAN, STD)
    ref = ((batch / 255 - np.array(MEAN)) / np.array(STD)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(normalise(batch, prep), ref, atol=1e-5)
    bgr = normalise(batch, Preprocessing(1.0, (1, 2, 3), (1, 1, 1), "BGR"))
    np.testing.assert_allclose(bgr[:, 0], batch[..., 2] - 1.0)
    assert normalise(batch, Preprocessing(layout="NHWC")).shape == (2, 4, 5, 3)


def test_rescale_is_isotropic_smallest_side_q():
    img = Image.new("RGB", (300, 200))
    assert rescale(img, 100).size == (150, 100)
    assert rescale(Image.new("RGB", (200, 300)), 256).size == (256, 384)
    assert rescale(img, None).size == (300, 200)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16", "I"])
def test_image_modes_convert(tmp, mode):
    src = Image.new("RGB", (6, 4), (200, 100, 50))
    if mode in ("I;16", "I"):
        img = Image.fromarray(np.full((4, 6), 65535, np.uint16 if mode == "I;16" else np.int32))
    else:
        img = src.convert(mode)
    path = tmp / f"mode_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png' if mode != 'I' else 'tif'}"
    img.save(path)
    rgb, grey = load_image(path, 3), load_image(path, 1)
    assert (rgb.mode, rgb.size, grey.mode) == ("RGB", (6, 4), "L")
    if mode.startswith("I"):
        assert to_array(grey).min() == 255  # 16-bit white is white, not clipped garbage


def test_exif_orientation_applied(tmp):
    img = Image.new("RGB", (20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp / "exif.jpg", exif=exif)
    assert load_image(tmp / "exif.jpg").size == (10, 20)


def _bad_files(tmp: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    bad = tmp / "bad"
    bad.mkdir(exist_ok=True)
    files = {"empty": b"", "not an image": b"hello, I am text\n", "truncated": data[: len(data) // 2]}
    corrupt = bytearray(data)
    at = corrupt.find(b"IDAT")
    corrupt[at + 30:at + 60] = b"\xff" * 30  # inside IDAT: the zlib stream is broken
    files["corrupt"] = bytes(corrupt)
    header = bytearray(data)
    header[16:24] = b"\xff" * 8  # IHDR's width and height: a PNG Pillow cannot identify
    files["corrupt header"] = bytes(header)
    out = {}
    for kind, content in files.items():
        out[kind] = bad / f"{kind.replace(' ', '_')}.png"
        out[kind].write_bytes(content)
    out["no such file"] = bad / "missing.png"
    out["folder"] = bad
    return out


def test_every_bad_file_kind_is_a_data_error_naming_file(tmp, image):
    big = tmp / "big.png"
    Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)).save(big)
    reasons = {"empty": "empty", "not an image": "not an image", "truncated": "truncated",
               "corrupt": "corrupt image (broken",
               "corrupt header": "corrupt image (the header",
               "no such file": "no such file", "folder": "folder"}
    for kind, path in _bad_files(tmp, big).items():
        with pytest.raises(DataError) as err:
            load_image(path)
        assert err.value.path == str(path)
        assert reasons[kind] in err.value.message, (kind, err.value.message)


# ---------------------------------------------------------------- sessions and metadata


def test_session_reports_provider_and_reads_metadata(models):
    m = load(models["dense"], device="auto", threads=1)
    assert m.provider == "CPUExecutionProvider"
    assert m.session.get_session_options().intra_op_num_threads == 1
    info = m.info
    assert (info.input_size, info.channels, info.fully_conv, info.classes) == ((8, 8), 3, True, CLASSES)
    assert info.labels == ("cat", "dog", "eel", "fox") and info.preprocessing.mean == MEAN
    assert info.outputs == ("probs", "scores") and info.batch is None


def test_explicit_cuda_that_falls_back_is_an_error(models, monkeypatch):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelError, match="CUDAExecutionProvider"):
            create_session(models["dense"], device="cuda")
        # Pretend the GPU build is installed: onnxruntime then falls back to the CPU silently.
        monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
        with pytest.raises(ModelError, match="fell back"):
            create_session(models["dense"], device="cuda")


def test_gpu_provider_that_throws_auto_falls_back_explicit_fails(models, monkeypatch):
    import onnxruntime as ort

    from vggspec.runtime import session as sess

    real = sess._new_session

    def flaky(path, providers, threads):
        if providers[0] != "CPUExecutionProvider":
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real(path, providers, threads)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sess, "_new_session", flaky)
    assert create_session(models["dense"], device="auto")[1] == "CPUExecutionProvider"
    with pytest.raises(ModelError, match="CUDAExecutionProvider failed to initialise .*libcudnn"):
        create_session(models["dense"], device="cuda")


class _FakeSession:
    def __init__(self, provider):
        self.provider = provider

    def get_providers(self):
        return [self.provider, "CPUExecutionProvider"]


def _fake_gpu(monkeypatch, behaviour):
    """onnxruntime with TensorRT and CUDA 'available'; behaviour(providers) says what a session gets."""
    import onnxruntime as ort

    from vggspec.runtime import session as sess

    calls = []

    def new_session(path, providers, threads):
        calls.append(providers)
        if providers == ["CPUExecutionProvider"]:
            return _FakeSession("CPUExecutionProvider")
        return _FakeSession(behaviour(providers))

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(sess, "_new_session", new_session)
    return calls


def test_auto_moves_from_a_broken_tensorrt_to_tuned_cuda(models, monkeypatch):
    def behaviour(providers):
        if providers[0] == "TensorrtExecutionProvider":
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        return providers[0][0]  # CUDA with its options

    calls = _fake_gpu(monkeypatch, behaviour)
    assert create_session(models["dense"], device="auto")[1] == "CUDAExecutionProvider"
    assert calls[-1] == [("CUDAExecutionProvider", {"prefer_nhwc": "1"}), "CPUExecutionProvider"]


def test_explicit_tensorrt_that_fails_does_not_settle_for_cuda(models, monkeypatch):
    def behaviour(providers):
        if providers[0] == "TensorrtExecutionProvider":
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        return providers[0][0] if isinstance(providers[0], tuple) else providers[0]

    _fake_gpu(monkeypatch, behaviour)
    with pytest.raises(ModelError, match="TensorrtExecutionProvider failed to initialise .*libnvinfer"):
        create_session(models["dense"], device="tensorrt")


def test_a_build_that_refuses_the_options_gets_plain_cuda(models, monkeypatch):
    # onnxruntime answers an unknown provider option by falling back to the CPU (and printing why).
    calls = _fake_gpu(monkeypatch, lambda ps: "CPUExecutionProvider" if isinstance(ps[0], tuple) else ps[0])
    assert create_session(models["dense"], device="cuda")[1] == "CUDAExecutionProvider"
    assert calls == [[("CUDAExecutionProvider", {"prefer_nhwc": "1"}), "CPUExecutionProvider"],
                     ["CUDAExecutionProvider", "CPUExecutionProvider"]]


def test_onnxruntime_fallback_notices_stay_off_stdout(models, monkeypatch, capsys):
    import onnxruntime as ort

    from vggspec.runtime import session as sess

    real = ort.InferenceSession

    def noisy(*args, **kwargs):
        print("*************** EP Error ***************")
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", noisy)
    sess._new_session(Path(models["dense"]), ["CPUExecutionProvider"], 1)
    assert capsys.readouterr().out == ""


def test_io_binding_path_matches_plain_run(models, image):
    plain, bound = Model(models["dense"], device="cpu"), Model(models["dense"], device="cpu", io_binding=True)
    assert not plain.io_binding and bound.io_binding and bound.ort_device == "cpu"
    x = np.random.default_rng(0).normal(size=(3, 3, 9, 11)).astype(np.float32)
    for a, b in zip(plain.run(x, ["probs", "scores"]), bound.run(x, ["probs", "scores"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fixed_batch_model_runs_in_padded_chunks(models, image):
    m, free = Model(models["batch1"]), Model(models["standard"])
    assert m.info.batch == 1
    x = np.random.default_rng(0).normal(size=(3, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(m.run(x)[0], free.run(x)[0], atol=1e-6)


def test_not_onnx_and_not_image_models_are_model_errors(tmp):
    junk = tmp / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf at all" * 10)
    with pytest.raises(ModelError) as err:
        load(junk)
    assert err.value.path == str(junk) and "ONNX" in err.value.message
    with pytest.raises(ModelError, match="no such file"):
        load(tmp / "nope.onnx")
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "vec",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(tmp / "vec.onnx"))
    with pytest.raises(ModelError, match="not an image tensor"):
        load(tmp / "vec.onnx")


def test_metadata_less_model_needs_and_uses_explicit_values(models, image):
    with pytest.raises(ModelError) as err:
        load(models["bare"])
    assert "--size" in err.value.hint
    bare = load(models["bare"], size=(8, 8), mean=MEAN, std=STD)
    assert not bare.info.has_metadata and bare.info.fully_conv
    ref = Model(models["dense"])
    proto = Protocol("dense", (13,), True)
    a = Runner([Member.of(bare)], [proto]).run(image)[proto]
    b = Runner([Member.of(ref)], [proto]).run(image)[proto]
    np.testing.assert_allclose(a, b, atol=1e-6)  # the bare model ends in logits: soft-maxed by the runtime


# ---------------------------------------------------------------- protocols against numpy


def _ref_dense(model: Path, px: np.ndarray, flip: bool) -> np.ndarray:
    outs = [ref_forward(model, px)] + ([ref_forward(model, px[:, ::-1])] if flip else [])
    return np.mean(outs, axis=0)


def _ref_crops(model: Path, px: np.ndarray, crop: int, flip: bool) -> np.ndarray:
    outs = []
    for y in ref_positions(px.shape[0], crop):
        for x in ref_positions(px.shape[1], crop):
            c = px[y:y + crop, x:x + crop]
            outs.append(ref_forward(model, c))
            if flip:
                outs.append(ref_forward(model, c[:, ::-1]))
    assert len(outs) == (50 if flip else 25)
    return np.mean(outs, axis=0)


def _scaled(image: Path, q: int) -> np.ndarray:
    return to_array(rescale(load_image(image), q))


@pytest.mark.parametrize("flip", [True, False])
def test_protocols_match_numpy_reference(models, image, flip):
    dense, std = Model(models["dense"]), Model(models["standard"])
    scales = (8, 13, 16)
    protos = [Protocol(n, scales, flip) for n in ("dense", "multi-crop", "combined")]
    got = Runner([Member.of(dense, std)], protos).run(image)
    ref_d = np.mean([_ref_dense(models["dense"], _scaled(image, q), flip) for q in scales], axis=0)
    ref_c = np.mean([_ref_crops(models["standard"], _scaled(image, q), 8, flip) for q in scales], axis=0)
    np.testing.assert_allclose(got[protos[0]], ref_d, atol=2e-6)
    np.testing.assert_allclose(got[protos[1]], ref_c, atol=2e-6)
    np.testing.assert_allclose(got[protos[2]], (ref_d + ref_c) / 2, atol=2e-6)
    assert np.ptp(ref_d) > 0.05  # the posteriors are not uniform, so the comparison means something


def test_dense_equals_standard_at_crop_size(models, tmp):
    px = np.random.default_rng(3).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(px).save(tmp / "crop.png")
    d, s = Protocol("dense", (8,), False), Protocol("multi-crop", (8,), False)
    a = Runner([Member.of(Model(models["dense"]))], [d]).run(tmp / "crop.png")[d]
    b = Runner([Member.of(Model(models["standard"]))], [s]).run(tmp / "crop.png")[s]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_in_graph_flip_is_not_flipped_twice(models, image, tmp):
    flip = conv_model(tmp / "flip_a.onnx", flip=True)
    # The hand-built graph does not really flip, so its "flip" output is the unflipped posterior:
    # if the runtime flipped too, the result would be the flipped average instead.
    proto = Protocol("dense", (13,), True)
    got = Runner([Member.of(Model(flip))], [proto]).run(image)[proto]
    np.testing.assert_allclose(got, ref_forward(models["dense"], _scaled(image, 13)), atol=2e-6)


def test_ensemble_averages_members(models, image):
    proto = Protocol("dense", (8, 16), True)
    one = Runner([Member.of(Model(models["dense"]))], [proto]).run(image)[proto]
    two = Runner([Member.of(Model(models["dense2"]))], [proto]).run(image)[proto]
    both = Runner([Member.of(Model(models["dense"])), Member.of(Model(models["dense2"]))], [proto]).run(image)[proto]
    np.testing.assert_allclose(both, (one + two) / 2, atol=1e-9)


def test_protocol_errors(models, tmp):
    std = Member.of(Model(models["standard"]))
    with pytest.raises(ModelError, match="fully convolutional"):
        Runner([std], [Protocol("dense", (8,))])
    with pytest.raises(ModelError, match="smaller than the model's input"):
        Runner([Member.of(Model(models["dense"]))], [Protocol("dense", (4,))])
    tiny = tmp / "tiny.png"
    Image.new("RGB", (5, 12)).save(tiny)
    proto = Protocol("dense", (None,))
    with pytest.raises(DataError, match="too small: 12x5 pixels at its own size"):
        Runner([Member.of(Model(models["dense"]))], [proto]).run(tiny)


# ---------------------------------------------------------------- fusion


def test_fuse_equals_average_of_separate_runs(models, image, tmp):
    out = fuse([models["dense"], models["dense2"]], tmp / "ens.onnx")
    onnx.checker.check_model(str(out))
    ens = Model(out)
    assert ens.info.outputs == ("probs", "scores") and ens.info.name == "conv0+conv1"
    x = np.random.default_rng(4).normal(size=(2, 3, 11, 9)).astype(np.float32)
    ref = (Model(models["dense"]).run(x)[0] + Model(models["dense2"]).run(x)[0]) / 2
    np.testing.assert_allclose(ens.run(x)[0], ref, atol=1e-6)


def test_fuse_refuses_mismatched_members(models, tmp):
    other = conv_model(tmp / "other.onnx", hw=(9, 9), seed=3)
    with pytest.raises(ModelError, match="input_size differs") as err:
        fuse([models["dense"], other], tmp / "bad_ens.onnx")
    assert err.value.path == str(other)
    with pytest.raises(ModelError, match="fully_conv differs"):
        fuse([models["dense"], models["standard"]], tmp / "bad_ens.onnx")
    pre = conv_model(tmp / "pre.onnx", seed=4, extra_meta={"vggspec.preprocessing": json.dumps(
        {"scale": 1, "mean": [1, 2, 3], "std": [1, 1, 1], "channel_order": "BGR", "layout": "NCHW"})})
    with pytest.raises(ModelError, match="preprocessing differs"):
        fuse([models["dense"], pre], tmp / "bad_ens.onnx")
    assert not (tmp / "bad_ens.onnx").exists()


# ---------------------------------------------------------------- import discipline


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(("." * node.level) + (node.module or ""))
    return names


def test_runtime_never_imports_torch_or_compiler_internals():
    root = Path(__file__).resolve().parents[1] / "vggspec"
    for path in (root / "runtime").glob("*.py"):
        for name in _imports(path):
            assert "torch" not in name, (path, name)
            assert not any(part in name for part in ("backends", "graph", "train")), (path, name)
    # The commands may reach the (torch-free) ONNX backend to export a checkpoint's two forms.
    for name in _imports(root / "cli" / "runtime.py"):
        assert "torch" not in name and "train" not in name, name


def test_overrides_empty():
    assert Overrides().empty and not Overrides(size=(8, 8)).empty


def test_list_dataset_class_order(tmp):
    from vggspec.runtime import list_dataset

    root = tmp / "ds"
    for name in ("n02", "n01"):
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"")
    items, names = list_dataset(root, ("tench", "goldfish"))  # WordNet folders, word labels: folder order
    assert names == ["n01", "n02"] and [i for _, i in items] == [0, 1]
    items, names = list_dataset(root, ("n02", "n01"))  # folders named after labels: label order
    assert [i for _, i in items] == [1, 0]
    items, names = list_dataset(root, ("x", "n02", "n01"))  # some of the classes, by name: nothing shifts
    assert [i for _, i in items] == [2, 1]
    with pytest.raises(DataError, match="'n02' is not among"):
        list_dataset(root, ("n01", "other"))
    with pytest.raises(DataError, match="no class folders") as err:
        list_dataset(root / "n01")
    assert "one level too low" in err.value.hint


def _split_folder(root: Path, classes: int = 4, splits=("train", "val", "test")) -> Path:
    for split in splits:
        for c in range(classes):
            (root / split / str(c)).mkdir(parents=True)
            (root / split / str(c) / "x.png").write_bytes(b"")
    return root


def test_folders_that_are_not_the_models_classes_are_refused(tmp_path):
    """The parent of train/val/test, a missing class folder, extra folders: each names both sides and the
    likely cause, unless allow_mismatch (issue 23: 90 % error on the parent folder, exit 0)."""
    from vggspec.runtime import list_dataset

    root = _split_folder(tmp_path / "data")
    labels = ("0", "1", "2", "3")
    with pytest.raises(DataError) as err:  # one level too high
        list_dataset(root, labels, 4)
    assert "3 class folders ('test', 'train', 'val') for a model of 4 classes ('0', '1', '2', '3')" in err.value.message
    assert f"looks one level too high: give --data {root / 'test'}" in err.value.message
    assert "--allow-mismatch" in err.value.hint
    with pytest.raises(DataError, match="one level too high"):  # a model without labels: by count
        list_dataset(root, (), 4)
    items, names = list_dataset(root, labels, 4, allow_mismatch=True)
    assert names == ["test", "train", "val"]
    test = root / "test"
    shutil.rmtree(test / "1")  # positional classes: everything after the gap would shift
    unnamed = tmp_path / "unnamed"
    for c in "acd":
        (unnamed / c).mkdir(parents=True)
        (unnamed / c / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="3 class folders .* for a model of 4 classes; a class folder is missing: "
                                        "classes are numbered by sorted folder name"):
        list_dataset(unnamed, (), 4)
    assert [i for _, i in list_dataset(test, labels, 4)[0]] == [0, 2, 3]  # by name: nothing shifts
    with pytest.raises(DataError, match="'x' is not among its labels; a folder that is not a class"):
        (test / "x").mkdir()
        (test / "x" / "x.png").write_bytes(b"")
        list_dataset(test, labels, 4)
    with pytest.raises(DataError, match="5 class folders .* more than the model's classes"):
        (unnamed / "e").mkdir()
        (unnamed / "e" / "x.png").write_bytes(b"")
        (unnamed / "f").mkdir()
        (unnamed / "f" / "x.png").write_bytes(b"")
        list_dataset(unnamed, (), 4)
    assert len(list_dataset(test, (), 0)[0]) == 4  # a model that does not say its classes: not checked


OWN = {"vggspec.test_scales": "[8, 12, 16]", "vggspec.test_flip": "false",
       "vggspec.training": json.dumps({"scale": [8, 16], "flip": False})}


def test_default_scales_and_flip_are_the_models_own(models, tmp_path):
    from vggspec import export_onnx, load_spec
    from vggspec.runtime import default_flip, default_scales

    own = load(conv_model(tmp_path / "own.onnx", extra_meta=OWN))
    plain, flip_only = load(models["dense"]), load(conv_model(tmp_path / "f.onnx", extra_meta={
        "vggspec.test_flip": "false"}))
    assert default_scales([own]) == (8, 12, 16) and default_flip([own]) is False
    assert default_scales([plain]) == (8,) and default_flip([plain]) is True  # no keys: as before them
    assert default_scales([own, plain]) == (8,)  # not every model states them
    assert default_flip([own, flip_only]) is False and default_flip([own, plain]) is False
    low = load(conv_model(tmp_path / "low.onnx", extra_meta={"vggspec.test_scales": "[4, 12]"}))
    assert default_scales([low]) == (8, 12)  # raised to the input side the model needs
    graph = load_spec("A", ["width=1/16", "input=32x32x3", "classes=4"])
    static = tmp_path / "static.onnx"
    export_onnx(graph, static, fully_conv=True, static_shape=(1, 40, 40), test_scales=(32, 48))
    assert default_scales([load(static)]) == (40,)  # a static model takes its one size


def test_predict_and_eval_say_which_protocol_they_took_from_the_model(tmp_path, image):
    model = conv_model(tmp_path / "own.onnx", extra_meta=OWN)
    note = "own.onnx: testing at the model's own Q=8,12,16 without flip (trained with scale jitter 8:16, no flip)"
    result = _cli("predict", model, image, "--json")
    assert result.exit_code == 0, result.output
    assert note in result.stderr
    out = json.loads(result.stdout)
    assert out["scales"] == [8, 12, 16] and out["flip"] is False
    data = tmp_path / "data"
    for label in ("cat", "dog", "eel", "fox"):
        (data / label).mkdir(parents=True)
        shutil.copy(image, data / label / "a.png")
    result = _cli("eval", model, "--data", data, "--json", "--scales", "12", "--flip")
    assert result.exit_code == 0, result.output
    assert "testing" not in result.stderr  # both given: nothing taken from the model
    assert json.loads(result.stdout)["rows"][0] | {"top1_error": 0, "top5_error": 0} == {
        "protocol": "dense", "scales": [12], "flip": True, "images": 4, "top1_error": 0, "top5_error": 0}
    result = _cli("eval", model, "--data", data, "--json", "--scales", "12")
    assert "own.onnx: testing without flip (trained with scale jitter 8:16, no flip)" in result.stderr
    assert json.loads(result.stdout)["rows"][0]["flip"] is False


def test_eval_refuses_folders_that_are_not_the_models_classes(tmp_path, image, models):
    parent = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog", "eel", "fox"):
            (parent / split / label).mkdir(parents=True)
            shutil.copy(image, parent / split / label / "a.png")
    result = _cli("eval", models["dense"], "--data", parent)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{parent}: error: 2 class folders ('test', 'train') for a model of 4 classes" in result.stderr
    assert f"give --data {parent / 'test'}" in result.stderr and "--allow-mismatch" in result.stderr
    result = _cli("eval", models["dense"], "--data", parent, "--allow-mismatch", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["images"] == 8
    (parent / "test" / "owl").mkdir()
    shutil.copy(image, parent / "test" / "owl" / "a.png")
    result = _cli("eval", models["dense"], "--data", parent / "test")
    assert result.exit_code == 1 and "'owl' is not among its labels" in result.stderr


def test_a_one_cell_score_map_gets_a_note_not_a_picture(tmp_path, image):
    from click.testing import CliRunner

    from vggspec.cli import main

    model = conv_model(tmp_path / "tiny.onnx", hw=(3, 3))  # a 3 x 3 conv: 1 x 2 cells on a 13 x 19 image at Q=3
    result = CliRunner().invoke(main, ["predict", str(model), str(image), "--scales", "3",
                                       "--heatmap", str(tmp_path / "heat")])
    assert result.exit_code == 0, result.output
    assert "no heat map: at Q=3 the score map has 1 x 2 cell(s)" in result.output and "1. " in result.output
    assert not list((tmp_path / "heat").iterdir())


# ---------------------------------------------------------------- outputs against the metadata, limits per image


def _edited(source: Path, path: Path, edit) -> Path:
    """A copy of a conv_model with its graph changed by `edit(model)` (shape inference left to onnxruntime)."""
    model = onnx.load(str(source))
    edit(model)
    onnx.save(model, str(path))
    return path


def _set_output(model, name: str, elem_type: int, dims: list) -> None:
    out = next(o for o in model.graph.output if o.name == name)
    out.CopyFrom(helper.make_tensor_value_info(name, elem_type, dims))


def _cli(*args: str):
    from click.testing import CliRunner

    from vggspec.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_outputs_that_contradict_the_metadata_are_refused_at_load(models, tmp_path):
    three = {"vggspec.classes": "3", "vggspec.labels": json.dumps(["a", "b", "c"])}
    with pytest.raises(ModelError, match="output 'probs' has 4 classes, the metadata says 3"):
        Model(conv_model(tmp_path / "wide.onnx", extra_meta=three))

    def argmax(model):  # class indices where posteriors belong
        model.graph.node[-1].CopyFrom(helper.make_node("ArgMax", ["flat"], ["probs"], axis=1))
        _set_output(model, "probs", TensorProto.INT64, ["N", 1])
    with pytest.raises(ModelError, match=r"output 'probs' is tensor\(int64\); expected float"):
        Model(_edited(models["dense"], tmp_path / "argmax.onnx", argmax))

    with pytest.raises(ModelError, match="output 'scores' has 3 classes, the metadata says 4"):
        Model(_edited(models["dense"], tmp_path / "narrow.onnx", lambda m: _narrow_scores(m, 3)))


def _narrow_scores(model, width: int | str) -> None:
    """The score map sliced to 3 classes beside 4 posteriors; its width declared as `width`."""
    model.graph.node[0].output[0] = "full"
    model.graph.node[1].input[0] = "full"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), n)
                                    for n, v in (("s0", [0]), ("s1", [3]), ("ax", [1]))])
    model.graph.node.append(helper.make_node("Slice", ["full", "s0", "s1", "ax"], ["scores"]))
    _set_output(model, "scores", TensorProto.FLOAT, ["N", width, "h", "w"])


def test_a_dynamic_width_is_checked_on_the_first_run_and_stops_eval(models, tmp_path, image):
    three = {"vggspec.classes": "3", "vggspec.labels": json.dumps(["a", "b", "c"])}
    model = _edited(conv_model(tmp_path / "w.onnx", extra_meta=three), tmp_path / "dyn.onnx",
                    lambda m: _set_output(m, "probs", TensorProto.FLOAT, ["N", "C"]))
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.open(image).save(tmp_path / "data" / name / f"{i}.png")
    result = _cli("eval", model, "--data", tmp_path / "data")
    assert result.exit_code == 1, result.output
    assert "output 'probs' has 4 classes, the metadata says 3" in result.output
    assert result.output.count("error:") == 1 and "internal" not in result.output


def test_members_of_different_widths_are_refused(models, tmp_path, image):
    three = {"vggspec.classes": "3", "vggspec.labels": json.dumps(["a", "b", "c"])}
    other = _edited(conv_model(tmp_path / "w3.onnx", extra_meta=three), tmp_path / "m3.onnx",
                    lambda m: _set_output(m, "probs", TensorProto.FLOAT, ["N", "C"]))
    result = _cli("predict", models["dense"], image, "--ensemble", other)
    assert result.exit_code == 1 and "classes" in result.output and "internal" not in result.output, result.output
    # Without metadata, only the graphs' widths tell: the static one at load, the dynamic one at the first run.
    bare3 = _edited(conv_model(tmp_path / "b3.onnx", meta=False, softmax=False), tmp_path / "bare3.onnx",
                    lambda m: _set_output(m, "probs", TensorProto.FLOAT, ["N", "C"]))
    size = ["--size", "8x8", "--mean", "0.5", "--std", "0.25"]
    result = _cli("predict", models["bare"], image, "--ensemble", bare3, *size)
    assert result.exit_code == 0, result.output  # same widths: fine
    five = _edited(bare3, tmp_path / "bare5.onnx", lambda m: m.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        np.ones((5, 3, 3, 3), np.float32), "W")) or m.graph.initializer[1].CopyFrom(
        numpy_helper.from_array(np.zeros(5, np.float32), "B")))
    result = _cli("predict", models["bare"], image, "--ensemble", five, *size)
    assert result.exit_code == 1 and "disagree on the number of classes" in result.output, result.output
    assert "internal" not in result.output


def test_fuse_refuses_members_of_different_widths(models, tmp_path):
    def five(model):
        model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((5, 3, 3, 3), np.float32), "W"))
        model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "B"))
        _set_output(model, "probs", TensorProto.FLOAT, ["N", "C"])
        _set_output(model, "scores", TensorProto.FLOAT, ["N", "C", "h", "w"])
    wide = _edited(models["dense2"], tmp_path / "five.onnx", five)
    with pytest.raises(ModelError, match="5 classes"):
        fuse([models["dense"], wide], tmp_path / "fused.onnx")
    assert not (tmp_path / "fused.onnx").exists()


def test_heatmap_with_a_narrower_score_map_is_a_clear_error(models, tmp_path, image):
    model = _edited(models["dense"], tmp_path / "slice.onnx", lambda m: _narrow_scores(m, "c"))
    result = _cli("predict", model, image, "--scales", "16", "--heatmap", tmp_path / "heat")
    assert result.exit_code == 1, result.output
    assert "output 'scores' has 3 classes" in result.output and "internal" not in result.output


def test_memory_per_image_counts_the_networks_activations(models, tmp_path, image):
    from vggspec.runtime.memory import floats_per_pixel

    # conv 3 -> 4 channels at stride 1: 7 floats per input pixel at the peak (read without the weights)
    assert floats_per_pixel(models["dense"]) == 7
    strip = tmp_path / "strip.png"  # 1 x 200,000: 51 megapixels at Q=16, under the pixel limit
    Image.new("RGB", (200_000, 1), (9, 9, 9)).save(strip)
    import time

    start = time.perf_counter()
    result = _cli("predict", models["dense"], strip, image, "--scales", "16")
    assert time.perf_counter() - start < 20
    assert result.exit_code == 1, result.output
    assert f"{strip}: error: a dense pass at 16x3200000 needs about 4.1 GB" in result.output
    assert "over the 1.5 GB limit (--max-memory raises it" in result.output
    assert f"{image}  (dense" in result.output  # the rest of the batch goes on
    # The limit is an option: a small one refuses a normal image too; a bad value is a usage error.
    result = _cli("predict", models["dense"], image, "--scales", "256", "--max-memory", "1M")
    assert result.exit_code == 1 and "over the 1 MB limit" in result.output, result.output
    assert _cli("predict", models["dense"], image, "--max-memory", "lots").exit_code == 2


def test_an_fp16_models_activations_take_half_the_bytes() -> None:
    from vggspec.runtime.memory import activation_bytes

    fp32 = activation_bytes(128, 2, (224, 224))
    assert fp32 == 2 * 224 * 224 * 4 * (128 + 3)
    assert activation_bytes(128, 2, (224, 224), precision="fp16") * 2 == fp32
    assert activation_bytes(128, 2, (224, 224), precision="int8") == fp32  # Q/DQ hands floats between layers


def _endless(model) -> None:
    """posteriors through a Loop whose condition never turns false (and no trip count)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "forever"))
    softmax = model.graph.node[-1]
    softmax.input[0] = "looped"
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Loop", ["", "forever", "flat"], ["looped"], body=body))


def test_a_model_that_never_ends_is_stopped_naming_the_image(models, tmp_path, image):
    import time

    model = _edited(models["dense"], tmp_path / "endless.onnx", _endless)
    start = time.perf_counter()
    result = _cli("predict", model, image, "--timeout-per-image", "1")
    assert time.perf_counter() - start < 30
    assert result.exit_code == 1, result.output
    assert f"{image}: error: stopped after 1 s" in result.output and "--timeout-per-image" in result.output


def test_eval_csv_cells_and_terminal_output_are_neutralised(tmp_path, image):
    import csv

    labels = ["=cmd|' -C calc'!A0", "+dog", "-eel", "@fox"]
    model = conv_model(tmp_path / "m.onnx", extra_meta={"vggspec.labels": json.dumps(labels)})
    for name in labels:
        (tmp_path / "data" / name).mkdir(parents=True)
    evil = tmp_path / "data" / labels[0] / "-x\x1b[31mred\rforged.png"
    Image.open(image).save(evil, format="PNG")
    result = _cli("eval", model, "--data", tmp_path / "data", "--predictions", tmp_path / "p.csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert rows[1][1] == "'" + labels[0] and all(cell[0] not in "=+-@" for row in rows[1:] for cell in row)
    result = _cli("predict", model, evil, "--top", "4")
    assert result.exit_code == 0 and "\x1b" not in result.output and "\r" not in result.output
    assert "\\x1b[31mred\\x0dforged.png" in result.output and "=cmd" in result.output
    (tmp_path / "bad\x1b[2J.png").write_bytes(b"not an image")
    result = _cli("predict", model, tmp_path / "bad\x1b[2J.png")
    assert result.exit_code == 1 and "\x1b" not in result.output and "bad\\x1b[2J.png: error:" in result.output
