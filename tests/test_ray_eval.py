"""`vggspec eval --ray`: Ray Data batch inference on a local 2-CPU Ray instance gives exactly the local results."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runtime import conv_model

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("cat", "dog", "eel", "fox")


def _folder(root: Path, per_class: int = 60) -> tuple[Path, list[str]]:
    """Images of several sizes in four label folders, and three files that cannot be used."""
    rng = np.random.default_rng(3)
    for c, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(12, 30, 2)
            a = (rng.random((h, w, 3)) * 120).astype(np.uint8)
            a[:, :, c % 3] += 100  # a colour per class: the posteriors are not all alike
            Image.fromarray(a).save(root / label / f"{i}.png")
    bad = [root / "cat" / "truncated.png", root / "dog" / "text.jpg", root / "eel" / "empty.png"]
    bad[0].write_bytes((root / "cat" / "0.png").read_bytes()[:60])
    bad[1].write_text("not an image")
    bad[2].write_bytes(b"")
    return root, [str(p) for p in bad]


def _eval(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "vggspec", "eval", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_ray_eval_equals_the_local_eval_image_by_image(tmp_path: Path) -> None:
    data, bad = _folder(tmp_path / "val")
    dense, crop = conv_model(tmp_path / "dense.onnx"), conv_model(tmp_path / "crop.onnx", fully_conv=False)
    other = conv_model(tmp_path / "other.onnx", seed=1)
    common = [str(crop), "--dense-model", str(dense), "--ensemble", str(other), "--data", str(data), "--json",
              "--protocol", "dense", "--protocol", "multi-crop", "--protocol", "combined",
              "--scales", "12", "--scales", "12,16,20"]
    local = _eval([*common, "--predictions", "local.csv"], tmp_path)
    distributed = _eval([*common, "--predictions", "ray.csv", "--ray"], tmp_path)
    for run in (local, distributed):
        assert run.returncode == 1, run.stderr[-3000:]  # the three bad files fail, the rest are evaluated
        assert run.stdout.count("\n") == 1  # stdout holds the one JSON object: Ray's own output stays off it
    a, b = json.loads(local.stdout), json.loads(distributed.stdout)
    assert a["rows"] == b["rows"] and a["failed"] == b["failed"] and a["images"] == b["images"] == 4 * 60
    assert sorted(f["image"] for f in b["failed"]) == sorted(bad)
    assert len(a["rows"]) == 6 and 0 < a["rows"][0]["top1_error"] < 75
    rows = [list(csv.reader(open(tmp_path / name, encoding="utf-8"))) for name in ("local.csv", "ray.csv")]
    assert rows[0] == rows[1] and len(rows[0]) == 1 + 4 * 60
    for path in bad:  # one line per unusable file on stderr, as locally
        assert f"{path}: error:" in distributed.stderr


def test_ray_path_keeps_the_local_runtime_free_of_ray() -> None:
    code = ("import sys; import vggspec.runtime, vggspec.cli.runtime; "
            "print('ray' in sys.modules, 'vggspec.runtime.ray_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={
        **os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_the_driver_stops_a_ray_run_whose_model_fails_on_every_image(tmp_path: Path, monkeypatch) -> None:
    """The workers' results, faked: 30 model failures after 20 unreadable files; the driver reports the same
    streak of lines and the same one error as a local run."""
    from vggspec.errors import ModelError
    from vggspec.runtime import ray_eval
    from vggspec.runtime.evaluate import FAILURE_STREAK
    from vggspec.runtime.protocols import Member, Protocol, Runner
    from vggspec.runtime.session import Model

    runner = Runner([Member.of(Model(conv_model(tmp_path / "m.onnx"), "cpu"))], [Protocol("dense", (12,))])
    results = {i: (None, "unreadable", "", True) for i in range(20)}
    results |= {i: (None, "output 'probs' holds NaN", "", False) for i in range(20, 50)}
    monkeypatch.setattr(ray_eval, "_run", lambda *a: results)
    lines: list[str] = []
    with pytest.raises(ModelError, match=f"failed on {FAILURE_STREAK} images in a row, the last with: output"):
        ray_eval.evaluate_on_ray(runner, [(Path(f"{i}.png"), 0) for i in range(50)], None,
                                 on_error=lambda p, m: lines.append(m))
    assert lines == ["unreadable"] * 20 + ["output 'probs' holds NaN"] * FAILURE_STREAK


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_addresses_that_cannot_work_fail_fast_and_say_so(tmp_path: Path) -> None:
    import socket
    import time

    model = conv_model(tmp_path / "m.onnx")
    data, _ = _folder(tmp_path / "data", per_class=1)
    common = [str(model), "--data", str(data)]
    start = time.perf_counter()
    closed = _eval([*common, "--ray", f"127.0.0.1:{_closed_port()}"], tmp_path)
    assert closed.returncode == 1, closed.stderr
    assert "connecting to the Ray cluster at 127.0.0.1:" in closed.stderr and "up to 30 s" in closed.stderr
    assert "cannot connect to 127.0.0.1:" in closed.stderr and "Traceback" not in closed.stderr
    for address, why in (("127.0.0.1:70000", "port 70000 is not from 1 to 65535"), ("head", "is not HOST:PORT"),
                         ("ray://head:http", "the port is not a number")):
        result = _eval([*common, "--ray", address], tmp_path)
        assert result.returncode == 1 and why in result.stderr, result.stderr
    # A port that takes the connection but is not Ray's: bounded by VGGSPEC_RAY_TIMEOUT.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "VGGSPEC_RAY_TIMEOUT": "3"}
        silent = subprocess.run([sys.executable, "-m", "vggspec", "eval", *common, "--ray",
                                 f"127.0.0.1:{server.getsockname()[1]}"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
    assert silent.returncode == 1 and "Traceback" not in silent.stderr, silent.stderr
    assert "up to 3 s" in silent.stderr and "error:" in silent.stderr
    assert time.perf_counter() - start < 60
