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
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from vggspec.serve import Entry, LoadOptions, Metrics, Registry, Settings, create_app  # noqa: E402
from vggspec.serve.batcher import Batcher  # noqa: E402
from vggspec.serve.protocol import uvicorn_config  # noqa: E402

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

    def __init__(self, entries: list[str], settings: Settings, delay_ms: float | None = None,
                 export: Any = None, parser: str = "auto") -> None:
        import uvicorn

        self.metrics = Metrics()
        delay = settings.max_delay_ms if delay_ms is None else delay_ms
        self.registry = Registry([Entry.parse(e) for e in entries],
                                 LoadOptions("cpu", 1, settings.max_batch, delay / 1000), export,
                                 self.metrics.observe_batch)
        self.app = create_app(self.registry, settings, self.metrics)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio: Nagle off
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(self.app, settings.timeout_s, settings.max_queue, 2,
                                                    self.metrics.observe_header_timeout, parser, log_level="error"))
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
            _wait_for_queue_depth(s, 1)  # a fixed sleep raced the first request on a loaded machine
            status, headers, out = s.request("POST", "/v2/models/t/infer", body)
            assert status == 503 and headers.get("retry-after") == "1" and "busy" in json.loads(out)["error"]
            assert first.result()[0] == 200
        assert s.request("GET", "/v2/health/ready")[0] == 200
    finally:
        s.stop()


def _wait_for_queue_depth(s: Server, depth: int, timeout_s: float = 10.0) -> None:
    """Until the server's own gauge says `depth` requests hold a slot of its queue."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        families = text_string_to_metric_families(s.request("GET", "/metrics")[2].decode())
        if any(f.name == "vggspec_queue_depth" and f.samples[0].value == depth for f in families):
            return
        time.sleep(0.005)
    raise AssertionError(f"the queue never held {depth} request(s) in {timeout_s} s")


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


def test_without_a_delay_a_batch_is_what_queued_while_the_last_one_ran():
    seen: list[int] = []
    started, release = threading.Event(), threading.Event()

    def run(x: np.ndarray) -> list[np.ndarray]:
        started.set()
        release.wait(5)  # the first run holds the engine while the others queue
        return [x.sum(axis=(1, 2))]

    batcher = Batcher(run, max_batch=8, observe=seen.append)  # the default: no delay
    try:
        first = batcher.submit(np.zeros((1, 2, 2), np.float32))
        assert started.wait(5)  # it ran alone, at once: nothing else was queued
        queued = [batcher.submit(np.full((1, 2, 2), i, np.float32)) for i in range(1, 6)]
        release.set()
        assert first.result(5)[0].tolist() == [0.0]
        assert [f.result(5)[0].tolist() for f in queued] == [[4.0 * i] for i in range(1, 6)]
    finally:
        batcher.close()
    assert seen == [1, 5]


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


def test_sigterm_drains_in_flight_requests_and_exits_0(files, child):
    with child([sys.executable, "-m", "vggspec", "serve", f"t={files['dense']}", "--port", "0", "--grace", "5",
                "--device", "cpu"]) as proc:
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


# ---------------------------------------------------------------- issue 20's promises: slow clients, timeouts


def _raw(port: int, head: str, body: bytes = b"") -> socket.socket:
    """A raw connection that has sent `head` (request line and headers) and the first bytes of a body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode() + b"\r\n" + body)
    return sock


