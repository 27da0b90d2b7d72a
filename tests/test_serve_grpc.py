"""`vggspec serve --grpc-port`: the Open Inference Protocol over gRPC, with Triton's own client (tritonclient.grpc),
against the same models, queue, limits, API key and metrics as HTTP. Servers listen on free 127.0.0.1 ports.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette")
grpc = pytest.importorskip("grpc")
grpcclient = pytest.importorskip("tritonclient.grpc")

from tritonclient.utils import InferenceServerException  # noqa: E402

from vggspec.serve import Entry, LoadOptions, Metrics, Registry, Settings, create_app  # noqa: E402
from vggspec.serve.grpc_service import GrpcServer, messages  # noqa: E402

SPEC = "name: t\ninput: 32x32x3\nclasses: 3\nconv3-8 maxpool conv3-16 maxpool FC-16 FC-3 soft-max\n"
LABELS = ["ant", "bee", "cat"]
PROTO = Path(__file__).resolve().parents[1] / "vggspec" / "serve" / "proto"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from vggspec import export_onnx, load_spec

    tmp = tmp_path_factory.mktemp("grpc")
    (tmp / "t.vgg").write_text(SPEC)
    graph = load_spec(tmp / "t.vgg")
    out = {"dense": tmp / "t_dense.onnx", "std": tmp / "t.onnx"}
    export_onnx(graph, out["dense"], fully_conv=True, scores=True, labels=LABELS)
    export_onnx(graph, out["std"], labels=LABELS)
    return out


class Served:
    """The gRPC service alone over an app's State (no HTTP listener is needed to speak gRPC)."""

    def __init__(self, entries: list[str], settings: Settings) -> None:
        self.metrics = Metrics()
        self.registry = Registry([Entry.parse(e) for e in entries],
                                 LoadOptions("cpu", 1, settings.max_batch, settings.max_delay_ms / 1000),
                                 observe=self.metrics.observe_batch)
        self.app = create_app(self.registry, settings, self.metrics)
        self.state = self.app.state.vggspec
        self.rpc = GrpcServer(settings, "127.0.0.1", 0)
        self.rpc.start(self.state)
        self.url = f"127.0.0.1:{self.rpc.port}"

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.url)

    def stop(self) -> None:
        self.rpc.stop(0).wait(5)
        self.state.close()
        self.registry.close()


@pytest.fixture(scope="module")
def served(files):
    s = Served([f"t={files['dense']}", f"std={files['std']}"], Settings(max_delay_ms=2, max_body_mb=1))
    yield s
    s.stop()


def _input(n: int = 2, hw: tuple[int, int] = (32, 40), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, *hw)).astype(np.float32)


def _reference(path: Path, x: np.ndarray) -> list[np.ndarray]:
    from vggspec.runtime import load

    model = load(path, device="cpu")
    return model.run(x, list(model.info.outputs))


