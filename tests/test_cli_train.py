"""`vggspec train` and `vggspec data`: the command line of training (the loop itself: test_train_*.py)."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from vggspec.cli.train import train
from vggspec.errors import DataError
from vggspec.train.config import DEFAULTS, TrainConfig

# Settings of the recipe that no option changes (--patience's help quotes it).
NO_OPTION = {"max_decreases"}


def test_every_option_default_is_the_train_configs() -> None:
    # What the command passes for an option left out, after click's conversion, against the dataclass.
    ctx = train.make_context("train", ["S", "--data", "d"])
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    optioned = {name: value for name, value in defaults.items() if name not in NO_OPTION}
    assert {name: ctx.params[name] for name in optioned if name in ctx.params} == optioned
    assert set(defaults) - set(ctx.params) == NO_OPTION  # every other default has its option
    assert DEFAULTS == defaults


def test_help_shows_the_defaults() -> None:
    text = " ".join(train.get_help(train.make_context("train", ["--help"], resilient_parsing=True)).split())
    for shown in ("[default: 256;", "[default: 0.01;", "[default: 74;", "[default: 0.0005;", "[default: auto]",
                  "[default: flip]", f"(at most {DEFAULTS['max_decreases']} times)"):
        assert shown in text


# --- `vggspec data digits|scenes`: bounded sizes, --force and links, --preview's folder (no torch needed).

def test_data_sizes_are_bounded(tmp_path: Path) -> None:
    from vggspec.cli import main
    from vggspec.datasets.digits import write_digits

    for family in ("digits", "scenes"):
        result = CliRunner().invoke(main, ["data", family, str(tmp_path / family), "--size", "100000"])
        assert result.exit_code == 2 and "--size" in result.output, result.output
        assert not (tmp_path / family).exists()
    with pytest.raises(DataError, match="image size 100000 is outside 8..4096"):
        write_digits(tmp_path / "lib", size=100000)


def test_data_force_names_a_linked_split(tmp_path: Path) -> None:
    from vggspec.cli import main

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train").symlink_to(tmp_path / "elsewhere")
    for family in ("digits", "scenes"):
        result = CliRunner().invoke(main, ["data", family, str(tmp_path / "d"), "--force"])
        assert result.exit_code == 1, result.output
        assert f"{tmp_path / 'd' / 'train'}: error: is not a folder (a symbolic link" in result.stderr
        assert "rmtree" not in result.output and (tmp_path / "elsewhere").is_dir()


def test_scenes_preview_may_go_into_the_folder_the_command_creates(tmp_path: Path) -> None:
    from vggspec.cli import main

    out = tmp_path / "s3"
    result = CliRunner().invoke(main, ["data", "scenes", str(out), "--size", "16", "--train", "2", "--val", "1",
                                       "--test", "1", "--min-digit", "8", "--max-digit", "12",
                                       "--preview", str(out / "p.png")])
    assert result.exit_code == 0, result.output
    assert (out / "p.png").is_file()
    missing = CliRunner().invoke(main, ["data", "scenes", str(tmp_path / "s4"), "--preview",
                                        str(tmp_path / "nowhere" / "p.png")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
