"""Shared fixtures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

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