def _reply(sock: socket.socket) -> bytes:
    """What the server sends before it closes the connection or stops sending for the socket's timeout."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                break
    except TimeoutError:
        pass
    return data


def _queue_depth(s: Server) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(s.request("GET", "/metrics")[2].decode())}
    return families["vggspec_queue_depth"].samples[0].value


def _json_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                   "data": x.ravel().tolist()}]}).encode()


@pytest.mark.parametrize("route", ["/v2/models/t/classify", "/v2/models/t/infer"])
def test_a_stalled_upload_blocks_nobody_and_gets_408(files, route):
    s = Server([f"t={files['dense']}"], Settings(timeout_s=1.0, max_queue=2))
    try:
        image = files["image"].read_bytes()
        start = time.monotonic()
        stalled = [_raw(s.port, f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                f"Content-Length: {len(image)}\r\n", image[:10]) for _ in range(3)]
        status, _, out = s.request("POST", "/v2/models/t/classify", image, {"Content-Type": "image/png"})
        assert status == 200 and time.monotonic() - start < 0.9, out  # answered while the three stall
        for sock in stalled:
            sock.settimeout(5)
            reply = _reply(sock)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert "did not arrive within 1 s" in json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
            sock.settimeout(0.5)
            assert sock.recv(1) == b""  # and the connection is closed at once, its unread body dropped
            sock.close()
        assert time.monotonic() - start < 4
        assert _queue_depth(s) == 0
        with ThreadPoolExecutor(2) as pool:  # --max-queue requests at once: no slot was leaked
            results = list(pool.map(lambda _: s.request("POST", "/v2/models/t/infer", _json_body(_input(1))),
                                    range(2)))
        assert [r[0] for r in results] == [200, 200]
    finally:
        s.stop()


def test_a_trickling_upload_is_cut_off_at_the_timeout(files):
    s = Server([f"t={files['dense']}"], Settings(timeout_s=1.0))
    try:
        image = files["image"].read_bytes()
        sock = _raw(s.port, f"POST /v2/models/t/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                            f"Content-Length: {len(image)}\r\n")
        start = time.monotonic()
        sock.settimeout(0.2)
        reply = b""
        for i in range(40):  # a byte every 0.1 s: never idle long, never done
            try:
                sock.sendall(image[i:i + 1])
            except OSError:  # the server closed the connection
                break
            try:
                reply += sock.recv(65536)
                break
            except TimeoutError:
                pass
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3, reply[:200]
        assert _queue_depth(s) == 0
    finally:
        s.stop()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_client_stalled_inside_its_headers_is_closed_at_the_timeout(files, parser):
    # uvicorn bounds keep-alive silence but not a request's headers; serve.protocol adds that deadline, to
    # either of uvicorn's parsers (httptools, what the serve extra installs, and h11 without it).
    s = Server([f"t={files['dense']}"], Settings(timeout_s=0.5), parser=parser)
    try:
        stalled = _raw(s.port, "GET /v2 HTTP/1.1\r\nHost: x")  # the blank line that ends the headers never comes
        silent = socket.create_connection(("127.0.0.1", s.port), timeout=10)  # connects, sends nothing
        assert s.request("GET", "/v2/health/ready")[0] == 200  # nobody else waits meanwhile
        for sock in (stalled, silent):
            sock.settimeout(3)
            reply = sock.recv(65536)
            sock.close()
            if sock is stalled:
                assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in reply, reply
            else:
                assert reply == b"", reply  # closed without a word: it asked nothing
        # A keep-alive client whose second request stalls gets the same deadline.
        again = _raw(s.port, "GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\nGET /v2 HTTP/1.1\r\nHost: x")
        again.settimeout(3)
        data = b""
        while b"408" not in data:
            chunk = again.recv(65536)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data, data
        again.close()
        metrics = s.request("GET", "/metrics")[2].decode()
        assert 'vggspec_requests_total{model="",route="(headers)",status="408"} 2.0' in metrics  # stalled, again
    finally:
        s.stop()

def test_a_client_gone_mid_body_leaks_no_slot(files):
    s = Server([f"t={files['dense']}"], Settings(timeout_s=2.0, max_queue=1))
    try:
        image = files["image"].read_bytes()
        for route in ("/v2/models/t/classify", "/v2/models/t/infer"):
            for _ in range(3):
                sock = _raw(s.port, f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                                    f"Content-Length: {len(image)}\r\n", image[: len(image) // 2])
                sock.close()
        time.sleep(0.2)
        assert _queue_depth(s) == 0
        status, _, out = s.request("POST", "/v2/models/t/classify", image, {"Content-Type": "image/png"})
        assert status == 200, out  # the only slot is free
        assert s.request("POST", "/v2/models/t/infer", _json_body(_input(1)))[0] == 200
    finally:
        s.stop()


def test_an_inference_slower_than_the_timeout_gets_504_and_frees_its_slot(files, monkeypatch):
    s = Server([f"t={files['dense']}"], Settings(timeout_s=0.5, max_queue=2))
    try:
        model = s.registry.get("t").primary.model
        run = model.run

        def slow(*args, **kwargs):
            time.sleep(1.0)
            return run(*args, **kwargs)

        monkeypatch.setattr(model, "run", slow)
        start = time.monotonic()
        status, _, out = s.request("POST", "/v2/models/t/infer", _json_body(_input(1)))
        assert status == 504 and json.loads(out) == {"error": "no answer within 0.5 s"}
        assert time.monotonic() - start < 0.9
        status, _, out = s.request("POST", "/v2/models/t/classify", files["image"].read_bytes(),
                                   {"Content-Type": "image/png"})
        assert status == 504 and json.loads(out) == {"error": "no answer within 0.5 s"}
        monkeypatch.setattr(model, "run", run)
        deadline = time.monotonic() + 5  # the slots are held until the slow runs are really done
        while _queue_depth(s) != 0:
            assert time.monotonic() < deadline, "a timed-out request kept its queue slot"
            time.sleep(0.05)
        assert s.request("POST", "/v2/models/t/infer", _json_body(_input(1)))[0] == 200
    finally:
        s.stop()


# ---------------------------------------------------------------- CORS


def _preflight(s: Server, origin: str) -> tuple[int, dict[str, str]]:
    status, headers, out = s.request("OPTIONS", "/v2/models/t/infer", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    if status >= 400:  # refused: one JSON error line, as every other refusal
        assert list(json.loads(out)) == ["error"], out
    return status, {k.lower(): v for k, v in headers.items()}


def _allowed(headers: dict[str, str]) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin")


def test_cors_is_off_by_default(server):
    assert _allowed(server.request("GET", "/v2/models/t", headers={"Origin": "http://page.example"})[1]) is None
    status, headers = _preflight(server, "http://page.example")
    assert status >= 400 and "access-control-allow-origin" not in headers
    assert "access-control-allow-methods" not in headers


def test_cors_origin_allows_that_origin_only(files):
    good, evil = "http://page.example", "http://evil.example"
    s = Server([f"t={files['dense']}"], Settings(cors_origins=(good,), api_key="k"))
    try:
        key = {"Authorization": "Bearer k"}
        assert _allowed(s.request("GET", "/v2/models/t", headers={"Origin": good, **key})[1]) == good
        assert _allowed(s.request("GET", "/v2/models/t", headers={"Origin": evil, **key})[1]) is None
        status, headers = _preflight(s, good)  # a preflight carries no key: it is answered without one
        assert status == 200 and headers["access-control-allow-origin"] == good
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers = _preflight(s, evil)
        assert status == 400 and "access-control-allow-origin" not in headers
        assert headers["content-type"] == "application/json"
        status, headers, out = s.request("GET", "/v2/models/t", headers={"Origin": good})
        assert status == 401 and _allowed(headers) == good  # the page can read why it was refused
        assert "API key" in json.loads(out)["error"]
    finally:
        s.stop()


# ---------------------------------------------------------------- errors say what, never how


def _infer_body(**fields) -> bytes:
    spec = {"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}
    return json.dumps({"inputs": [{**spec, **fields}]}).encode()


BAD_INFERS = [  # (body, words in the error): each a client's mistake, each once a 500 or a repr
    (b"{", "not valid JSON"),
    (b"[" * 50_000, "nested too deeply"),
    (b'{"inputs": {"name": "input"}}', "'inputs' list"),
    (_infer_body(datatype="INT64"), "is FP32, not INT64"),
    (_infer_body(datatype=["FP32"]), 'not ["FP32"]'),
    (_infer_body(shape=[1, 3, 32, 32, 1]), "not a 4-d batch"),
    (_infer_body(shape=[True, 3, 32, 32]), "shape [true, 3, 32, 32]"),
    (_infer_body(shape=[1, 1, 32, 32]), "has 1 channels"),
    (_infer_body(shape=[1, 3, 10 ** 300, 32]), "megapixel limit"),
    (_infer_body(data=[10 ** 400] + [0] * 3071), "must be numbers"),
    (_infer_body(data="abc"), "must be numbers"),
    (_infer_body(data=[1.0] * 5), "holds 5 values"),
    (_infer_body(parameters="binary"), "'parameters' must be a JSON object"),
    (json.dumps({"inputs": json.loads(_infer_body())["inputs"],
                 "outputs": [{"name": "probs", "parameters": [1]}]}).encode(), "'parameters' must be a JSON object"),
    (json.dumps({"inputs": json.loads(_infer_body())["inputs"], "outputs": [{"name": "logits"}]}).encode(),
     "unknown output 'logits'"),
]
BAD_QUERIES = [("topk=0", "topk must be from 1 to 1000"), ("topk=99999999999999999999", "topk must be"),
               ("scales=a,b", "each scale must be a whole number"), ("scales=", "scales must be"),
               ("flip=maybe", "flip must be true or false"), ("heatmap=2", "heatmap must be true or false"),
               ("protocol=%00", "protocol must be one of"), ("size=3", "unknown query parameter 'size'")]


def _plain_error(status: int, headers: dict[str, str], out: bytes, where: str) -> str:
    """The one line of a JSON error body, after checking it tells nothing of the server's insides."""
    assert 400 <= status < 500, (where, status, out)
    assert {k.lower(): v for k, v in headers.items()}["content-type"] == "application/json", where
    body = json.loads(out)
    assert list(body) == ["error"] and isinstance(body["error"], str), (where, body)
    for leak in ("Traceback", "/tmp", "/work", "site-packages", ".py", "Error:", "Error(", "<", "None", "True"):
        assert leak not in body["error"], (where, body["error"])
    return body["error"]


