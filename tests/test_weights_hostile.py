"""Checkpoints and models with bad metadata or non-finite weights: named errors, never a NaN result."""

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

from vggspec import load_spec
from vggspec.cli import main
from vggspec.errors import ModelError, WeightsError
from vggspec.runtime.session import Model
from vggspec.weights import init_weights, load_checkpoint

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
