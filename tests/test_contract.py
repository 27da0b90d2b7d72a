"""The metadata contract: one module, documented as it is, every value checked where it is read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from vggspec.contract import KEYS, Metadata, contract_lines, from_props, key, paper_test_scales, to_props
from vggspec.errors import ModelError
from vggspec.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
META = Metadata("d", 10, (64, 64), 3, Preprocessing(), ("a",) * 10, fully_conv=True, scores=True, spec="x")
TESTED = Metadata("d", 10, (64, 64), 3, Preprocessing(), fully_conv=True, test_scales=(73, 110, 146),
                  test_flip=False, training=(("scale", (73, 146)), ("flip", False)))


def test_the_documented_contract_is_the_code() -> None:
    doc = (ROOT / "docs" / "DEVELOPING.md").read_text()
    for line in contract_lines():
        assert line in doc
    documented = set(re.findall(r"`vggspec\.([a-z_]+)`", doc.split("## ONNX metadata contract")[1].split("##")[0]))
    assert documented == set(KEYS)


def test_no_other_module_spells_a_metadata_key() -> None:
    package = ROOT / "vggspec"
    literal = re.compile('"vggspec\\.(' + "|".join(KEYS) + ')"')
    spelled = [p for p in package.rglob("*.py") if p.name != "contract.py" and literal.search(p.read_text())]
    assert spelled == []


def test_round_trip() -> None:
    props = to_props(META)
    assert from_props(props, "m.onnx") == META
    assert key("labels") in props and key("members") not in props  # empty lists are left out
    # A model without a test protocol writes none of its keys, and reads back as "behave as before".
    assert not {key("test_scales"), key("test_flip"), key("training")} & set(props)
    assert from_props(props, "m.onnx").test_scales == () and from_props(props, "m.onnx").test_flip is None


def test_the_test_protocol_round_trips_in_plain_json() -> None:
    props = to_props(TESTED)
    assert props[key("test_scales")] == "[73, 110, 146]" and props[key("test_flip")] == "false"
    assert json.loads(props[key("training")]) == {"scale": [73, 146], "flip": False}
    assert from_props(props, "m.onnx") == TESTED


def test_the_papers_test_scales() -> None:
    assert paper_test_scales(73, 146) == (73, 110, 146)  # 109.5: half up, as the paper's 0.5 (Smin + Smax)
    assert paper_test_scales(256, 512) == (256, 384, 512)
    assert paper_test_scales(73, 73) == (73,)  # a fixed S is tested at Q = S
    assert paper_test_scales(32, 33) == (32, 33)


@pytest.mark.parametrize(("name", "value", "fault"), [
    ("classes", "two", "not a positive integer"),
    ("classes", "\u00b2", "not a positive integer"),
    ("input_size", "[32]", "not [H, W]"),
    ("input_size", "[32, -1]", "not [H, W]"),
    ("input_size", "{", "not valid JSON"),
    ("preprocessing", "{}", "lacks or mangles"),
    ("preprocessing", '{"mean": [0, 0, 0], "std": [0, 1, 1]}', "finite positive scale and std"),
    ("preprocessing", '{"mean": [0], "std": [1]}', "3 mean and std values"),
    ("labels", '"abc"', "not a JSON list"),
    ("labels", '["a", "b"]', "2 labels for 10 classes"),
    ("fully_conv", "yes", "not true or false"),
    ("precision", "fp64", "not one of"),
    ("test_scales", "[]", "1 to 16 positive integers"),
    ("test_scales", "[73, 0]", "1 to 16 positive integers"),
    ("test_scales", '["73"]', "1 to 16 positive integers"),
    ("test_scales", "73", "1 to 16 positive integers"),
    ("test_flip", "no", "not true or false"),
    ("training", '{"scale": [146, 73], "flip": false}', "is not {"),
    ("training", '{"scale": [73, 146]}', "is not {"),
])
def test_bad_values_name_the_file_the_key_and_the_fault(name: str, value: str, fault: str) -> None:
    props = to_props(META) | {key(name): value}
    with pytest.raises(ModelError) as err:
        from_props(props, "bad.onnx")
    assert err.value.path == "bad.onnx" and f"vggspec.{name}" in err.value.message and fault in err.value.message


def test_contract_page_is_generated() -> None:
    from vggspec.contract import contract_page

    assert (ROOT / "docs" / "CONTRACT.md").read_text() == contract_page()


def _client(model_path: Path, image_path: Path, scales: list[int] | None = None) -> np.ndarray:
    """A client written from docs/CONTRACT.md alone: numpy, Pillow, onnxruntime, the model's metadata."""
    import onnxruntime as ort
    from PIL import Image, ImageOps

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["vggspec.preprocessing"])
    ch, cw = json.loads(meta["vggspec.input_size"])
    qs = scales or json.loads(meta.get("vggspec.test_scales", "null")) or [min(ch, cw)]
    flip = meta.get("vggspec.test_flip", "true") == "true" and meta["vggspec.flip"] != "true"
    img = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    w, h = img.size
    short = min(w, h)
    posteriors = []
    for q in qs:
        scaled = img.resize((max(1, round(w * q / short)), max(1, round(h * q / short))), Image.BILINEAR)
        pixels = np.asarray(scaled, np.float32)
        x = (pixels * pre["scale"] - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
        x = x.transpose(2, 0, 1)[None].astype(np.float32)
        if meta["vggspec.fully_conv"] != "true":
            ys = np.round(np.linspace(0, x.shape[2] - ch, 5)).astype(int)
            xs = np.round(np.linspace(0, x.shape[3] - cw, 5)).astype(int)
            x = np.concatenate([x[:, :, y:y + ch, c:c + cw] for y in ys for c in xs])
        batch = np.concatenate([x, x[..., ::-1]]) if flip else x  # the mirror, averaged in
        posteriors.append(session.run(["probs"], {"input": np.ascontiguousarray(batch)})[0].mean(axis=0))
    return np.mean(posteriors, axis=0)


@pytest.mark.parametrize(("form", "test_scales", "test_flip", "scales"), [
    ("dense", None, None, "40"),  # a model without a test protocol, at the scale given
    ("standard", None, None, "40"),
    ("dense", (40, 48), False, None),  # the model's own: two scales, no mirror
    ("standard", (32, 40), True, None),  # the model's own: two scales, 50 crops each
])
def test_a_client_from_the_contract_page_agrees_with_predict(tmp_path: Path, form: str, test_scales: tuple | None,
                                                             test_flip: bool | None, scales: str | None) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from vggspec import export_onnx, load_spec
    from vggspec.cli import main

    graph = load_spec("A", ["width=1/16", "input=32x32x3", "classes=10", "init=kaiming"])
    model = tmp_path / f"{form}.onnx"
    export_onnx(graph, model, fully_conv=form == "dense", seed=3, test_scales=test_scales, test_flip=test_flip)
    rng = np.random.default_rng(2)
    image = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the client must turn it upright as vggspec does
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(image, exif=exif)
    given = ["--scales", scales] if scales else []
    result = CliRunner().invoke(main, ["predict", str(model), str(image), *given, "--json", "--top", "5"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    if test_scales:  # the model's own protocol, said on stderr
        assert out["scales"] == list(test_scales) and out["flip"] is test_flip
        q = ",".join(map(str, test_scales))
        assert f"testing at the model's own Q={q} {'with' if test_flip else 'without'} flip" in result.stderr
    else:
        assert out["flip"] is True and result.stderr == ""
    mine = _client(model, image, [int(scales)] if scales else None)
    for entry in out["top"]:
        assert abs(mine[entry["index"]] - entry["probability"]) < 1e-6, (entry, mine[entry["index"]])


def test_the_metadata_spec_compiles_to_the_exported_network(tmp_path: Path) -> None:
    """`vggspec.spec` is the spec with the --set options applied: compiling it gives the same network."""
    import onnx
    from click.testing import CliRunner

    from vggspec import load_spec
    from vggspec.cli import main

    sets = ["width=0.125", "classes=10", "norm=batch", "input=64x64"]
    model = tmp_path / "d.onnx"
    args = ["export", "D", "-o", str(model), *(a for s in sets for a in ("--set", s))]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    spec = tmp_path / "from_metadata.vgg"
    spec.write_text(props["vggspec.spec"])
    rebuilt, exported = load_spec(spec), load_spec("D", sets)
    assert rebuilt.params == exported.params and rebuilt.meta.classes == 10 and rebuilt.meta.norm == "batch"
    assert [(x.name, x.op, x.attrs, x.out_shape) for x in rebuilt.layers] == \
           [(x.name, x.op, x.attrs, x.out_shape) for x in exported.layers]
    assert rebuilt.meta.input_shape == (3, 64, 64) and rebuilt.meta.width == 0.125
    assert "# --set (spec: 224x224x3)" in props["vggspec.spec"]  # a reader sees what --set changed


def test_fused_models_carry_their_members_specs_and_producer(tmp_path: Path) -> None:
    import onnx

    from vggspec import __version__, export_onnx, load_spec
    from vggspec.runtime.fuse import fuse
    from vggspec.spec.compiled import compiled_text

    graph = load_spec("A", ["width=1/16", "input=32x32x3", "classes=10"])
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(graph, a, seed=1)
    export_onnx(graph, b, seed=2)
    fused = fuse([a, b], tmp_path / "ab.onnx")
    props = {p.key: p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props}
    meta = from_props(props, str(fused))
    compiled = compiled_text(graph.meta.spec_text, graph.meta.overrides)  # the spec with its --set applied
    assert meta.member_specs == (compiled, compiled) and meta.spec == ""
    assert meta.version == __version__ and meta.contract == 1