def test_bad_requests_get_one_plain_json_line(server, files, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="vggspec.serve")
    for body, words in BAD_INFERS:
        status, headers, out = server.request("POST", "/v2/models/t/infer", body)
        assert words in _plain_error(status, headers, out, body[:60].decode()), (body[:60], out)
    image = files["image"].read_bytes()
    for query, words in BAD_QUERIES:
        status, headers, out = server.request("POST", f"/v2/models/t/classify?{query}", image,
                                              {"Content-Type": "image/png"})
        assert words in _plain_error(status, headers, out, query), (query, out)
    for method, path, words in (("POST", "/v2/models/t%0Anope/infer", "no model named 't?nope'"),
                                ("POST", "/v2/models/" + "a" * 5000 + "/infer", "..."),
                                ("GET", "/v2/models/t/infer", "Method Not Allowed"),
                                ("GET", "/static/..%2f..%2fapp.py", "Not Found")):
        status, headers, out = server.request(method, path, b"{}" if method == "POST" else None)
        assert words in _plain_error(status, headers, out, path[:40]) and len(out) < 300, (path[:40], out)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no internal error, no traceback


def test_a_bug_is_a_500_logged_once_with_its_traceback(files, monkeypatch, caplog):
    import logging

    from vggspec.serve import app as serve_app

    def broken(request):
        raise ZeroDivisionError("a bug, not the client's mistake")

    monkeypatch.setattr(serve_app, "_served_name", broken)
    s = Server([f"t={files['std']}"], Settings())
    try:
        caplog.set_level(logging.INFO)
        status, headers, out = s.request("POST", "/v2/models/t/infer", b"{}")
        assert status == 500 and json.loads(out) == {"error": "internal error"}  # nothing internal echoed
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info and "internal error on POST" in errors[0].getMessage()
        assert 'route="/v2/models/{name}/infer",status="500"} 1.0' in s.request("GET", "/metrics")[2].decode()
        assert s.request("GET", "/v2/health/ready")[0] == 200  # the server goes on
    finally:
        s.stop()


