"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes `import torch` (and torchvision) fail, as on an edge box without them.
BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


def _python(args: list[str], cwd: Path | None, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)


def _run_without_torch(code: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter where torch cannot be imported."""
    return _python(["-c", BLOCK_TORCH + textwrap.dedent(code)], cwd, timeout)


@pytest.fixture
def run_without_torch():
    return _run_without_torch


def _vggspec_cli(*args: str, cwd: Path | None = None, without_torch: bool = False, timeout: float = 600):
    """Run `python -m vggspec ARGS` in a subprocess, optionally where torch cannot be imported."""
    if without_torch:
        code = f"import sys, runpy\nsys.argv = ['vggspec', *{list(args)!r}]\n"
        code += "runpy.run_module('vggspec', run_name='__main__')"
        return _run_without_torch(code, cwd=cwd, timeout=timeout)
    return _python(["-m", "vggspec", *args], cwd, timeout)


@pytest.fixture
def vggspec_cli():
    return _vggspec_cli


@contextmanager
def _child(args: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """A child process (a `vggspec serve`) with its stderr piped as text; killed if the test left it running,
    whatever the test's outcome, and its pipe closed."""
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture
def child():
    return _child


# A one-channel spec and a 16x16x1 one, shared by the command-line tests of several commands.
GRAY = ("name: gray\ninput: 16x16x1\nclasses: 3\nmean: 0.5\nstd: 0.25\n"
        "conv3-4 maxpool conv3-4 maxpool FC-8 FC-3 soft-max\n")
TINY_GRAY = "input: 16x16x1\nclasses: 3\nscale: 1/255\nconv3-4 maxpool conv3-4 maxpool FC-8 FC-3 soft-max\n"


@pytest.fixture
def gray(tmp_path: Path) -> tuple[Path, Path]:
    """A one-channel spec and a checkpoint of it."""
    from vggspec.graph.load import load_spec
    from vggspec.weights import Checkpoint, init_weights, save_checkpoint

    spec = tmp_path / "gray.vgg"
    spec.write_text(GRAY)
    graph = load_spec(spec)
    ckpt = tmp_path / "gray.safetensors"
    save_checkpoint(ckpt, Checkpoint(init_weights(graph), GRAY, graph.meta.preprocessing))
    return spec, ckpt


@pytest.fixture
def tiny_gray_spec(tmp_path: Path) -> Path:
    """TMP/t.vgg: a 16x16x1 spec of 3 classes, pixels scaled to 0..1."""
    spec = tmp_path / "t.vgg"
    spec.write_text(TINY_GRAY)
    return spec


def _gray_images(folder: Path, n: int = 2, seed: int = 0) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"{i}.png" for i in range(n)]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (18, 20), np.uint8)).save(p)
    return paths


@pytest.fixture
def gray_images():
    """gray_images(folder, n=2, seed=0): n random 18x20 grayscale PNGs written into folder."""
    return _gray_images
