"""The metadata contract: one module, documented as it is, every value checked where it is read."""

from __future__ import annotations

import re
from pathlib import Path

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
