"""Weights: initialisation from a shallower net, torchvision and Caffe layouts, checkpoints (and bad ones)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.numpy import save_file
from test_runtime import conv_model

import vggspec
from vggspec import load_spec
from vggspec.cli import main
from vggspec.errors import ModelError, WeightsError
from vggspec.runtime.session import Model
from vggspec.weights import (
    Checkpoint,
    caffe,
    checkpoint_graph,
    init_weights,
    load_checkpoint,
    param_shapes,
    save_checkpoint,
)
from vggspec.weights import torchvision as tv
from vggspec.weights.shallow import init_from_checkpoint, init_from_shallow, layer_pairs

# Narrow versions of configurations A and D: the paper's layer structure, widths / 8, 32 x 32 input.
TINY_A = (Path(__file__).parent / "data" / "tiny_a.vgg").read_text()
TINY_D = TINY_A.replace("tiny_a", "tiny_d").replace("conv3-8 ", "conv3-8 conv3-8 ").replace(
    "conv3-16 ", "conv3-16 conv3-16 ").replace("conv3-32 conv3-32", "conv3-32 conv3-32 conv3-32").replace(
    "conv3-64 conv3-64", "conv3-64 conv3-64 conv3-64")
PAPER_LAYERS = ["conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8"]


def _graph(text: str, sets: tuple[str, ...] = ()) -> vggspec.LayerGraph:
    return vggspec.loads_spec(text, overrides=sets)


def test_paper_layers_of_a_into_d():
    pairs = layer_pairs(vggspec.load_spec("A"), vggspec.load_spec("D"))
    assert pairs == [(name, name) for name in PAPER_LAYERS]
    pairs = layer_pairs(vggspec.load_spec("A", ("norm=batch",)), vggspec.load_spec("E", ("norm=batch",)))
    assert [s for s, _ in pairs] == ["conv1_1", "bn1_1", "conv2_1", "bn2_1", "conv3_1", "bn3_1", "conv3_2", "bn3_2",
                                     "fc6", "fc7", "fc8"]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_init_from_shallow_copies_exactly_the_paper_layers(norm):
    sets = (f"norm={norm}",)
    source, target = _graph(TINY_A, sets), _graph(TINY_D, sets)
    assert [layer.name for layer in target.of_op("conv")][:4] == ["conv1_1", "conv1_2", "conv2_1", "conv2_2"]
    source_tensors = init_weights(source, "xavier", seed=7)
    if norm == "batch":  # make the source's batch norm distinguishable from a fresh one
        source_tensors = {k: v + 1 if k.startswith("bn") else v for k, v in source_tensors.items()}
    result = init_from_shallow(target, source, source_tensors, "paper", seed=1)
    fresh = init_weights(target, "paper", seed=1)
    copied = set(PAPER_LAYERS) | ({"bn1_1", "bn2_1", "bn3_1", "bn3_2"} if norm == "batch" else set())
    assert {t for _, t in result.copied} == copied
    for key, value in result.tensors.items():
        layer = key.split(".")[0]
        want = source_tensors[key] if layer in copied else fresh[key]
        np.testing.assert_array_equal(value, want, err_msg=key)
        assert value.dtype == fresh[key].dtype
    assert param_shapes(target) == {k: tuple(v.shape) for k, v in result.tensors.items()}


def test_init_from_checkpoint_file(tmp_path):
    source = _graph(TINY_A, ("norm=batch",))
    tensors = init_weights(source, "xavier", seed=9)
    save_checkpoint(tmp_path / "a.safetensors", Checkpoint(tensors, spec=TINY_A, overrides=("norm=batch",)))
    got = init_from_checkpoint(_graph(TINY_D, ("norm=batch",)), tmp_path / "a.safetensors", "paper", seed=0)
    np.testing.assert_array_equal(got["conv3_2.weight"], tensors["conv3_2.weight"])
    np.testing.assert_array_equal(got["bn3_2.running_var"], tensors["bn3_2.running_var"])
    assert not np.array_equal(got["conv3_3.weight"][:, :32], tensors["conv3_2.weight"])


def test_init_from_shallow_errors_name_the_layers():
    source, target = _graph(TINY_A), _graph(TINY_D.replace("conv3-32", "conv3-24"))
    with pytest.raises(WeightsError, match="conv3_1 of tiny_a .* layer conv3_1 of tiny_d"):
        init_from_shallow(target, source, init_weights(source))
    too_short = _graph("name: short\ninput: 32x32x3\nconv3-8 maxpool FC-10 FC-10 FC-10 soft-max\n")
    with pytest.raises(WeightsError, match="first 4 conv"):
        init_from_shallow(target, too_short, init_weights(too_short))
    bad = init_weights(source)
    bad["fc7.weight"] = bad["fc7.weight"][:3]
    with pytest.raises(WeightsError, match="fc7"):
        init_from_shallow(target, source, bad)


@pytest.mark.parametrize("arch", ["vgg11", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19_bn"])
def test_torchvision_keys_and_shapes(arch):
    """The mapping gives exactly torchvision's state_dict keys and shapes (built on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        reference = getattr(torchvision.models, arch)(weights=None)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    spec, sets = tv.spec_for(arch)
    graph = vggspec.load_spec(spec, sets)
    fake = {k: np.zeros(s, np.float32) for k, s in param_shapes(graph).items()}
    mapped = {k: tuple(v.shape) for k, v in tv.to_torchvision(graph, fake).items()}
    assert mapped == expected


