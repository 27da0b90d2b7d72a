"""`vggspec serve`: the Open Inference Protocol with Triton's own client, the image endpoint against
`predict --json`, limits and errors, dynamic batching, metrics, reload and the SIGTERM drain.

Servers listen on free 127.0.0.1 ports only: uvicorn in a thread for most tests, a real `vggspec serve`
process for the signals.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from vggspec.serve import Entry, LoadOptions, Metrics, Registry, Settings, create_app  # noqa: E402
from vggspec.serve.batcher import Batcher  # noqa: E402

SPEC = "name: t\ninput: 32x32x3\nclasses: 3\nconv3-8 maxpool conv3-16 maxpool FC-16 FC-3 soft-max\n"
LABELS = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from vggspec import export_onnx, load_spec

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "t.vgg").write_text(SPEC)
    graph = load_spec(tmp / "t.vgg")
    out = {"dense": tmp / "t_dense.onnx", "std": tmp / "t.onnx", "dense1": tmp / "t1_dense.onnx"}
    export_onnx(graph, out["dense"], fully_conv=True, scores=True, labels=LABELS)
    export_onnx(graph, out["std"], labels=LABELS)
    export_onnx(graph, out["dense1"], fully_conv=True, scores=True, labels=LABELS, seed=1)
    rng = np.random.default_rng(3)
    out["image"] = tmp / "img.png"
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(out["image"])
    out["tmp"] = tmp
    return out


class Server:
    """uvicorn serving create_app in a thread, on a free 127.0.0.1 port."""

    def __init__(self, entries: list[str], settings: Settings, delay_ms: float | None = None) -> None:
        import uvicorn

        self.metrics = Metrics()
        delay = settings.max_delay_ms if delay_ms is None else delay_ms
        self.registry = Registry([Entry.parse(e) for e in entries],
                                 LoadOptions("cpu", 1, settings.max_batch, delay / 1000), None,
                                 self.metrics.observe_batch)
        self.app = create_app(self.registry, settings, self.metrics)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio: Nagle off
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.registry.close()


@pytest.fixture(scope="module")
def server(files):
    s = Server([f"t={files['dense']}+{files['std']}", f"std={files['std']}"], Settings(max_delay_ms=2))
    yield s
    s.stop()


def _input(n: int = 2, hw: tuple[int, int] = (32, 40), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, *hw)).astype(np.float32)


def _reference(path: Path, x: np.ndarray) -> list[np.ndarray]:
    from vggspec.runtime import load

    model = load(path, device="cpu")
    return model.run(x, list(model.info.outputs))


# ---------------------------------------------------------------- the protocol, with Triton's client


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_binary_and_json(server, files, binary):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("t")
    meta = client.get_model_metadata("t")
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert [o["name"] for o in meta["outputs"]] == ["probs", "scores"]
    assert client.get_server_metadata()["name"] == "vggspec"
    x = _input()
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probs", "scores")]
    result = client.infer("t", [inp], outputs=outs)
    probs, scores = _reference(files["dense"], x)
    np.testing.assert_allclose(result.as_numpy("probs"), probs, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, atol=1e-5)
    default = client.infer("t", [inp])  # no outputs named: every output, as binary data
    np.testing.assert_allclose(default.as_numpy("probs"), probs, atol=1e-6)
    client.close()


def test_infer_refuses_what_the_model_does_not_take(server):
    x = _input(1, (16, 16))
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    status, _, out = server.request("POST", "/v2/models/t/infer", json.dumps(body).encode())
    assert status == 400 and "at least 32x32" in json.loads(out)["error"]
    for bad, words in ((b"{", "not valid JSON"), (b'{"inputs": [{"name": "x"}]}', "unknown input 'x'"),
                       (b'{"inputs": [{"name": "input", "datatype": "UINT8"}]}', "is FP32, not UINT8")):
        status, _, out = server.request("POST", "/v2/models/t/infer", bad)
        assert status == 400 and words in json.loads(out)["error"], out
    status, _, out = server.request("POST", "/v2/models/nope/infer", b"{}")
    assert status == 404 and json.loads(out) == {"error": "no model named 'nope'"}
    status, _, out = server.request("GET", "/v2/nowhere")
    assert status == 404 and "error" in json.loads(out)


def test_repository_index_and_standard_model_metadata(server):
    status, _, out = server.request("POST", "/v2/repository/index")
    assert status == 200 and json.loads(out) == [{"name": "t", "version": "1", "state": "READY"},
                                                  {"name": "std", "version": "1", "state": "READY"}]
    status, _, out = server.request("GET", "/v2/models/std")
    assert json.loads(out)["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert server.request("GET", "/v2/models/std/versions/2")[0] == 404


# ---------------------------------------------------------------- the image endpoint


@pytest.mark.parametrize("protocol", ["dense", "multi-crop", "combined"])
def test_classify_gives_predicts_posteriors(server, files, protocol):
    from vggspec.cli import main

    image = files["image"].read_bytes()
    status, _, out = server.request("POST", f"/v2/models/t/classify?protocol={protocol}&scales=32,40&flip=true&topk=3",
                                    image, {"Content-Type": "image/png"})
    assert status == 200, out
    served = json.loads(out)
    cli = CliRunner().invoke(main, ["predict", str(files["dense"]), str(files["image"]), "--crop-model",
                                    str(files["std"]), "--protocol", protocol, "--scales", "32,40", "--json",
                                    "--top", "3"])
    assert cli.exit_code == 0, cli.output
    expected = json.loads(cli.output.splitlines()[0])
    assert [t["index"] for t in served["top"]] == [t["index"] for t in expected["top"]]
    assert [t["label"] for t in served["top"]] == [t["label"] for t in expected["top"]]
    for got, want in zip(served["top"], expected["top"], strict=True):
        assert abs(got["probability"] - want["probability"]) <= 1e-6  # predict rounds to 6 decimals
    assert served["protocol"] == protocol and served["scales"] == [32, 40] and served["flip"] is True


def test_classify_multipart_and_heatmap(server, files):
    boundary = "vggspecboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode()
    body = head + files["image"].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, _, out = server.request("POST", "/v2/models/t/classify?heatmap=true&scales=96&flip=false", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, out
    result = json.loads(out)
    heat = result["heatmap"]
    png = Image.open(io.BytesIO(base64.b64decode(heat["png"])))
    assert png.format == "PNG" and png.size == (heat["width"], heat["height"]) and min(png.size) == 96
    assert heat["label"] == result["top"][0]["label"] and len(result["top"]) == 3
    status, _, out = server.request("POST", "/v2/models/t/classify", files["image"].read_bytes(),
                                    {"Content-Type": "application/octet-stream"})
    defaults = json.loads(out)  # the model's own: dense for a dense model, default_scales, default_flip
    assert status == 200 and (defaults["protocol"], defaults["scales"], defaults["flip"]) == ("dense", [32], True)
    assert defaults["heatmap"] is None


def test_classify_errors(server, files):
    png = {"Content-Type": "image/png"}
    cases = [
        ("/v2/models/t/classify", b"not an image at all", png, 400, "not an image"),
        ("/v2/models/t/classify?protocol=best", files["image"].read_bytes(), png, 400, "protocol must be"),
        ("/v2/models/t/classify?scales=8", files["image"].read_bytes(), png, 400, "smaller than the model's input"),
        ("/v2/models/t/classify?topk=x", files["image"].read_bytes(), png, 400, "topk must be"),
        ("/v2/models/std/classify?protocol=dense", files["image"].read_bytes(), png, 400, "fully convolutional"),
        ("/v2/models/t/classify", files["image"].read_bytes(), {"Content-Type": "text/plain"}, 415, "media type"),
        ("/v2/models/x/classify", files["image"].read_bytes(), png, 404, "no model named"),
    ]
    for path, body, headers, status, words in cases:
        got, _, out = server.request("POST", path, body, headers)
        message = json.loads(out)["error"]
        assert got == status and words in message, (path, got, message)
        assert str(files["tmp"]) not in message and "/tmp" not in message and "Traceback" not in message


# ---------------------------------------------------------------- limits


def test_body_limits_413_from_content_length_and_while_streaming(files):
    s = Server([f"t={files['dense']}"], Settings(max_body_mb=0.01))
    try:
        status, _, out = s.request("POST", "/v2/models/t/classify", b"x" * 20_000, {"Content-Type": "image/png"})
        assert status == 413 and "0.01 MB" in json.loads(out)["error"]

        def chunks():
            for _ in range(10):
                yield b"y" * 4000

        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.request("POST", "/v2/models/t/infer", body=chunks(), encode_chunked=True)
        resp = conn.getresponse()
        assert resp.status == 413
        conn.close()
    finally:
        s.stop()


def test_a_full_queue_answers_503_with_retry_after(files):
    # A batch waits up to 400 ms for companions: the first request holds the only slot meanwhile.
    s = Server([f"t={files['dense']}"], Settings(max_queue=1, max_batch=8), delay_ms=400)
    try:
        x = _input(1)
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}).encode()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(s.request, "POST", "/v2/models/t/infer", body)
            time.sleep(0.15)
            status, headers, out = s.request("POST", "/v2/models/t/infer", body)
            assert status == 503 and headers.get("retry-after") == "1" and "busy" in json.loads(out)["error"]
            assert first.result()[0] == 200
        assert s.request("GET", "/v2/health/ready")[0] == 200
    finally:
        s.stop()


def test_api_key_on_every_route_but_health(files):
    s = Server([f"t={files['dense']}"], Settings(api_key="s3cret"))
    try:
        assert s.request("GET", "/v2/health/live")[0] == 200
        for path in ("/v2", "/v2/models/t", "/metrics"):
            status, headers, _ = s.request("GET", path)
            assert status == 401, path
            assert s.request("GET", path, headers={"Authorization": "Bearer wrong"})[0] == 401
            assert s.request("GET", path, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.request("GET", "/v2", headers={"X-API-Key": "s3cret"})[0] == 200
        status, headers, _ = s.request("GET", "/v2", headers={"Origin": "http://elsewhere"})
        assert "access-control-allow-origin" not in {k.lower() for k in headers}  # CORS off by default
    finally:
        s.stop()


# ---------------------------------------------------------------- batching


def test_batcher_runs_same_shapes_together_and_isolates_a_bad_input():
    seen: list[int] = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        if np.isnan(x).any():
            raise ValueError("bad input")
        return [x.sum(axis=(1, 2)), x * 2]

    batcher = Batcher(run, max_batch=8, max_delay_s=0.2, observe=seen.append)
    try:
        items = [np.full((1, 2, 2), i, np.float32) for i in range(3)] + [np.full((1, 2, 2), np.nan, np.float32)]
        items.append(np.ones((2, 3, 3), np.float32))  # another shape: a batch of its own
        futures = [batcher.submit(x) for x in items]
        for i in range(3):
            assert futures[i].result(5)[0].tolist() == [4.0 * i]
        with pytest.raises(ValueError):
            futures[3].result(5)
        assert futures[4].result(5)[0].shape == (2,)
    finally:
        batcher.close()
    assert seen == [4, 1, 1, 1, 1, 2]  # the 4 same-shape inputs failed as one batch, then ran alone


def test_concurrent_requests_share_batches_and_show_in_metrics(files):
    s = Server([f"t={files['dense']}"], Settings(max_batch=8), delay_ms=100)
    try:
        def one(i: int) -> int:
            x = _input(1, seed=i)
            if i == 0:
                x[:] = np.nan  # a NaN posterior: a bad input, and only its own request fails
            blob = x.tobytes()
            header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                             "parameters": {"binary_data_size": len(blob)}}]}).encode()
            return s.request("POST", "/v2/models/t/infer", header + blob,
                             {"Inference-Header-Content-Length": str(len(header))})[0]

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(one, range(6)))
        assert statuses == [400] + [200] * 5, statuses
        text = s.request("GET", "/metrics")[2].decode()
        assert 'vggspec_requests_total{model="t",route="/v2/models/{name}/infer",status="200"}' in text
        assert "vggspec_queue_depth 0.0" in text and "vggspec_request_seconds_bucket" in text
        count = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith('vggspec_batch_size_count{model="t"}')))
        total = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith('vggspec_batch_size_sum{model="t"}')))
        assert total / count > 1  # rows per onnxruntime run: requests were batched
    finally:
        s.stop()


# ---------------------------------------------------------------- reload and drain


def test_reload_swaps_the_model_without_failing_a_request(files, tmp_path):
    import shutil

    path = tmp_path / "m.onnx"
    shutil.copy(files["dense"], path)
    s = Server([f"m={path}"], Settings(max_delay_ms=1))
    try:
        x = _input(1)
        body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}).encode()
        stop, statuses = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                statuses.append(s.request("POST", "/v2/models/m/infer", body)[0])

        before = json.loads(s.request("POST", "/v2/models/m/infer", body)[2])["outputs"][0]["data"]
        with ThreadPoolExecutor(3) as pool:
            workers = [pool.submit(load) for _ in range(3)]
            time.sleep(0.2)
            shutil.copy(files["dense1"], tmp_path / "new.onnx")
            os.replace(tmp_path / "new.onnx", path)  # a replaced model file
            for _ in range(3):
                assert s.request("POST", "/v2/repository/models/m/load")[0] == 200
            time.sleep(0.2)
            stop.set()
            for w in workers:
                w.result()
        after = json.loads(s.request("POST", "/v2/models/m/infer", body)[2])["outputs"][0]["data"]
        assert statuses and set(statuses) == {200}
        assert not np.allclose(before, after)
        path.write_bytes(b"broken")
        status, _, out = s.request("POST", "/v2/repository/models/m/load")
        assert status == 400 and "still served" in json.loads(out)["error"] and str(tmp_path) not in out.decode()
        assert s.request("POST", "/v2/models/m/infer", body)[0] == 200
        assert s.request("POST", "/v2/repository/models/other/load")[0] == 404
    finally:
        s.stop()


def test_sigterm_drains_in_flight_requests_and_exits_0(files):
    proc = subprocess.Popen([sys.executable, "-m", "vggspec", "serve", f"t={files['dense']}", "--port", "0",
                             "--grace", "5", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "vggspec serve: t on http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        image = files["image"].read_bytes()
        half = len(image) // 2
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(f"POST /v2/models/t/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     f"Content-Length: {len(image)}\r\n\r\n".encode() + image[:half])
        time.sleep(0.5)  # the request is in flight: its body is half there
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections once draining
            socket.create_connection(("127.0.0.1", port), timeout=2).sendall(b"GET /v2 HTTP/1.1\r\n\r\n")
            raise OSError("connected")  # pragma: no cover (refused above on Linux)
        sock.sendall(image[half:])
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["top"][0]["label"] in LABELS
        assert proc.wait(timeout=8) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
