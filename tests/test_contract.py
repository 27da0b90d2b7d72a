"""The metadata contract: one module, documented as it is, every value checked where it is read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vggspec.contract import KEYS, Metadata, contract_lines, from_props, key, to_props
from vggspec.errors import ModelError
from vggspec.preprocessing import Preprocessing

ROOT = Path(__file__).resolve().parents[1]
META = Metadata("d", 10, (64, 64), 3, Preprocessing(), ("a",) * 10, fully_conv=True, scores=True, spec="x")


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
])
def test_bad_values_name_the_file_the_key_and_the_fault(name: str, value: str, fault: str) -> None:
    props = to_props(META) | {key(name): value}
    with pytest.raises(ModelError) as err:
        from_props(props, "bad.onnx")
    assert err.value.path == "bad.onnx" and f"vggspec.{name}" in err.value.message and fault in err.value.message


def test_contract_page_is_generated() -> None:
    from vggspec.contract import contract_page

    assert (ROOT / "docs" / "CONTRACT.md").read_text() == contract_page()


def _client(model_path: Path, image_path: Path, q: int) -> np.ndarray:
    """A client written from docs/CONTRACT.md alone: numpy, Pillow, onnxruntime, the model's metadata."""
    import json

    import onnxruntime as ort
    from PIL import Image, ImageOps

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    pre = json.loads(meta["vggspec.preprocessing"])
    img = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    w, h = img.size
    short = min(w, h)
    img = img.resize((max(1, round(w * q / short)), max(1, round(h * q / short))), Image.BILINEAR)
    pixels = np.asarray(img, np.float32)
    x = (pixels * pre["scale"] - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    if meta["vggspec.fully_conv"] == "true":
        batch = np.concatenate([x, x[..., ::-1]])  # the mirror, averaged (the graph does not flip itself)
    else:
        ch, cw = json.loads(meta["vggspec.input_size"])
        ys = np.round(np.linspace(0, x.shape[2] - ch, 5)).astype(int)
        xs = np.round(np.linspace(0, x.shape[3] - cw, 5)).astype(int)
        crops = np.concatenate([x[:, :, y:y + ch, c:c + cw] for y in ys for c in xs])
        batch = np.concatenate([crops, crops[..., ::-1]])
    return session.run(["probs"], {"input": np.ascontiguousarray(batch)})[0].mean(axis=0)


@pytest.mark.parametrize("form", ["dense", "standard"])
def test_a_client_from_the_contract_page_agrees_with_predict(tmp_path: Path, form: str) -> None:
    import json

    from click.testing import CliRunner
    from PIL import Image

    from vggspec import export_onnx, load_spec
    from vggspec.cli import main

    graph = load_spec("A", ["width=1/16", "input=32x32x3", "classes=10", "init=kaiming"])
    model = tmp_path / f"{form}.onnx"
    export_onnx(graph, model, fully_conv=form == "dense", seed=3)
    rng = np.random.default_rng(2)
    image = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the client must turn it upright as vggspec does
    Image.fromarray(rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)).save(image, exif=exif)
    result = CliRunner().invoke(main, ["predict", str(model), str(image), "--scales", "40", "--json", "--top", "5"])
    assert result.exit_code == 0, result.output
    top = json.loads(result.output)["top"]
    mine = _client(model, image, 40)
    for entry in top:
        assert abs(mine[entry["index"]] - entry["probability"]) < 2e-6, (entry, mine[entry["index"]])


def test_fused_models_carry_their_members_specs_and_producer(tmp_path: Path) -> None:
    import onnx

    from vggspec import __version__, export_onnx, load_spec
    from vggspec.runtime.fuse import fuse

    graph = load_spec("A", ["width=1/16", "input=32x32x3", "classes=10"])
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(graph, a, seed=1)
    export_onnx(graph, b, seed=2)
    fused = fuse([a, b], tmp_path / "ab.onnx")
    props = {p.key: p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props}
    meta = from_props(props, str(fused))
    assert meta.member_specs == (graph.meta.spec_text, graph.meta.spec_text) and meta.spec == ""
    assert meta.version == __version__ and meta.contract == 1