def test_torchvision_indices_are_derived_from_the_graph():
    mapping = tv.layer_map(vggspec.load_spec("D"))
    assert mapping["conv1_1"] == "features.0" and mapping["conv1_2"] == "features.2"
    assert mapping["conv2_1"] == "features.5" and mapping["conv5_3"] == "features.28"
    assert [mapping[f] for f in ("fc6", "fc7", "fc8")] == ["classifier.0", "classifier.3", "classifier.6"]
    bn = tv.layer_map(vggspec.load_spec("D", ("norm=batch",)))
    assert bn["bn1_1"] == "features.1" and bn["conv1_2"] == "features.3" and bn["conv5_3"] == "features.40"
    # torchvision keeps its Dropout modules whatever the rate: a dropout-free spec maps to the same indices
    assert tv.layer_map(vggspec.load_spec("D", ("dropout=0",)))["fc8"] == "classifier.6"
    with pytest.raises(WeightsError, match="LRN"):
        tv.layer_map(vggspec.load_spec("A-LRN"))
    assert tv.spec_for("vgg19_bn") == ("E", ("norm=batch",))


def test_torchvision_round_trip_through_pth(tmp_path):
    pytest.importorskip("torch")
    graph = _graph(TINY_D, ("norm=batch",))
    tensors = init_weights(graph, "kaiming", seed=2)
    tensors["bn1_1.num_batches_tracked"] = np.array(12, np.int64)
    tv.save_pth(tmp_path / "w.pth", tv.to_torchvision(graph, tensors))
    back = tv.from_torchvision(graph, tv.load_pth(tmp_path / "w.pth"))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value)
        assert back[key].shape == value.shape and back[key].dtype == value.dtype