# ---------------------------------------------------------------- MODEL forms: checkpoint, ensemble, two forms


def _classify_and_predict(s: Server, name: str, files: dict[str, Path], query: str, cli_args: list[str]) -> None:
    """The served top-k equals `vggspec predict --json` on the same files to 1e-6 (predict rounds to 6 places)."""
    from vggspec.cli import main

    status, _, out = s.request("POST", f"/v2/models/{name}/classify?{query}&topk=3", files["image"].read_bytes(),
                               {"Content-Type": "image/png"})
    assert status == 200, out
    served = json.loads(out)
    cli = CliRunner().invoke(main, ["predict", *cli_args, str(files["image"]), "--json", "--top", "3"])
    assert cli.exit_code == 0, cli.output
    expected = json.loads(next(line for line in cli.output.splitlines() if line.startswith("{")))
    assert [t["index"] for t in served["top"]] == [t["index"] for t in expected["top"]]
    for got, want in zip(served["top"], expected["top"], strict=True):
        assert abs(got["probability"] - want["probability"]) <= 1e-6, (got, want)


def test_a_checkpoint_is_served_in_both_forms_as_predict_runs_it(files):
    from vggspec import checkpoints
    from vggspec.cli.runtime import _export_checkpoint
    from vggspec.weights import save_checkpoint

    ckpt = files["tmp"] / "ck.safetensors"
    if not ckpt.exists():
        save_checkpoint(ckpt, checkpoints.init_checkpoint(files["tmp"] / "t.vgg", "xavier", seed=4).checkpoint)
    s = Server([f"ck={ckpt}"], Settings(), export=_export_checkpoint)
    try:
        scratch = list(s.registry.get("ck").scratch)
        assert scratch and all(folder.is_dir() for folder in scratch)  # its forms, exported at start
        status, _, out = s.request("GET", "/v2/models/ck")
        assert status == 200 and json.loads(out)["parameters"]["fully_conv"] is True
        for protocol in ("dense", "combined"):  # combined needs both forms
            _classify_and_predict(s, "ck", files, f"protocol={protocol}&scales=32,40",
                                  [str(ckpt), "--protocol", protocol, "--scales", "32,40"])
    finally:
        s.stop()
    assert not any(folder.exists() for folder in scratch)  # and removed with the model


