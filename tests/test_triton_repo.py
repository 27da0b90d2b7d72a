"""`vggspec export --triton-repo`: config.pbtxt parsed into Triton's own ModelConfig, the model folder atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vggspec.backends.triton import TritonOptions, write_repository
from vggspec.cli import main
from vggspec.errors import VggspecError

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
ort = pytest.importorskip("onnxruntime")

SPEC = """name: tritiny
input: 32x32x3
classes: 4
labels: labels.txt
conv3-8 maxpool conv3-8 maxpool
FC-16 FC-4 soft-max
"""
LABELS = ["cat", "dog", 'a "quoted" \\ label', "café"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def spec(tmp_path) -> Path:
    (tmp_path / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    path = tmp_path / "tritiny.vgg"
    path.write_text(SPEC)
    return path


def config(folder: Path):
    """config.pbtxt parsed as Triton parses it: into its ModelConfig message (unknown fields are errors)."""
    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def io(cfg) -> dict[str, tuple[str, list[int], str]]:
    dtype = model_config_pb2.DataType.Name
    return {t.name: (dtype(t.data_type), list(t.dims), getattr(t, "label_filename", ""))
            for t in [*cfg.input, *cfg.output]}


def test_a_dense_model_gets_variable_spatial_dims_a_batcher_labels_and_its_metadata(tmp_path, spec):
    repo = tmp_path / "repo"
    result = cli("export", spec, "--fully-conv", "--scores", "--triton-repo", repo)
    assert result.exit_code == 0, result.output
    folder = repo / "tritiny"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == [
        "1", "1/model.onnx", "config.pbtxt", "labels.txt"]
    cfg = config(folder)
    assert (cfg.name, cfg.platform, cfg.backend) == ("tritiny", "onnxruntime_onnx", "onnxruntime")
    assert cfg.max_batch_size == 8
    assert io(cfg) == {"input": ("TYPE_FP32", [3, -1, -1], ""), "probs": ("TYPE_FP32", [4], "labels.txt"),
                       "scores": ("TYPE_FP32", [4, -1, -1], "")}
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["vggspec.name"] == "tritiny" and params["vggspec.fully_conv"] == "true"
    assert '"mean": [0.485' in params["vggspec.preprocessing"]  # quotes inside a value survive
    assert (folder / "labels.txt").read_text(encoding="utf-8").splitlines() == LABELS
    model = onnx.load(str(folder / "1" / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert "conv3-8 maxpool" in props["vggspec.spec"] and props["vggspec.scores"] == "true"  # the metadata kept
    # What Triton would feed it: a batch of the declared dims.
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, scores = session.run(None, {"input": np.zeros((3, 3, 48, 40), np.float32)})
    assert probs.shape == (3, 4) and scores.shape[:2] == (3, 4)


def test_the_options_and_a_standard_model(tmp_path, spec):
    repo = tmp_path / "repo"
    result = cli("export", spec, "--triton-repo", repo, "--triton-name", "tiny-std.v2", "--max-batch", "5",
                 "--max-delay-us", "250")
    assert result.exit_code == 0, result.output
    cfg = config(repo / "tiny-std.v2")
    assert (cfg.name, cfg.max_batch_size) == ("tiny-std.v2", 5)
    assert io(cfg) == {"input": ("TYPE_FP32", [3, 32, 32], ""), "probs": ("TYPE_FP32", [4], "labels.txt")}
    assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 4, 5]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250


def test_a_fixed_batch_or_max_batch_0_gets_full_dims_and_no_batcher(tmp_path, spec):
    repo = tmp_path / "repo"
    out = tmp_path / "m.onnx"
    result = cli("export", spec, "--fully-conv", "--embed-preprocessing", "--static-shape", "2x40x48",
                 "--triton-repo", repo, "-o", out)
    assert result.exit_code == 0, result.output
    cfg = config(repo / "tritiny")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert io(cfg) == {"image": ("TYPE_UINT8", [2, 40, 48, 3], ""), "probs": ("TYPE_FP32", [2, 4], "labels.txt")}
    assert (repo / "tritiny" / "1" / "model.onnx").read_bytes() == out.read_bytes()  # -o and the repo: one file
    assert cli("export", spec, "--triton-repo", repo, "--triton-name", "b0", "--max-batch", "0").exit_code == 0
    cfg = config(repo / "b0")
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert io(cfg)["input"] == ("TYPE_FP32", [-1, 3, 32, 32], "")


def test_a_model_without_labels_has_no_labels_file(tmp_path):
    spec = tmp_path / "nolabels.vgg"
    spec.write_text(SPEC.replace("labels: labels.txt\n", "").replace("tritiny", "nolabels"))
    assert cli("export", spec, "--triton-repo", tmp_path / "repo").exit_code == 0
    folder = tmp_path / "repo" / "nolabels"
    assert not (folder / "labels.txt").exists()
    assert all(not t.label_filename for t in config(folder).output)


def test_an_existing_model_folder_is_kept_unless_force(tmp_path, spec):
    repo = tmp_path / "repo"
    assert cli("export", spec, "--triton-repo", repo, "--max-batch", "4").exit_code == 0
    result = cli("export", spec, "--triton-repo", repo, "--max-batch", "2")
    assert result.exit_code != 0 and "already holds a model named tritiny" in result.output
    assert "--force" in result.output
    assert config(repo / "tritiny").max_batch_size == 4
    assert cli("export", spec, "--triton-repo", repo, "--max-batch", "2", "--force").exit_code == 0
    assert config(repo / "tritiny").max_batch_size == 2
    assert sorted(p.name for p in repo.iterdir()) == ["tritiny"]  # no staging or old folder left behind


def test_a_failed_write_leaves_the_repository_as_it_was(tmp_path, spec):
    repo = tmp_path / "repo"
    assert cli("export", spec, "--triton-repo", repo).exit_code == 0
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    def half_written(path: Path) -> None:
        path.write_bytes(b"half a model")
        raise OSError("disk full")

    for force in (False, True):
        with pytest.raises((OSError, VggspecError)):
            write_repository(repo, "tritiny", half_written, TritonOptions(), force=force)
    with pytest.raises(OSError):
        write_repository(repo, "other", half_written)
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in repo.iterdir()) == ["tritiny"]


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "3"], "--max-batch: for --triton-repo DIR"),
    (["--force", "-o", "x.onnx"], "--force: for --triton-repo DIR"),
    ([], "give -o OUT.onnx, --triton-repo DIR, or both"),
    (["--triton-repo", "REPO", "--triton-name", "../up"], "cannot name a Triton model folder"),
    (["--triton-repo", "REPO", "--triton-name", ".hidden"], "cannot name a Triton model folder"),
    (["--triton-repo", "REPO", "--max-batch", "-1"], "-1 is not in the range x>=0"),
    (["--triton-repo", "missing/REPO"], "does not exist"),
    (["--triton-repo", "FILE"], "is a file"),
])
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, spec, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("REPO", str(tmp_path / "repo")).replace("FILE", str(tmp_path / "FILE")) for a in args]
    result = cli("export", spec, *args)
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not any((tmp_path / "repo").glob("*"))
