"""`vggspec summary`, `vggspec graph`, and the command line's manners: errors, --help, --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from vggspec.cli import main


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_summary_json_reproduces_table2():
    out = json.loads(run("summary", "D", "--json").output)
    assert out["name"] == "vgg_d" and out["params"] == 138_357_544 and out["macs"] == 15_470_264_320
    first = out["layers"][1]
    assert set(first) >= {"name", "op", "output_shape", "params", "macs", "receptive_field"}
    assert first["name"] == "conv1_1" and first["params"] == 1792


def test_summary_table_names_every_layer():
    result = run("summary", "E")
    assert result.exit_code == 0
    assert "conv5_4" in result.output and "143,667,240" in result.output


def test_summary_at_a_larger_input_is_the_dense_form():
    out = json.loads(run("summary", "D", "--input", "384", "--json").output)
    assert out["fully_conv"] and out["params"] == 138_357_544
    assert out["layers"][-3]["output_shape"] == [1000, 6, 6]


def test_an_input_too_small_for_the_dense_form_is_one_line():
    """PassError, now a VggspecError, prints as it did before it joined the root."""
    result = run("summary", "A", "--input", "16")
    assert result.exit_code == 1
    assert result.output == ("error: input 16x16 is too small for vgg_a: pool5 shrinks the 1x1 map below 1x1"
                             " (its dense form needs at least about 224x224)\n")


def test_set_overrides_on_the_command_line():
    out = json.loads(run("summary", "D", "--set", "norm=batch", "--set", "classes=10", "--json").output)
    assert out["classes"] == 10 and any(x["op"] == "bn" for x in out["layers"])


@pytest.mark.parametrize("suffix", ["png", "svg", "dot", "pdf"])
def test_graph_pictures(tmp_path, suffix):
    target = tmp_path / f"d.{suffix}"
    result = run("graph", "D", "-o", str(target))
    assert result.exit_code == 0, result.output
    data = target.read_bytes()
    assert {"png": b"\x89PNG", "svg": b"<?xml", "dot": b"digraph", "pdf": b"%PDF"}[suffix] in data[:64]
    if suffix == "dot":
        assert b"conv5_3" in data and b"cluster_stage5" in data


def test_spec_error_prints_location_and_caret(tmp_path):
    bad = tmp_path / "bad.vgg"
    bad.write_text("input: 32x32\nconv3_64 maxpool\nFC-10 soft-max\n")
    result = run("summary", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:2:1: error: unknown layer 'conv3_64'" in result.output
    assert "    ^~~~~~~~" in result.output and "did you mean 'conv3-64'?" in result.output
    assert "Traceback" not in result.output


def test_missing_file_and_bad_output_are_one_line(tmp_path):
    result = run("summary", str(tmp_path / "nope.vgg"))
    assert result.exit_code == 1 and "no such spec file" in result.output
    result = run("graph", "D", "-o", str(tmp_path / "missing" / "d.png"))
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not (tmp_path / "missing").exists()


def test_not_utf8_spec(tmp_path):
    bad = tmp_path / "bin.vgg"
    bad.write_bytes(b"conv3-8 \xfe\xff")
    result = run("summary", str(bad))
    assert result.exit_code == 1 and "not UTF-8" in result.output


def test_python_m_vggspec_and_version():
    out = subprocess.run([sys.executable, "-m", "vggspec", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "vggspec, version" in out.stdout
    out = subprocess.run([sys.executable, "-m", "vggspec", "--help"], capture_output=True, text=True)
    assert "summary" in out.stdout and "graph" in out.stdout


def test_summary_and_graph_run_without_torch(vggspec_cli, tmp_path):
    result = vggspec_cli("summary", "C", "--json", without_torch=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params"] == 133_638_952
    result = vggspec_cli("graph", "C", "-o", str(tmp_path / "c.svg"), without_torch=True)
    assert result.returncode == 0, result.stderr


def test_wheel_ships_specs_and_templates(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vggspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vggspec/specs/D.vgg" in names and "vggspec/specs/A-LRN.vgg" in names
    assert any(n.startswith("vggspec/templates/") for n in names)
    assert "vggspec/serve/static/index.html" in names  # the serve page, read with importlib.resources


# --- Odd specs, numbers and files met by the command line: named errors, never a crash.

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_two_lrn_layers_in_one_stage_are_a_located_error(tmp_path: Path) -> None:
    spec = tmp_path / "lrn2.vgg"
    spec.write_text("input: 32x32x3\nconv3-8 LRN conv3-8 LRN maxpool conv3-8 LRN FC-10 soft-max\n")
    result = cli("summary", spec)
    assert result.exit_code == 1 and "internal error" not in result.output
    assert f"{spec}:2:21: error: a second LRN in stage 1" in result.output and "norm1" in result.output


def test_a_pipe_where_a_spec_or_checkpoint_goes_is_named_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = ("import sys; from vggspec.cli import main; main(sys.argv[1:], prog_name='vggspec')")
    for args in (["summary", fifo], ["export", "--weights", fifo, "-o", tmp_path / "x.onnx"],
                 ["weights", "import", "--from", "caffe", fifo, "--spec", "A", "-o", tmp_path / "x.safetensors"]):
        out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 1 and f"{fifo}: error: not a regular file" in out.stderr, (args, out.stderr)


def test_a_folder_named_like_a_shipped_spec_does_not_hide_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A").mkdir()
    result = cli("summary", "A", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["name"] == "vgg_a"
    result = cli("summary", tmp_path / "A")  # a path, not a bare name: the folder was meant
    assert result.exit_code == 1 and "is a folder, not a spec file" in result.output


@pytest.mark.parametrize("args,message", [
    (["summary", "A", "--set", "classes"], "--set classes has no value"),
    (["summary", "A", "--set", "classes=99999999999999999999"], "is more than the 1,048,576 outputs"),
    (["summary", "A", "--set", "classes=1048577"], "is more than the 1,048,576 outputs"),
    (["summary", "A", "--set", "input=32x32x4"], "input has 4 channels; vggspec reads images as 1"),
    (["summary", "A", "--input", "100000x100000"], "is larger than 16384 on a side"),
    (["export", "A", "--static-shape", "1x99999x99999", "-o", "x.onnx"], "is larger than 16384 on a side"),
    (["export", "A", "--static-shape", "1x\u00b2x3", "-o", "x.onnx"], "is not NxHxW in positive integers"),
])
def test_odd_numbers_are_named_errors(args: list[str], message: str) -> None:
    result = cli(*args)
    assert result.exit_code in (1, 2) and message in result.output, result.output
    assert "internal error" not in result.output and "did you mean 'classes'" not in result.output


def test_full_width_digits_are_not_numbers(tmp_path: Path) -> None:
    spec = tmp_path / "u.vgg"
    spec.write_text("input: 32x32x3\nconv3-\uff18 FC-10 soft-max\n")
    result = cli("summary", spec)
    assert result.exit_code == 1 and "channel count '\uff18' is not a number" in result.output


def test_a_labels_file_given_by_set_is_blamed_on_the_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    result = cli("summary", "A", "--set", "labels=two.txt")
    assert result.exit_code == 1 and "<--set>:1:8: error: labels file" in result.output
    assert "has 2 labels for 1000 classes" in result.output and "A.vgg" not in result.output
