"""Edge boxes: real virtual environments holding exactly what `vggspec[cpu]` (the runtime alone) and
`vggspec[compile,cpu]` install, and no torch.

Each environment is assembled from this interpreter's installed distributions (no network): the
requirement closure of vggspec's core dependencies (plus the extra's) plus onnxruntime, linked into a
fresh venv. The commands then run there as separate processes.
"""

from __future__ import annotations

import json
import subprocess
import venv
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SPEC = "name: edge\ninput: 32x32x3\nclasses: 3\nconv3-8 maxpool conv3-16 maxpool FC-16 FC-3 soft-max\n"


def requirement_closure(names: list[str]) -> set[str]:
    """Distribution names needed by `names`, following their non-extra requirements."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def top_level_entries(dist_name: str) -> set[str]:
    files = metadata.distribution(dist_name).files or []
    return {
        f.parts[0]
        for f in files
        if f.parts and f.parts[0] not in ("..", "__pycache__") and not str(f).startswith("../")
    }


def _edge_env(base: Path, extras: tuple[str, ...]) -> Path:
    requires = [Requirement(r) for r in metadata.distribution("vggspec").requires or []]
    names = [r.name for r in requires if r.marker is None]
    names += [r.name for r in requires for e in extras if r.marker is not None and r.marker.evaluate({"extra": e})]
    dists = requirement_closure([*names, "onnxruntime"])
    assert not {"torch", "torchvision"} & dists
    site = base / "site"
    site.mkdir()
    source = Path(np.__file__).resolve().parents[1]
    for dist in dists:
        for entry in top_level_entries(dist):
            if (source / entry).exists() and not (site / entry).exists():
                (site / entry).symlink_to(source / entry)
    env = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    purelib = subprocess.check_output(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    )
    Path(purelib.strip(), "edge.pth").write_text(f"import site; site.addsitedir({str(site)!r})\n{ROOT}\n")
    return python


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory) -> Path:
    """vggspec[compile,cpu]: export, fuse, predict and eval, without torch."""
    return _edge_env(tmp_path_factory.mktemp("edge"), ("compile",))


@pytest.fixture(scope="module")
def runtime_python(tmp_path_factory) -> Path:
    """vggspec[cpu]: the runtime alone, as an edge box that only runs exported files installs it."""
    return _edge_env(tmp_path_factory.mktemp("runtime"), ())


def run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_edge_environment_has_no_torch(edge_python, tmp_path):
    out = run(edge_python, "-c", "import torch", cwd=tmp_path)
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr


def test_export_predict_eval_fuse_without_torch(edge_python, tmp_path):
    from PIL import Image

    (tmp_path / "edge.vgg").write_text(SPEC)
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"{i}.png"
            )
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    cli = ("-m", "vggspec")
    for args in (
        ("export", "edge.vgg", "-o", "std.onnx"),
        ("export", "edge.vgg", "--fully-conv", "--flip", "-o", "dense.onnx"),
        ("export", "edge.vgg", "--fully-conv", "--flip", "--seed", "1", "-o", "dense1.onnx"),
        ("fuse", "dense.onnx", "dense1.onnx", "-o", "ens.onnx"),
    ):
        done = run(edge_python, *cli, *args, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    done = run(edge_python, *cli, "predict", "ens.onnx", "data/a/0.png", "--scales", "32,40", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[0])
    assert result["provider"] == "CPUExecutionProvider" and len(result["top"]) == 3
    assert abs(sum(p["probability"] for p in result["top"]) - 1) < 1e-4  # all three classes: posteriors sum to 1
    done = run(
        edge_python,
        *cli,
        "eval",
        "std.onnx",
        "--dense-model",
        "dense.onnx",
        "--data",
        "data",
        "--labels",
        "labels.txt",
        "--protocol",
        "dense",
        "--protocol",
        "multi-crop",
        "--protocol",
        "combined",
        "--scales",
        "32,40",
        "--json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {"dense", "multi-crop", "combined"} <= {r["protocol"] for r in rows["rows"]}


def test_the_runtime_alone_predicts_and_evaluates_and_names_the_missing_extra(runtime_python, tmp_path):
    from PIL import Image

    from vggspec import export_onnx, load_spec

    (tmp_path / "edge.vgg").write_text(SPEC)
    graph = load_spec(tmp_path / "edge.vgg")
    export_onnx(graph, tmp_path / "dense.onnx", fully_conv=True, flip=True)  # made where the compiler is
    rng = np.random.default_rng(0)
    for cls in ("a", "b", "c"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / "0.png")
    out = run(runtime_python, "-c", "import networkx", cwd=tmp_path)
    assert out.returncode != 0 and "No module named 'networkx'" in out.stderr
    cli = ("-m", "vggspec")
    done = run(runtime_python, *cli, "predict", "dense.onnx", "data/a/0.png", "--scales", "32,40", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    done = run(runtime_python, *cli, "eval", "dense.onnx", "--data", "data", "--scales", "32", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["images"] == 3
    for args, extra in ((("export", "edge.vgg", "-o", "x.onnx"), "compile"), (("summary", "edge.vgg"), "compile"),
                        (("fuse", "dense.onnx", "dense.onnx", "-o", "f.onnx"), "compile"),
                        # train first misses the compiler, but [compile] alone would only move the error to torch
                        (("train", "edge.vgg", "--data", "data"), "train"), (("data", "digits", "d"), "train")):
        done = run(runtime_python, *cli, *args, cwd=tmp_path)
        assert done.returncode == 1 and f"pip install 'vggspec[{extra}]'" in done.stderr, done.stderr
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr


SERVE_BUDGET_MB = 280  # issue 20: the edge install with the serve extra


def _installed_mb(python: Path) -> float:
    """What the edge environment's packages take on disk (the linked distributions, links followed)."""
    code = ("import os, sys\n"
            "site = [p for p in sys.path if p.endswith('/site')][0]\n"
            "total = 0\n"
            "for top, _, names in os.walk(site, followlinks=True):\n"
            "    total += sum(os.stat(os.path.join(top, n)).st_size for n in names)\n"
            "print(total)")
    return int(subprocess.check_output([str(python), "-c", code], text=True)) / 2**20


