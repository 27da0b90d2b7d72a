"""Small mistakes a newcomer makes get a hint, not just a refusal."""

from __future__ import annotations

from click.testing import CliRunner

from vggspec.cli import main


def test_predict_given_a_spec_name_says_what_model_means(tmp_path) -> None:
    result = CliRunner().invoke(main, ["predict", "D", str(tmp_path / "cat.jpg")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "D: error: no such file" in result.output and ".onnx file or a .safetensors checkpoint" in result.output


def _leaves(group, prefix=()):  # noqa: ANN001, ANN202
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaves(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_command_shows_real_examples() -> None:
    for path, command in _leaves(main):
        help_text = CliRunner().invoke(main, [*path, "--help"]).output
        assert "Examples:" in help_text, path
        lines = [x.strip() for x in command.epilog.splitlines() if x.strip().startswith("vggspec ")]
        assert lines, path
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for line in lines:
            words = line.split()
            assert words[1:1 + len(path)] == list(path), line
            unknown = [w for w in words if w.startswith("--") and w not in options]
            assert not unknown, f"{line}: {unknown}"


def test_a_missing_extra_says_what_to_install(run_without_torch, tmp_path) -> None:
    code = """
    import sys
    from click.testing import CliRunner
    from vggspec.cli import main
    result = CliRunner().invoke(main, sys.argv[1:])
    print(result.exit_code)
    print(result.output)
    """
    (tmp_path / "train").mkdir()
    for args in (["train", "A", "--data", str(tmp_path)], ["weights", "import", "--from", "torchvision",
                                                           str(tmp_path / "x.pth"), "--spec", "A", "-o", "a.st"]):
        r = run_without_torch(code.replace("sys.argv[1:]", repr(args)), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        status, output = r.stdout.split("\n", 1)
        assert status == "1" and "internal error" not in output and "pip install 'vggspec[train]'" in output, output


def test_eval_checks_its_predictions_path_before_any_work(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "p.csv"
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path),
                                       "--predictions", str(missing)])
    assert result.exit_code == 1 and "does not exist" in result.output and "m.onnx" not in result.output
    assert not missing.parent.exists()


def test_eval_ray_without_ray_says_what_to_install(tmp_path) -> None:
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import sys
        class _NoRay:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        sys.meta_path.insert(0, _NoRay())
        from vggspec.cli import main
        main(sys.argv[1:], prog_name="vggspec")
    """)
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "val" / "cat").mkdir(parents=True)
    r = subprocess.run([sys.executable, "-c", code, "eval", str(tmp_path / "m.onnx"), "--data",
                        str(tmp_path / "val"), "--ray"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'vggspec[ray]'" in r.stderr, r.stderr


BIG = "99999999999999999999"


def test_counts_and_numbers_out_of_bounds_are_usage_errors_with_a_hint(tmp_path) -> None:
    """vggspec.limits: every count has an upper bound, seeds are numpy's, rates are finite products."""
    spec, data, out = "examples/digits.vgg", str(tmp_path / "d"), str(tmp_path / "o")
    cases = [
        (["train", spec, "--data", data, "--workers", BIG], "at most 64"),
        (["train", spec, "--data", data, "--threads", BIG], "at most 1024"),
        (["train", spec, "--data", data, "--batch-size", BIG], "at most 65,536"),
        (["train", spec, "--data", data, "--epochs", BIG], "at most 100,000"),
        (["train", spec, "--data", data, "--seed", "-1"], "a seed from 0 to 4294967295"),
        (["train", spec, "--data", data, "--seed", str(2**32)], "a seed from 0 to 4294967295"),
        (["train", spec, "--data", data, "--lr", "1e308"], "0<x<=10"),
        (["train", spec, "--data", data, "--weight-decay", "1e308"], "0<=x<=1"),
        (["data", "scenes", out, "--train", BIG], "at most 10,000,000 images per split"),
        (["data", "scenes", out, "--clutter", "nan"], "not a finite number"),
        (["data", "scenes", out, "--seed", "-1"], "a seed from 0"),
        (["data", "digits", out, "--seed", str(2**40)], "a seed from 0"),
        (["init", spec, "--seed", "-1", "-o", out], "a seed from 0"),
        (["export", spec, "--seed", "-1", "-o", out], "a seed from 0"),
        (["predict", "m.onnx", "x.png", "--threads", BIG], "at most 1024"),
        (["eval", "m.onnx", "--data", data, "--batch-size", BIG], "at most 65,536"),
    ]
    for args, hint in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and hint in result.output, (args, result.output)
    result = CliRunner().invoke(main, ["data", "scenes", out, "--train", "9000000", "--size", "4096"])
    assert result.exit_code == 2 and "GB free" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_empty_paths_and_unusable_preprocessing_values_are_usage_errors(tmp_path) -> None:
    data = str(tmp_path / "d")
    for args in (["data", "scenes", ""], ["data", "digits", " "], ["train", "examples/digits.vgg", "--data", data,
                                                                     "-o", ""],
                 ["train", "examples/digits.vgg", "--resume", ""], ["eval", "m.onnx", "--data", data,
                                                                    "--predictions", ""],
                 ["predict", "m.onnx", "x.png", "--heatmap", ""], ["export", "D", "-o", ""],
                 ["build", "D", "-o", ""], ["init", "D", "-o", ""], ["graph", "D", "-o", ""],
                 ["fuse", "a.onnx", "b.onnx", "-o", ""],
                 ["weights", "export", "--to", "torchvision", "c.st", "-o", ""]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "is empty; give a path" in result.output, (args, result.output)
    for option, value in (("--std", "1e308"), ("--std", "1e-300"), ("--mean", "1e308"), ("--scale", "1e308")):
        result = CliRunner().invoke(main, ["predict", "m.onnx", "x.png", option, value])
        assert result.exit_code == 2 and "must be" in result.output, (option, result.output)


def test_the_missing_extra_hint_names_what_the_command_needs() -> None:
    from vggspec.cli.common import needed_extra

    assert needed_extra("train", "networkx") == needed_extra("train", "torch") == "vggspec[train]"
    assert needed_extra("export", "networkx") == "vggspec[compile]" and needed_extra("eval", "ray") == "vggspec[ray]"
    assert needed_extra("train", "nonexistent_module") is None
