"""Small mistakes a newcomer makes get a hint, not just a refusal."""

from __future__ import annotations

from click.testing import CliRunner

from vggspec.cli import main


def test_predict_given_a_spec_name_says_what_model_means(tmp_path) -> None:
    result = CliRunner().invoke(main, ["predict", "D", str(tmp_path / "cat.jpg")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "D: error: no such file" in result.output and ".onnx file or a .safetensors checkpoint" in result.output