def test_bad_torchvision_files(tmp_path):
    torch = pytest.importorskip("torch")
    graph = _graph(TINY_D)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="weights_only"):
        tv.load_pth(garbage)
    with pytest.raises(WeightsError, match="no such file"):
        tv.load_pth(tmp_path / "missing.pth")
    torch.save({"features.0.weight": torch.zeros(2), "note": "a string"}, tmp_path / "mixed.pth")
    with pytest.raises(WeightsError, match="'note' is not a tensor"):
        tv.load_pth(tmp_path / "mixed.pth")
    torch.save({"model": _Unpicklable()}, tmp_path / "object.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        tv.load_pth(tmp_path / "object.pth")
    good = tv.to_torchvision(graph, init_weights(graph))
    with pytest.raises(WeightsError, match="batch norm"):
        tv.from_torchvision(_graph(TINY_D, ("norm=batch",)), good)
    with pytest.raises(WeightsError, match="13 conv and 3 FC layers; vgg_a has 8") as info:
        tv.from_torchvision(vggspec.load_spec("A"), _torchvision_like("D"))
    assert "--spec vgg16" in (info.value.hint or "")  # the conv count names the architecture
    wrong = dict(good, **{"classifier.3.weight": np.zeros((5, 5), np.float32)})
    with pytest.raises(WeightsError, match="fc7"):
        tv.from_torchvision(graph, wrong)
    extra = dict(good, **{"features.99.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="features.99.weight"):
        tv.from_torchvision(graph, extra)
    prefixed = {f"module.{k}": v for k, v in good.items()}  # DataParallel checkpoints
    assert tv.from_torchvision(graph, prefixed).keys() == param_shapes(graph).keys()


class _Unpicklable:
    """Any class: weights_only loading refuses it."""


def _torchvision_like(spec: str) -> dict[str, np.ndarray]:
    graph = vggspec.load_spec(spec)
    fake = {k: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), s, [0] * len(s))
            for k, s in param_shapes(graph).items()}  # no memory for 138M zeros
    return tv.to_torchvision(graph, fake)


def test_caffe_mapping():
    graph = _graph(TINY_D)
    tensors = init_weights(graph, seed=4)
    blobs = caffe.to_caffe(graph, tensors)
    np.testing.assert_array_equal(blobs["conv1_1.weight"], tensors["conv1_1.weight"][:, ::-1])  # BGR in Caffe
    np.testing.assert_array_equal(blobs["conv1_2.weight"], tensors["conv1_2.weight"])
    back = caffe.from_caffe(graph, blobs)
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value)
    # blob-index names and fully convolutional FC kernels (fc6 as 64 x 1 x 1 filters over 64 channels)
    indexed = {k.replace(".weight", ".0").replace(".bias", ".1"): v for k, v in blobs.items()}
    indexed["fc6.0"] = indexed["fc6.0"].reshape(32, 64, 1, 1)
    back = caffe.from_caffe(graph, indexed)
    np.testing.assert_array_equal(back["fc6.weight"], tensors["fc6.weight"])
    assert caffe.PREPROCESSING.mean == (123.68, 116.779, 103.939) and caffe.PREPROCESSING.scale == 1.0
    with pytest.raises(WeightsError, match="batch norm"):
        caffe.from_caffe(_graph(TINY_D, ("norm=batch",)), blobs)
    with pytest.raises(WeightsError, match="conv2_2"):
        caffe.from_caffe(graph, {k: v for k, v in blobs.items() if not k.startswith("conv2_2")})


def test_caffe_first_conv_reads_rgb():
    """The imported first convolution applied to RGB equals Caffe's applied to BGR."""
    graph = _graph(TINY_D)
    blobs = caffe.to_caffe(graph, init_weights(graph, seed=5))
    imported = caffe.from_caffe(graph, blobs)
    rgb = np.random.default_rng(0).normal(size=(3, 3, 3))  # one 3 x 3 RGB patch
    ours = np.einsum("ocij,cij->o", imported["conv1_1.weight"].astype(np.float64), rgb)
    theirs = np.einsum("ocij,cij->o", blobs["conv1_1.weight"].astype(np.float64), rgb[::-1])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_checkpoint_keeps_scalars_and_overrides(tmp_path):
    graph = _graph(TINY_D, ("norm=batch", "classes=7"))
    tensors = init_weights(graph)
    ckpt = Checkpoint(tensors, spec=graph.meta.spec_text, preprocessing=tv.PREPROCESSING, source="test",
                      overrides=("norm=batch", "classes=7"))
    save_checkpoint(tmp_path / "c.safetensors", ckpt)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded.tensors["bn1_1.num_batches_tracked"].shape == ()
    assert loaded.overrides == ("norm=batch", "classes=7")
    again = checkpoint_graph(loaded)
    assert again.meta.norm == "batch" and again.meta.classes == 7
    assert param_shapes(again) == param_shapes(graph)