def _infer_input(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput(name, list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    return inp


# ---------------------------------------------------------------- the messages are Triton's


def _fields(descriptor) -> dict:
    def repeated(f) -> bool:  # protobuf 6 dropped `label`
        return f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED

    return {f.name: (f.number, f.type, repeated(f), f.message_type.name if f.message_type else None)
            for f in descriptor.fields}


def test_every_message_matches_tritons_own_field_for_field():
    from tritonclient.grpc import service_pb2

    ours = messages()
    assert len(ours) == 12
    todo = [(cls.DESCRIPTOR, getattr(service_pb2, name).DESCRIPTOR) for name, cls in ours.items()]
    seen = 0
    while todo:
        mine, theirs = todo.pop()
        theirs_fields = _fields(theirs)
        for name, spec in _fields(mine).items():
            assert theirs_fields.get(name) == spec, f"{mine.full_name}.{name}: ours {spec}, Triton's " \
                                                    f"{theirs_fields.get(name)}"
            seen += 1
        todo += [(m, theirs.nested_types_by_name[m.name]) for m in mine.nested_types]
        todo += [(f.message_type, theirs.fields_by_name[f.name].message_type)
                 for f in mine.fields if f.message_type and f.message_type.name == "InferParameter"]
    assert seen > 60


def test_the_shipped_descriptor_is_the_proto_compiled():
    protoc = pytest.importorskip("grpc_tools.protoc")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fresh.pb"
        assert protoc.main(["protoc", f"-I{PROTO}", f"--descriptor_set_out={out}",
                            str(PROTO / "grpc_predict_v2.proto")]) == 0
        assert out.read_bytes() == (PROTO / "grpc_predict_v2.pb").read_bytes(), \
            "regenerate grpc_predict_v2.pb (the command is at the top of the .proto)"


# ---------------------------------------------------------------- tritonclient.grpc against the server


def test_tritonclient_grpc_health_metadata_and_infer(served, files):
    client = served.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("t")
    assert client.get_server_metadata().name == "vggspec"
    meta = client.get_model_metadata("t")
    assert meta.platform == "onnxruntime_onnx" and list(meta.versions) == ["1"]
    assert meta.inputs[0].name == "input" and list(meta.inputs[0].shape) == [-1, 3, -1, -1]
    assert [o.name for o in meta.outputs] == ["probs", "scores"]
    x = _input()
    probs, scores = _reference(files["dense"], x)
    result = client.infer("t", [_infer_input(x)], request_id="r7")
    np.testing.assert_allclose(result.as_numpy("probs"), probs, atol=1e-6)
    np.testing.assert_allclose(result.as_numpy("scores"), scores, atol=1e-5)
    assert result.get_response().id == "r7"
    only = client.infer("t", [_infer_input(x)], outputs=[grpcclient.InferRequestedOutput("probs")])
    assert only.as_numpy("scores") is None
    np.testing.assert_allclose(only.as_numpy("probs"), probs, atol=1e-6)
    client.close()


def test_typed_contents_give_what_raw_bytes_give(served, files):
    m = messages()
    x = _input(1, (32, 32))  # 'std' is the standard form: exactly 32 x 32
    request = m["ModelInferRequest"](model_name="std")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    with grpc.insecure_channel(served.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=m["ModelInferRequest"].SerializeToString,
                                   response_deserializer=m["ModelInferResponse"].FromString)
        response = call(request, timeout=30)
    probs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(probs, _reference(files["std"], x)[0], atol=1e-6)


@pytest.mark.parametrize("case, code, words", [
    ("model", "StatusCode.NOT_FOUND", "no model named 'nope'"),
    ("name", "StatusCode.INVALID_ARGUMENT", "unknown input 'pixels'"),
    ("datatype", "StatusCode.INVALID_ARGUMENT", "is FP32, not FP64"),
    ("shape", "StatusCode.INVALID_ARGUMENT", "has 1 channels; the model takes 3"),
    ("size", "StatusCode.INVALID_ARGUMENT", "the model takes exactly 32x32"),
    ("output", "StatusCode.INVALID_ARGUMENT", "unknown output 'logits'"),
    ("large", "StatusCode.RESOURCE_EXHAUSTED", ""),
])
def test_bad_requests_get_the_code_and_one_line(served, case, code, words):
    client = served.client()
    x, model, name, datatype, outputs = _input(1, (32, 32)), "std", "input", "FP32", None
    if case == "model":
        model = "nope"
    elif case == "name":
        name = "pixels"
    elif case == "datatype":
        x, datatype = x.astype(np.float64), "FP64"
    elif case == "shape":
        x = x[:, :1]
    elif case == "size":
        x = _input(1, (32, 40))
    elif case == "output":
        outputs = [grpcclient.InferRequestedOutput("logits")]
    elif case == "large":  # over --max-body-mb 1: refused by grpc before it reaches the model
        x = _input(1, (400, 400))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [_infer_input(x, name, datatype)], outputs=outputs)
    assert caught.value.status() == code, caught.value
    message = caught.value.message()
    assert words in message and "/" not in message.replace("32x32", "") or case == "large", message
    client.close()


def test_a_full_queue_is_unavailable_and_health_needs_no_slot(served):
    gate = served.state.gate
    client = served.client()
    held = gate.limit - gate.count
    for _ in range(held):
        assert gate.enter()
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("std", [_infer_input(_input(1, (32, 32)))])
        assert caught.value.status() == "StatusCode.UNAVAILABLE" and "queue is full" in caught.value.message()
        assert client.is_server_live()
    finally:
        for _ in range(held):
            gate.leave()
    client.close()


def test_an_inference_slower_than_the_timeout_is_deadline_exceeded_and_frees_its_slot(files, monkeypatch):
    import time

    s = Served([f"std={files['std']}"], Settings(timeout_s=0.5, max_queue=2))
    try:
        model = s.registry.get("std").primary.model
        run = model.run

        def slow(*args, **kwargs):
            time.sleep(1.0)
            return run(*args, **kwargs)

        monkeypatch.setattr(model, "run", slow)
        client = s.client()
        x = _input(1, (32, 32))
        with pytest.raises(InferenceServerException) as caught:
            client.infer("std", [_infer_input(x)])
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert caught.value.message() == "no answer within 0.5 s"
        monkeypatch.setattr(model, "run", run)
        deadline = time.monotonic() + 5  # the slot is held until the slow run is really done
        while s.state.gate.count:
            assert time.monotonic() < deadline, "a timed-out RPC kept its queue slot"
            time.sleep(0.05)
        assert client.infer("std", [_infer_input(x)]).as_numpy("probs").shape == (1, 3)
        client.close()
    finally:
        s.stop()


def test_api_key_on_every_rpc_but_health(files):
    s = Served([f"std={files['std']}"], Settings(api_key="sesame"))
    try:
        client = s.client()
        assert client.is_server_live() and client.is_server_ready()
        x = _input(1, (32, 32))
        for call in (lambda h: client.get_model_metadata("std", headers=h),
                     lambda h: client.infer("std", [_infer_input(x)], headers=h)):
            for wrong in (None, {"authorization": "Bearer wrong"}):
                with pytest.raises(InferenceServerException) as caught:
                    call(wrong)
                assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            call({"authorization": "Bearer sesame"})
            call({"x-api-key": "sesame"})
        client.close()
    finally:
        s.stop()


def test_grpc_requests_show_in_metrics_and_share_the_batchers(served):
    client = served.client()
    client.infer("std", [_infer_input(_input(1, (32, 32)))])
    text = served.metrics.render().decode()
    assert ('vggspec_requests_total{model="std",route="/inference.GRPCInferenceService/ModelInfer",status="200"}'
            in text)
    assert 'vggspec_batch_size_count{model="std"}' in text
    client.close()


# ---------------------------------------------------------------- the command


def test_serve_grpc_port_answers_and_sigterm_exits_0(files, child):
    with child([sys.executable, "-m", "vggspec", "serve", f"t={files['dense']}", "--port", "0", "--grpc-port", "0",
                "--device", "cpu", "--grace", "2"]) as proc:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert "on http://127.0.0.1:" in lines[0] and "gRPC on 127.0.0.1:" in lines[1], lines
        url = lines[1].split("gRPC on ")[1].strip()
        client = grpcclient.InferenceServerClient(url)
        x = _input(1)
        result = client.infer("t", [_infer_input(x)])
        np.testing.assert_allclose(result.as_numpy("probs"), _reference(files["dense"], x)[0], atol=1e-6)
        client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0


def test_a_grpc_port_in_use_is_a_one_line_error(files):
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "vggspec", "serve", f"t={files['dense']}", "--port", "0",
                               "--grpc-port", str(port), "--device", "cpu"], capture_output=True, text=True,
                              timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port} for gRPC" in proc.stderr and "Traceback" not in proc.stderr
