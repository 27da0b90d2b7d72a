"""`vggspec predict/eval/fuse` (vggspec/cli/runtime.py): refusing what would destroy an input, hang, or run
another network than asked, and saying what is wrong in words that are true."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_runtime import conv_model

from vggspec.cli import main
from vggspec.errors import ModelError
from vggspec.runtime import Member, Model


def _cli(*args: str):  # noqa: ANN202
    return CliRunner().invoke(main, [str(a) for a in args])


def _img(path: Path, h: int, w: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_runtime")


@pytest.fixture(scope="module")
def models(tmp) -> dict[str, Path]:
    return {"dense": conv_model(tmp / "dense.onnx"), "standard": conv_model(tmp / "standard.onnx", fully_conv=False),
            "dense2": conv_model(tmp / "dense2.onnx", seed=1), "flip": conv_model(tmp / "flip.onnx", flip=True),
            "other": conv_model(tmp / "other.onnx", fully_conv=False, seed=5, channels=1)}


@pytest.fixture(scope="module")
def data(tmp) -> Path:
    for i, label in enumerate(("cat", "dog")):
        for j in range(2):
            _img(tmp / "data" / label / f"{j}.png", 13, 19, 10 * i + j)
    return tmp / "data"


@pytest.fixture(scope="module")
def image(tmp) -> Path:
    return _img(tmp / "img.png", 13, 19, 7)


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------- 1: an output that is an input


@pytest.fixture
def own(tmp_path) -> dict[str, Path]:
    """Models of this test alone: the old code destroyed them, which must not spill into other tests."""
    return {"dense": conv_model(tmp_path / "dense.onnx"), "dense2": conv_model(tmp_path / "dense2.onnx", seed=1),
            "standard": conv_model(tmp_path / "standard.onnx", fully_conv=False)}


@pytest.mark.parametrize("option", ["MODEL", "--crop-model", "--ensemble"])
def test_eval_refuses_predictions_over_a_model(own, models, data, option):
    target = {"MODEL": own["dense"], "--crop-model": own["standard"], "--ensemble": own["dense2"]}[option]
    before = _bytes(target)
    r = _cli("eval", own["dense"], "--data", data, "--crop-model", own["standard"],
             "--ensemble", f"{models['flip']},{own['dense2']}", "--predictions", target)
    assert r.exit_code == 1 and f"is also this command's input ({option})" in r.output, r.output
    assert _bytes(target) == before


def test_eval_refuses_predictions_over_an_image_of_data(models, data, tmp_path):
    target = data / "dog" / "1.png"
    before = _bytes(target)
    r = _cli("eval", models["dense"], "--data", data, "--predictions", target)
    assert r.exit_code == 1 and f"{target}: error: is also this command's input (an image of --data)" in r.output
    assert "top-1" not in r.output and _bytes(target) == before  # refused before the evaluation
    r = _cli("eval", models["dense"], "--data", data, "--predictions", tmp_path / "pred.csv")
    assert r.exit_code == 0 and (tmp_path / "pred.csv").read_text().startswith("image,target,"), r.output


def test_fuse_refuses_an_output_that_is_a_member(own):
    before = _bytes(own["dense"])
    r = _cli("fuse", own["dense2"], own["dense"], "-o", own["dense"])
    assert r.exit_code == 1 and "is also this command's input (model 2 of 2)" in r.output, r.output
    assert _bytes(own["dense"]) == before


def test_heatmaps_written_beside_their_images_do_not_replace_them(models, tmp):
    folder = tmp / "beside"
    img = _img(folder / "cat.png", 20, 24, 3)
    before = _bytes(img)
    r = _cli("predict", models["dense"], img, "--scales", "16", "--heatmap", folder)
    assert r.exit_code == 0, r.output
    assert _bytes(img) == before and (folder / "cat-2.png").is_file()


# ---------------------------------------------------------------- 2: a MODEL that is not a regular file


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("name,command", [("ff", "predict"), ("ff.safetensors", "predict"), ("ff.onnx", "eval"),
                                          ("ff.onnx", "fuse")])
def test_a_fifo_model_is_refused_not_waited_on(vggspec_cli, tmp_path, models, image, data, name, command):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    args = {"predict": [str(fifo), str(image)], "eval": [str(fifo), "--data", str(data)],
            "fuse": [str(fifo), str(models["dense"]), "-o", str(tmp_path / "f.onnx")]}[command]
    r = vggspec_cli(command, *args, without_torch=True, timeout=40)  # the old code blocks in open() for ever
    assert r.returncode == 1 and f"{fifo}: error: not a regular file" in r.stderr, r.stderr


# ---------------------------------------------------------------- 3: the forms of one network


def test_crop_model_must_be_standard_and_dense_model_fully_convolutional(models, image):
    r = _cli("predict", models["standard"], image, "--crop-model", models["dense"])
    assert r.exit_code == 1 and f"{models['dense']}: error: --crop-model takes the standard form" in r.output
    assert "pass it as --dense-model" in r.output
    r = _cli("predict", models["dense"], image, "--dense-model", models["standard"])
    assert r.exit_code == 1 and "--dense-model takes the fully convolutional form" in r.output
    r = _cli("predict", models["dense"], image, "--dense-model", models["dense2"])
    assert r.exit_code == 1 and f"{models['dense']}: error: MODEL is already fully convolutional" in r.output


def test_the_two_forms_must_be_one_network(models, image):
    r = _cli("predict", models["dense"], image, "--crop-model", models["other"], "--protocol", "combined")
    assert r.exit_code == 1, r.output
    assert f"{models['other']}: error: is not the same network as {models['dense']}: vggspec.name differs" in r.output
    with pytest.raises(ModelError, match="vggspec.channels differs"):
        Member.of(Model(conv_model(image.parent / "gray.onnx", channels=1)), Model(models["standard"]))
    assert Member.of(Model(models["dense"]), Model(models["standard"])).crop is not None  # one network: fine


# ---------------------------------------------------------------- 4: onnxruntime's message


def test_onnxruntime_errors_keep_their_informative_lines(models):
    x = np.zeros((2, 3, 10, 10), np.float32)  # the standard model takes exactly 8 x 8
    with pytest.raises(ModelError) as err:
        Model(models["standard"]).run(x)
    assert "index: 2 Got: 10 Expected: 8" in err.value.message and "; " in err.value.message
    assert "\n" not in err.value.message


# ---------------------------------------------------------------- 5: --size/--mean/--std/--scale


def test_overriding_a_vggspec_models_values_says_so(models, image):
    r = _cli("predict", models["dense"], image, "--mean", "0.1,0.2,0.3", "--std", "0.25,0.2,0.3")
    assert r.exit_code == 0, r.output
    assert f"note: --mean replaces its value in the vggspec metadata of {models['dense']}" in r.stderr
    quiet = _cli("predict", models["dense"], image, "--labels", _labels(image.parent))
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr


def _labels(folder: Path) -> Path:
    (folder / "labels.txt").write_text("a\nb\nc\nd\n")
    return folder / "labels.txt"


@pytest.mark.parametrize("args", [("--std", "0"), ("--std", "0.2,-1,0.2"), ("--std", "nan"), ("--mean", "inf"),
                                  ("--scale", "0")])
def test_unusable_statistics_are_usage_errors(models, image, args):
    r = _cli("predict", models["dense"], image, *args)
    assert r.exit_code == 2 and args[0] in r.output, r.output
    assert "RuntimeWarning" not in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- 6: --no-flip and a graph that flips


def test_no_flip_on_a_flipping_graph_gets_a_note_and_a_true_header(models, image):
    r = _cli("predict", models["flip"], image, "--no-flip")
    assert r.exit_code == 0, r.output
    assert f"note: {models['flip']}: the graph averages each image with its mirror itself" in r.stderr
    assert "--no-flip cannot undo that" in r.stderr and ", flip," in r.stdout
    plain = _cli("predict", models["dense"], image, "--no-flip")
    assert "note:" not in plain.stderr and ", flip" not in plain.stdout


# ---------------------------------------------------------------- 7: static shapes


def test_a_static_shape_mismatch_names_the_scale_that_fits(tmp):
    static = conv_model(tmp / "static.onnx", hw=(10, 12), fully_conv=False, extra_meta={"vggspec.fully_conv": "true"})
    fits, never = _img(tmp / "s" / "fits.png", 20, 24), _img(tmp / "s" / "never.png", 20, 20)
    r = _cli("predict", static, fits, never, "--scales", "12")
    assert r.exit_code == 1
    assert (f"{fits}: error: at Q=12 the image is 12x14, but the model takes exactly 10x12 (exported with "
            "--static-shape); --scales 10 makes this image 10x12") in r.output
    assert f"{never}: error: at Q=12 the image is 12x12" in r.output
    assert "no --scales fits: this image is 20x20, of other proportions" in r.output
    assert _cli("predict", static, fits, "--scales", "10").exit_code == 0
    square = _img(tmp / "s" / "square.png", 30, 30)
    assert _cli("predict", conv_model(tmp / "sq.onnx", hw=(10, 10), fully_conv=False,
                                      extra_meta={"vggspec.fully_conv": "true"}), square).exit_code == 0  # Q=10


def test_a_dense_static_shape_smaller_than_the_crop_gets_a_true_hint(tmp_path):
    spec = tmp_path / "t.vgg"
    spec.write_text("input: 32x32x3\nclasses: 3\nconv3-4 maxpool conv3-4 maxpool FC-8 FC-3 soft-max\n")
    r = _cli("export", spec, "--fully-conv", "--static-shape", "1x16x16", "-o", tmp_path / "m.onnx")
    assert r.exit_code == 1 and "H x W at least 32x32" in r.output
    assert "a dense model takes images at least as large as its crop" in r.output
    assert "export --fully-conv" not in r.output


def test_a_labels_file_of_another_count_is_refused(models, image, data, tmp_path):
    labels = tmp_path / "two.txt"
    labels.write_text("cat\ndog\n")
    for args in (["predict", models["dense"], image], ["eval", models["dense"], "--data", data]):
        r = _cli(*args, "--labels", labels)
        assert r.exit_code == 1 and f"{labels}: error: the label file has 2 labels for" in r.output, r.output


# ---------------------------------------------------------------- 8: heat maps


def test_heatmap_folder_is_made_only_when_the_run_can_draw(models, image, tmp):
    folder = tmp / "never-made"
    r = _cli("predict", models["standard"], image, "--heatmap", folder)
    assert r.exit_code == 1 and "--heatmap needs a fully convolutional model" in r.output
    assert not folder.exists()


def test_a_coarse_score_map_note_says_what_is_true(tmp, image):
    model = conv_model(tmp / "tiny.onnx", hw=(3, 3))  # 1 x 2 cells on a 13 x 19 image at Q=3
    r = _cli("predict", model, image, "--scales", "3", "--heatmap", tmp / "heat")
    assert "score map has 1 x 2 cell(s), under 4: too coarse to show where in the image the class is" in r.output
    assert "one colour" not in r.output


# ---------------------------------------------------------------- 9: hints in the command line's words


def test_combined_without_a_dense_form_gets_the_cli_hint(models, image):
    r = _cli("predict", models["standard"], image, "--protocol", "combined")
    assert r.exit_code == 1 and "needs the network's fully convolutional form" in r.output
    assert "--dense-model M_DENSE.onnx" in r.output and "vggspec export --fully-conv" in r.output
    assert "fully_conv=True" not in r.output


def test_an_empty_scales_option_is_a_usage_error_not_the_default(models, image):
    r = _cli("predict", models["dense"], image, "--scales", "")
    assert r.exit_code == 2 and "'' is not a test scale" in r.output


# --- Ensembles of differently ordered classes, file names that are not UTF-8 (conftest's `tiny_gray_spec`).

def test_members_that_order_their_classes_differently_are_not_averaged(tmp_path: Path, monkeypatch, tiny_gray_spec,
                                                                      gray_images) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ab.txt").write_text("a\nb\nc\n")
    (tmp_path / "ba.txt").write_text("c\nb\na\n")
    for name, labels in (("x", "ab.txt"), ("y", "ba.txt"), ("z", "ab.txt")):
        assert _cli("export", "t.vgg", "--set", f"labels={labels}", "--fully-conv", "-o", f"{name}.onnx").exit_code == 0
    for label in "abc":
        gray_images(tmp_path / "val" / label)
    result = _cli("fuse", "x.onnx", "y.onnx", "-o", "xy.onnx")
    assert result.exit_code == 1 and "y.onnx: error: names class 0 'c', and x.onnx names it 'a'" in result.output
    assert not (tmp_path / "xy.onnx").exists()
    result = _cli("eval", "x.onnx", "--ensemble", "y.onnx", "--data", "val")
    assert result.exit_code == 1 and "names class 0 'c'" in result.output
    assert _cli("fuse", "x.onnx", "z.onnx", "-o", "xz.onnx").exit_code == 0  # the same order: fine


def test_file_names_that_are_not_utf8_are_reported_not_fatal(tmp_path: Path, tiny_gray_spec, gray_images) -> None:
    spec = tiny_gray_spec
    model = tmp_path / "m.onnx"
    assert _cli("export", spec, "--fully-conv", "-o", model).exit_code == 0
    for label in "abc":
        gray_images(tmp_path / "val" / label)
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path / "val" / "a")) + b"/x\xff.png"))
    odd.write_bytes((tmp_path / "val" / "a" / "0.png").read_bytes())
    result = _cli("eval", model, "--data", tmp_path / "val", "--predictions", tmp_path / "p.csv")
    assert result.exit_code == 0 and "internal error" not in result.output, result.output
    assert "x\\xff.png,a," in (tmp_path / "p.csv").read_text(encoding="utf-8")
    result = _cli("predict", model, odd, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["image"].endswith("x\\xff.png")
