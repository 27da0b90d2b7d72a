"""vggspec.runtime on graphs from the ONNX backend, and `vggspec predict/eval/fuse` run where torch is blocked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import vggspec
from vggspec.runtime import Member, Model, Protocol, Runner, fuse, heatmap, load

SPEC = """name: tinyvgg
input: 32x32x3
classes: 5
conv3-8 maxpool conv3-16 maxpool FC-32 FC-5 soft-max
"""
LABELS = ["ant", "bee", "cow", "dog", "elk"]


def _weights(graph, seed: int) -> dict[str, np.ndarray]:
    """He-scaled normal weights, a cooler last layer: posteriors clearly not uniform, not one-hot either."""
    from vggspec.weights import param_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in param_shapes(graph).items():
        shape = tuple(shape)
        if len(shape) > 1:
            gain = 0.15 if key.startswith("fc4") else 1.0
            out[key] = (rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:])) * gain).astype(np.float32)
        else:
            out[key] = (rng.normal(size=shape) * 0.1).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runtime_export")


@pytest.fixture(scope="module")
def graph():
    return vggspec.loads_spec(SPEC)


@pytest.fixture(scope="module")
def models(tmp, graph) -> dict[str, Path]:
    w1, w2 = _weights(graph, 1), _weights(graph, 2)
    specs = {
        "std": dict(weights=w1), "dense": dict(weights=w1, fully_conv=True, scores=True),
        "flip": dict(weights=w1, fully_conv=True, flip=True), "embed": dict(weights=w1, embed_preprocessing=True),
        "dense2": dict(weights=w2, fully_conv=True, scores=True), "std_flip": dict(weights=w1, flip=True),
    }
    out = {}
    for name, kwargs in specs.items():
        out[name] = tmp / f"{name}.onnx"
        vggspec.export_onnx(graph, out[name], labels=LABELS, **kwargs)
    bare = onnx.load(str(out["dense"]))
    del bare.metadata_props[:]
    out["bare"] = tmp / "bare.onnx"
    onnx.save(bare, str(out["bare"]))
    return out


def _img(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.random((4, 4, 3))  # smooth content, so rescaling does not turn it into noise
    big = np.kron(base, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
    noise = rng.random((h, w, 3)) * 0.3
    Image.fromarray(((big * 0.7 + noise) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp) -> dict[str, Path]:
    folder = tmp / "images"
    folder.mkdir()
    return {"square": _img(folder / "square.png", 32, 32, 0), "wide": _img(folder / "wide.jpg", 40, 57, 1),
            "tall": _img(folder / "tall.png", 50, 36, 2)}


def _posterior(members: list[Member], proto: Protocol, image: Path) -> np.ndarray:
    return Runner(members, [proto]).run(image)[proto]


def test_dense_equals_standard_at_crop_size(models, images):
    dense, std = Model(models["dense"]), Model(models["std"])
    for flip in (False, True):
        d = _posterior([Member.of(dense)], Protocol("dense", (32,), flip), images["square"])
        c = _posterior([Member.of(std)], Protocol("multi-crop", (32,), flip), images["square"])
        np.testing.assert_allclose(d, c, atol=1e-5)
        assert np.ptp(d) > 0.02


def test_forms_agree(models, images):
    """In-graph flip = runtime flip; embedded preprocessing = numpy preprocessing; crops via the dense model."""
    wide, proto = images["wide"], Protocol("dense", (40,), True)
    a = _posterior([Member.of(Model(models["dense"]))], proto, wide)
    b = _posterior([Member.of(Model(models["flip"]))], proto, wide)
    np.testing.assert_allclose(a, b, atol=1e-5)
    crops = Protocol("multi-crop", (36, 44), True)
    ref = _posterior([Member.of(Model(models["std"]))], crops, wide)
    for other in ("embed", "std_flip", "dense"):
        np.testing.assert_allclose(_posterior([Member.of(Model(models[other]))], crops, wide), ref, atol=1e-4)


def test_fusion_equals_average_of_separate_runs(models, images, tmp):
    path = fuse([models["dense"], models["dense2"]], tmp / "ens.onnx")
    onnx.checker.check_model(str(path))
    ens = Model(path)
    assert ens.info.fully_conv and "scores" in ens.info.outputs
    for proto in (Protocol("dense", (32, 48), True), Protocol("multi-crop", (40,), True)):
        fused = _posterior([Member.of(ens)], proto, images["tall"])
        separate = [_posterior([Member.of(Model(models[m]))], proto, images["tall"]) for m in ("dense", "dense2")]
        np.testing.assert_allclose(fused, np.mean(separate, axis=0), atol=1e-5)


def test_heatmap_png(models, images, tmp):
    out = heatmap(load(models["dense"]), images["wide"], 64, 2, tmp / "wide_heat.png", 0.5)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] >= 300
        pixels = np.asarray(img.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # a picture, not a blank canvas


# ---------------------------------------------------------------- the command line without torch


@pytest.fixture(scope="module")
def bad_images(tmp, images) -> dict[str, Path]:
    folder = tmp / "bad"
    folder.mkdir()
    data = images["square"].read_bytes()
    files = {"empty.png": b"", "text.jpg": b"not an image\n", "cut.png": data[: len(data) // 3]}
    out = {name: folder / name for name in files}
    for name, content in files.items():
        out[name].write_bytes(content)
    out["small.png"] = folder / "small.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(out["small.png"])
    return out


def test_predict_without_torch(vggspec_cli, models, images, bad_images, tmp):
    good = [str(images[k]) for k in ("square", "wide")]
    bad = [str(p) for p in bad_images.values()]
    r = vggspec_cli("predict", str(models["dense"]), *good, *bad, "--scales", "native", "--json",
                    "--ensemble", str(models["dense2"]), "--heatmap", str(tmp / "heat"),
                    without_torch=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [d["image"] for d in lines] == good
    assert lines[0]["provider"] == "CPUExecutionProvider" and lines[0]["top"][0]["label"] in LABELS
    errors = r.stderr.splitlines()
    for path in bad:
        assert sum(line.startswith(f"{path}: error: ") for line in errors) == 1, r.stderr
    assert "too small: 20x20 pixels at its own size; the model needs at least 32x32" in r.stderr
    assert "Traceback" not in r.stderr
    # The 32 x 32 image at its own size gives a 1 x 1 score map: a note instead of a one-colour picture.
    assert sorted(p.name for p in (tmp / "heat").iterdir()) == ["wide.png"]
    assert f"{good[0]}: note: no heat map: at Q=native the score map has 1 x 1 cell(s)" in r.stderr
    assert f"heat map of {good[1]}: {tmp / 'heat' / 'wide.png'}" in r.stderr
    # --ensemble is the average of the members, which is what the fused graph computes.
    fuse([models["dense"], models["dense2"]], tmp / "ens_cli.onnx")
    proto = Protocol("dense", (None,), True)
    ref = _posterior([Member.of(Model(tmp / "ens_cli.onnx"))], proto, images["square"])
    assert lines[0]["top"][0]["probability"] == pytest.approx(ref.max(), abs=1e-5)


def test_predict_metadata_less_and_combined(vggspec_cli, models, images):
    args = ("--scales", "32,40", "--json", "--protocol", "combined")
    with_meta = vggspec_cli("predict", str(models["dense"]), str(images["wide"]), *args, "--crop-model",
                            str(models["std"]))
    bare = vggspec_cli("predict", str(models["bare"]), str(images["wide"]), *args, "--size", "32x32",
                       "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", without_torch=True)
    assert with_meta.returncode == 0 and bare.returncode == 0, with_meta.stderr + bare.stderr
    a, b = json.loads(with_meta.stdout), json.loads(bare.stdout)
    assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
    assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-5)
    missing = vggspec_cli("predict", str(models["bare"]), str(images["wide"]))
    assert missing.returncode == 1 and "--size" in missing.stderr and "Traceback" not in missing.stderr


@pytest.fixture(scope="module")
def dataset(tmp, images, bad_images) -> Path:
    root = tmp / "data"
    for i, label in enumerate(("ant", "cow", "elk")):
        (root / label).mkdir(parents=True)
        for j in range(2):
            _img(root / label / f"{j}.png", 34 + 3 * j, 40 - 2 * i, 10 * i + j)
    (root / "cow" / "broken.png").write_bytes(b"")
    return root


def test_eval_without_torch(vggspec_cli, models, dataset):
    r = vggspec_cli("eval", str(models["dense"]), "--data", str(dataset), "--crop-model", str(models["std"]),
                    "--protocol", "dense", "--protocol", "multi-crop", "--protocol", "combined",
                    "--scales", "32", "--scales", "32,40", "--json", without_torch=True, timeout=120)
    assert r.returncode == 1, r.stderr  # the broken file
    out = json.loads(r.stdout)
    assert len(out["rows"]) == 6 and out["images"] == 6 and out["images_per_s"] > 0
    assert out["failed"] == [{"image": str(dataset / "cow" / "broken.png"), "error": "empty file (0 bytes)"}]
    assert f"{dataset / 'cow' / 'broken.png'}: error: empty file" in r.stderr
    # The errors match a direct run: labels from the model, so folder `cow` is class 2.
    members = [Member.of(Model(models["dense"]), Model(models["std"]))]
    for row in out["rows"]:
        proto = Protocol(row["protocol"], tuple(row["scales"]), True)
        wrong = 0
        for label in ("ant", "cow", "elk"):
            for j in range(2):
                post = _posterior(members, proto, dataset / label / f"{j}.png")
                wrong += int(np.argmax(post) != LABELS.index(label))
        assert row["top1_error"] == pytest.approx(100 * wrong / 6)
        assert row["top5_error"] == 0.0  # 5 classes: the target is always in the top 5


def test_eval_table_and_fuse_cli(vggspec_cli, models, dataset, tmp):
    r = vggspec_cli("eval", str(models["std"]), "--data", str(dataset), "--scales", "32", "--scales", "36,40",
                    without_torch=True)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert "evaluation method" in lines[1] and "top-1 err (%)" in lines[1]
    assert lines[2].split()[:3] == ["tinyvgg", "multi-crop", "+"] and "36,40" in lines[3]
    assert "images/s on CPUExecutionProvider" in lines[-1]
    out = tmp / "fused_cli.onnx"
    f = vggspec_cli("fuse", str(models["dense"]), str(models["dense2"]), "-o", str(out), without_torch=True)
    assert f.returncode == 0 and out.exists(), f.stderr
    bad = vggspec_cli("fuse", str(models["dense"]), str(models["std"]), "-o", str(tmp / "no.onnx"))
    assert bad.returncode == 1 and "fully_conv differs" in bad.stderr and not (tmp / "no.onnx").exists()


def test_cli_module_is_light(run_without_torch):
    r = run_without_torch(
        "import sys, vggspec.cli\n"
        "heavy = [m for m in ('onnxruntime', 'PIL', 'matplotlib', 'torch') if m in sys.modules]\n"
        "print(heavy)\n"
        "assert 'predict' in vggspec.cli.main.commands and 'fuse' in vggspec.cli.main.commands\n"
        "assert not heavy\n"
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_edge_example_without_torch(run_without_torch, models, images):
    """The example's plain-onnxruntime path gives what vggspec.runtime gives."""
    r = run_without_torch(
        "import runpy, sys\n"
        f"sys.argv = ['edge_deploy.py', {str(models['dense'])!r}, {str(images['wide'])!r}, '48']\n"
        "runpy.run_path('examples/edge_deploy.py', run_name='__main__')\n"
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("onnxruntime only")
    assert len(out) == 2 and out[0].split("CPUExecutionProvider")[1].strip() == out[1].strip()


def test_combined_from_a_checkpoint(vggspec_cli, graph, models, images, tmp):
    """A .safetensors MODEL is exported in both forms for the run: the same posteriors as the two .onnx files."""
    from vggspec.weights import Checkpoint, save_checkpoint

    ckpt = tmp / "tiny.safetensors"
    save_checkpoint(ckpt, Checkpoint(_weights(graph, 1), SPEC, graph.meta.preprocessing, tuple(LABELS)))
    args = (str(images["wide"]), "--scales", "32,40", "--json", "--protocol", "combined")
    from_ckpt = vggspec_cli("predict", str(ckpt), *args, without_torch=True)
    from_onnx = vggspec_cli("predict", str(models["dense"]), *args, "--crop-model", str(models["std"]))
    assert from_ckpt.returncode == 0 and from_onnx.returncode == 0, from_ckpt.stderr + from_onnx.stderr
    a, b = json.loads(from_ckpt.stdout), json.loads(from_onnx.stdout)
    assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
    assert a["top"][0]["probability"] == pytest.approx(b["top"][0]["probability"], abs=1e-6)


def test_a_checkpoints_exported_forms_are_named_after_it(vggspec_cli, graph, images, tmp):
    """The forms exported for the run are temporaries the user never saw: messages name the checkpoint."""
    from vggspec.weights import Checkpoint, save_checkpoint

    ckpt = tmp / "named.safetensors"
    save_checkpoint(ckpt, Checkpoint(_weights(graph, 1), SPEC, graph.meta.preprocessing, tuple(LABELS)))
    r = vggspec_cli("predict", str(ckpt), str(images["wide"]), "--scales", "16", without_torch=True)
    assert r.returncode == 1
    assert f"{ckpt} (dense form, exported for this run): error: test scale Q=16 is smaller" in r.stderr, r.stderr
    assert "vggspec-models" not in r.stderr
    ok = vggspec_cli("predict", str(ckpt), str(images["wide"]), "--json", "--protocol", "combined")
    assert json.loads(ok.stdout)["models"] == [f"{ckpt} ({form} form, exported for this run)"
                                               for form in ("dense", "standard")]