def test_an_ensemble_classifies_as_predicts_fusion(files):
    s = Server([f"ens={files['dense']},{files['dense1']}"], Settings())
    try:
        _classify_and_predict(s, "ens", files, "protocol=dense&scales=32,40&flip=true",
                              [str(files["dense"]), "--ensemble", str(files["dense1"]), "--protocol", "dense",
                               "--scales", "32,40", "--flip"])
        status, _, out = s.request("POST", "/v2/models/ens/infer", _json_body(_input(1)))
        assert status == 400 and "ensemble" in json.loads(out)["error"]  # its members' inputs are their own
    finally:
        s.stop()


# ---------------------------------------------------------------- one log line per request, and /metrics


def _log_lines(caplog: Any, count: int) -> list[str]:
    """The server's request lines, once `count` have come (each is written just after its response)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "vggspec.serve" and " route=" in r.getMessage()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines


def test_one_log_line_per_request_with_status_model_route_latency(files, caplog):
    import logging
    import re

    caplog.set_level(logging.INFO, logger="vggspec.serve")
    s = Server([f"t={files['dense']}"], Settings(cors_origins=("http://page.example",)))
    try:
        sent = [("POST", "/v2/models/t/infer", _json_body(_input(1)), 200, "t", "/v2/models/{name}/infer"),
                ("POST", "/v2/models/t/infer", b"{", 400, "t", "/v2/models/{name}/infer"),
                ("GET", "/v2/models/nope", None, 404, "-", "/v2/models/{name}"),
                ("GET", "/v2/models/t%0A127.0.0.1:1%20%22GET%20x%22%20200", None, 404, "-", "/v2/models/{name}"),
                ("GET", "/nowhere", None, 404, "-", "unmatched")]
        for method, path, body, status, _, _ in sent:
            assert s.request(method, path, body)[0] == status
        status, _ = _preflight(s, "http://page.example")  # answered by the CORS layer: logged all the same
        assert status == 200
        lines = _log_lines(caplog, len(sent) + 1)
        assert len(lines) == len(sent) + 1, lines
        pattern = re.compile(r'^127\.0\.0\.1:\d+ "(\S+) (.+)" (\d{3}) (\d+\.\d)ms model=(\S+) route=(\S+)$')
        for line, (method, _, _, status, model, route) in zip(lines, sent, strict=False):
            match = pattern.match(line)
            assert match and "\n" not in line, line
            assert (match[1], int(match[3]), match[5], match[6]) == (method, status, model, route), line
            assert float(match[4]) >= 0
        assert "t?127.0.0.1" in lines[3]  # a newline in a path cannot forge a line of its own
        assert pattern.match(lines[-1])[1] == "OPTIONS" and pattern.match(lines[-1])[3] == "200"
    finally:
        s.stop()


def test_metrics_count_requests_latency_batches_and_queue(files):
    from prometheus_client.parser import text_string_to_metric_families

    s = Server([f"t={files['dense']}"], Settings())
    try:
        for body in (_json_body(_input(1)), _json_body(_input(2)), b"{"):
            s.request("POST", "/v2/models/t/infer", body)
        s.request("GET", "/v2/models/nope")
        s.request("GET", "/v2/models/" + "x" * 60)
        families = {f.name: f for f in text_string_to_metric_families(s.request("GET", "/metrics")[2].decode())}
        requests = {(x.labels["model"], x.labels["route"], x.labels["status"]): x.value
                    for x in families["vggspec_requests"].samples if x.name == "vggspec_requests_total"}
        infer = "/v2/models/{name}/infer"
        assert requests[("t", infer, "200")] == 2 and requests[("t", infer, "400")] == 1
        assert requests[("", "/v2/models/{name}", "404")] == 2  # unknown names share one series: bounded labels
        assert not any(model not in ("", "t") for model, _, _ in requests)
        latency = {x.name: x for x in families["vggspec_request_seconds"].samples
                   if x.labels.get("route") == infer and x.labels.get("le") in (None, "+Inf")}
        assert latency["vggspec_request_seconds_count"].value == 3
        assert latency["vggspec_request_seconds_bucket"].value == 3 and latency["vggspec_request_seconds_sum"].value > 0
        batch = {x.name: x.value for x in families["vggspec_batch_size"].samples if x.labels.get("model") == "t"}
        assert batch["vggspec_batch_size_count"] == 2 and batch["vggspec_batch_size_sum"] == 3  # rows 1 and 2
        assert families["vggspec_queue_depth"].samples[0].value == 0
        assert families["vggspec_rejected"].samples[0].value == 0
    finally:
        s.stop()


# ---------------------------------------------------------------- the help's examples


def test_every_help_example_is_a_valid_command_line():
    import shlex

    from vggspec.cli import main
    from vggspec.cli.serve import serve

    shown = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200)
    assert shown.exit_code == 0
    lines = shown.output.split("Examples:", 1)[1].strip().splitlines()
    assert len(lines) >= 4
    for line in lines:
        words = shlex.split(line)
        assert words[:2] == ["vggspec", "serve"], line
        ctx = serve.make_context("serve", words[2:], resilient_parsing=False)  # parsed, the server not started
        entries = [Entry.parse(m) for m in ctx.params["models"]]
        assert entries and all(e.paths for e in entries), line
    entries = {e.name: e for line in lines for e in map(Entry.parse, serve.make_context(
        "serve", shlex.split(line)[2:]).params["models"])}
    assert len(entries["ens"].members) == 2 and entries["vgg"].members == (("vgg_dense.onnx", "vgg.onnx"),)


def test_http_httptools_without_httptools_is_a_one_line_error(files, monkeypatch):
    from vggspec.cli import main
    from vggspec.serve import protocol

    monkeypatch.setattr(protocol, "httptools_deadline", lambda: None)
    result = CliRunner().invoke(main, ["serve", str(files["dense"]), "--port", "0", "--http", "httptools"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--http httptools needs httptools, which is not installed" in result.output
    assert "pip install 'vggspec[serve]'" in result.output