def test_weights_package_imports_without_torch(run_without_torch):
    result = run_without_torch(
        """
        import vggspec
        from vggspec.weights import caffe, shallow, torchvision
        from vggspec.backends.torch import render_source
        import vggspec.cli.compile
        assert "class VggD(nn.Module)" in render_source(vggspec.load_spec("D"))
        print("ok")
        """
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# --- Checkpoints and models with bad metadata or non-finite weights: named errors, never a NaN result.

SPEC = "name: t\ninput: 16x16x3\nclasses: 3\nconv3-4 maxpool conv3-8 maxpool FC-16 FC-3 soft-max\n"
GOOD_PREP = json.dumps({"scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3})


def _checkpoint(tmp_path: Path, name: str = "c.safetensors", tensors: dict | None = None, **meta: str) -> Path:
    (tmp_path / "t.vgg").write_text(SPEC)
    graph = load_spec(tmp_path / "t.vgg")
    path = tmp_path / name
    metadata = {"format": "vggspec-checkpoint/1", "spec": SPEC, "preprocessing": GOOD_PREP, **meta}
    save_file(tensors if tensors is not None else init_weights(graph), str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("meta,expected", [
    ({"labels": "cat, dog, eel"}, "metadata 'labels' is not JSON"),
    ({"labels": '{"cat": 0}'}, "metadata 'labels' is not a JSON list of strings"),
    ({"labels": "[1, 2, 3]"}, "metadata 'labels' is not a JSON list of strings"),
    ({"overrides": '"width=1/2"'}, "metadata 'overrides' is not a JSON list of strings"),
    ({"overrides": "[null]"}, "metadata 'overrides' is not a JSON list of strings"),
    ({"preprocessing": "{}"}, "metadata 'preprocessing' is not the JSON object it should be"),
    ({"preprocessing": "[1, 2]"}, "metadata 'preprocessing' is not the JSON object it should be"),
    ({"preprocessing": "scale=1"}, "metadata 'preprocessing' is not the JSON object it should be"),
    ({"preprocessing": json.dumps({"mean": [0, 0, 0], "std": [0, 1, 1]})}, "finite positive scale and std"),
    ({"preprocessing": json.dumps({"mean": [0, 0, 0], "std": [1, 1, 1], "layout": "CHW"})}, "layout NCHW or NHWC"),
])
def test_bad_checkpoint_metadata_is_a_named_error(tmp_path: Path, meta: dict, expected: str) -> None:
    path = _checkpoint(tmp_path, **meta)
    with pytest.raises(WeightsError, match=expected) as err:
        load_checkpoint(path)
    assert err.value.path == str(path)
    result = CliRunner().invoke(main, ["export", str(tmp_path / "t.vgg"), "--weights", str(path),
                                       "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and expected in result.output, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_where_they_are_used(tmp_path: Path, bad: float) -> None:
    (tmp_path / "t.vgg").write_text(SPEC)
    tensors = init_weights(load_spec(tmp_path / "t.vgg"))
    tensors["conv2_1.weight"][0, 0, 0, 0] = bad
    path = _checkpoint(tmp_path, tensors=tensors)
    for args in (["export", str(tmp_path / "t.vgg"), "--weights", str(path), "-o", str(tmp_path / "m.onnx")],
                 ["eval", str(path), "--data", str(tmp_path)]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "conv2_1.weight holds 1 NaN or infinite value(s)" in result.output and "hint:" in result.output
    assert not (tmp_path / "m.onnx").exists()


def _nan_model(tmp_path: Path) -> Path:
    path = conv_model(tmp_path / "nan.onnx")
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if len(init.dims) == 4:
            w = numpy_helper.to_array(init).copy()
            w[0, 0, 0, 0] = np.nan
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    return path


def test_a_model_that_outputs_nan_is_an_error_not_a_result(tmp_path: Path) -> None:
    model = Model(_nan_model(tmp_path), device="cpu")
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(ModelError, match="output 'probs' holds NaN or infinite values"):
        model.run(x)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(image)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "nan.onnx"), str(image), "--json"])
    assert result.exit_code == 1 and "NaN or infinite" in result.output
    assert "NaN," not in result.output.replace("NaN or", "")  # no NaN printed as a probability


def test_a_weights_file_where_a_spec_goes_gets_a_hint(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path)
    result = CliRunner().invoke(main, ["export", str(path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "is a weights file, not a spec" in result.output and "--weights" in result.output


def test_eval_where_every_image_fails_reports_no_nan(tmp_path: Path) -> None:
    from PIL import Image

    model = _nan_model(tmp_path)
    for label in ("cat", "dog"):
        (tmp_path / "val" / label).mkdir(parents=True)
        Image.fromarray(np.full((10, 10, 3), 99, np.uint8)).save(tmp_path / "val" / label / "a.png")
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(main, ["eval", str(model), "--data", str(tmp_path / "val"), *extra])
        assert result.exit_code == 1 and "none of the 2 images could be evaluated" in result.output
        assert "nan" not in result.output.lower().replace("nan or", "").replace("nan.onnx", "")
        if extra:
            line = next(x for x in result.output.splitlines() if x.startswith("{"))
            rows = json.loads(line)["rows"]
            assert rows[0]["top1_error"] is None


def _images(folder: Path, n: int, bad: int = 0) -> list[Path]:
    """n readable 10x10 PNGs, then `bad` files named like images that are not."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        Image.fromarray(np.full((10, 10, 3), i, np.uint8)).save(folder / f"{i:03d}.png")
        paths.append(folder / f"{i:03d}.png")
    for i in range(bad):
        (folder / f"bad{i:03d}.png").write_bytes(b"not a png")
        paths.append(folder / f"bad{i:03d}.png")
    return paths


def test_a_model_failing_on_every_image_stops_after_a_streak_not_one_line_per_image(tmp_path: Path) -> None:
    from vggspec.runtime.evaluate import FAILURE_STREAK

    model = str(_nan_model(tmp_path))
    _images(tmp_path / "val" / "cat", 30)
    result = CliRunner().invoke(main, ["eval", model, "--data", str(tmp_path / "val")])
    lines = result.output.splitlines()
    assert result.exit_code == 1, result.output
    assert sum(": error: output 'probs' holds NaN" in x for x in lines) == FAILURE_STREAK
    assert f"the model failed on {FAILURE_STREAK} images in a row, the last with: output 'probs' holds NaN" \
        in result.output and "hint:" in result.output and "Traceback" not in result.output
    images = [str(p) for p in _images(tmp_path / "many", 20)]
    result = CliRunner().invoke(main, ["predict", model, *images])
    assert result.exit_code == 1 and f"failed on {FAILURE_STREAK} images in a row" in result.output
    assert result.output.count("NaN or infinite") == FAILURE_STREAK + 1  # the lines, then the error


def test_unreadable_files_never_stop_a_run_and_a_success_resets_the_streak(tmp_path: Path) -> None:
    from vggspec.errors import DataError
    from vggspec.runtime.evaluate import FAILURE_STREAK, FailureStreak

    model = conv_model(tmp_path / "good.onnx")
    _images(tmp_path / "val" / "cat", 2, bad=3 * FAILURE_STREAK)  # 24 bad files in a row: the data's problem
    result = CliRunner().invoke(main, ["eval", str(model), "--data", str(tmp_path / "val"), "--json"])
    assert result.exit_code == 1 and f"{3 * FAILURE_STREAK} of {3 * FAILURE_STREAK + 2} images failed" \
        in result.output, result.output
    streak = FailureStreak(limit=3)
    for _ in range(5):
        streak.failed(ModelError("x"))
        streak.failed(ModelError("x"))
        streak.succeeded()
    streak.failed(ModelError("x"))
    streak.failed(DataError("unreadable"))  # neither counts nor resets
    streak.failed(ModelError("x"))
    with pytest.raises(ModelError, match="3 images in a row, the last with: out of memory"):
        streak.failed(MemoryError())