@pytest.fixture(scope="module")
def serve_python(tmp_path_factory) -> Path:
    """vggspec[cpu,serve]: the runtime plus the server, as an edge box serving exported files installs it."""
    return _edge_env(tmp_path_factory.mktemp("serve"), ("serve",))


def test_the_server_runs_on_the_edge_install_without_torch_within_its_size(serve_python, tmp_path, child):
    import signal
    import urllib.request

    from vggspec import export_onnx, load_spec

    out = run(serve_python, "-c", "import torch", cwd=tmp_path)
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr
    done = run(serve_python, "-m", "vggspec", "serve", "--help", cwd=tmp_path)
    assert done.returncode == 0 and "Open Inference Protocol" in done.stdout, done.stderr
    size = _installed_mb(serve_python)
    print(f"edge install with serve: {size:.0f} MB")
    assert size <= SERVE_BUDGET_MB, f"{size:.0f} MB"
    (tmp_path / "edge.vgg").write_text(SPEC)
    export_onnx(load_spec(tmp_path / "edge.vgg"), tmp_path / "dense.onnx", fully_conv=True, scores=True)
    with child([str(serve_python), "-m", "vggspec", "serve", "dense.onnx", "--port", "0"], cwd=tmp_path) as proc:
        line = proc.stderr.readline()
        assert "on http://127.0.0.1:" in line, line + proc.stderr.read()
        port = line.split("http://127.0.0.1:")[1].split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/dense", timeout=10) as resp:
            assert json.load(resp)["inputs"][0]["name"] == "input"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
