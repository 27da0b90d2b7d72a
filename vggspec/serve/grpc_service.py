"""The Open Inference Protocol over gRPC (what tritonclient.grpc and KServe's gRPC clients speak), beside the
HTTP server: the same models and batchers, the same queue, limits, API key, metrics and access log.

grpcio's thread-pool server runs it. Each RPC is one thread that checks its tensor exactly as an HTTP request's
is checked (vggspec.serve.oip) and waits on the model's batcher, so a gRPC and an HTTP request of one image
get the same posteriors and share batches. The message classes are built at run time from the descriptor
shipped beside the protocol's .proto (proto/), so no generated code ties vggspec to one protobuf release.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import cache
from importlib import resources
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ..errors import VggspecError
from ..version import __version__
from . import oip
from .app import Settings, State, admit, job_error, key_matches, served_name
from .batcher import Closed
from .oip import RequestError
from .registry import describe

log = logging.getLogger("vggspec.serve")
SERVICE = "inference.GRPCInferenceService"
PUBLIC = ("ServerLive", "ServerReady")  # as /v2/health/* over HTTP: no API key needed
# The HTTP status each refusal would have, as the gRPC code clients (and Triton) use for it.
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
# Where each datatype's values sit in InferTensorContents when a client sends no raw bytes.
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "UINT8": "uint_contents"}


@cache
def messages() -> dict[str, Any]:
    """The protocol's message classes by short name (ModelInferRequest, ...), from the shipped descriptor."""
    files = descriptor_pb2.FileDescriptorSet.FromString(
        resources.files(__package__).joinpath("proto", "grpc_predict_v2.pb").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in files.file:
        pool.Add(proto)
    service = pool.FindServiceByName(SERVICE)
    found: dict[str, Any] = {}
    for method in service.methods:
        for kind in (method.input_type, method.output_type):
            found[kind.name] = message_factory.GetMessageClass(kind)
    return found


class GrpcServer:
    """The gRPC service, bound to `host:port` at once (0: a free port, read back from `port`) so that a port in
    use fails before any model loads; `start(state)` serves an app's State."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.m = messages()
        self.state: State | None = None
        workers = settings.max_queue + 4  # an RPC waiting on its batch holds a thread, as HTTP holds a slot
        options = [("grpc.max_receive_message_length", settings.max_body_bytes),
                   ("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.so_reuseport", 0)]
        self.server = grpc.server(ThreadPoolExecutor(workers, thread_name_prefix="vggspec-grpc"), options=options,
                                  maximum_concurrent_rpcs=workers)
        where = f"[{host}]" if ":" in host else host
        try:
            self.port = self.server.add_insecure_port(f"{where}:{port}")
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise VggspecError(f"cannot listen on {host}:{port} for gRPC", None,
                               "pick another --grpc-port (0: any free one), or stop what holds it")

    def start(self, state: State) -> None:
        self.state = state
        handlers = {name: self._handler(name, fn) for name, fn in self._methods().items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.start()

    def stop(self, grace: float) -> Any:
        """Refuse new RPCs at once, give in-flight ones `grace` seconds; a threading.Event set when done."""
        return self.server.stop(grace)

    # ------------------------------------------------------------ plumbing

    @property
    def _state(self) -> State:
        assert self.state is not None, "start() first"
        return self.state

    def _methods(self) -> dict[str, Callable[[Any, Any], Any]]:
        return {"ServerLive": self.server_live, "ServerReady": self.server_ready,
                "ServerMetadata": self.server_metadata, "ModelReady": self.model_ready,
                "ModelMetadata": self.model_metadata, "ModelInfer": self.model_infer}

    def _handler(self, name: str, fn: Callable[[Any, Any], Any]) -> Any:
        request_class, response_class = self.m[f"{name}Request"], self.m[f"{name}Response"]

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            start, status = time.perf_counter(), 200
            try:
                if name not in PUBLIC and self._state.settings.api_key:
                    self._authorise(context)
                return fn(request, context)
            except RequestError as exc:
                status = exc.status
                context.abort(CODES.get(exc.status, grpc.StatusCode.UNKNOWN), exc.message)
            except Exception as exc:  # never a client's fault: logged whole, told to the client as one line
                status = 500
                log.error("internal error on gRPC %s", name, exc_info=exc)
                context.abort(grpc.StatusCode.INTERNAL, "internal error")
            finally:
                self._record(request, context, name, status, time.perf_counter() - start)

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_class.FromString,
                                                   response_serializer=response_class.SerializeToString)

    def _authorise(self, context: grpc.ServicerContext) -> None:
        headers = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        given, auth = headers.get("x-api-key"), headers.get("authorization")
        if not key_matches(self._state.settings.api_key.encode(),  # type: ignore[union-attr]
                           given.encode() if isinstance(given, str) else given,
                           auth.encode() if isinstance(auth, str) else auth):
            raise RequestError(401, "missing or wrong API key (send metadata authorization: Bearer KEY)")

    def _record(self, request: Any, context: Any, name: str, status: int, seconds: float) -> None:
        model = getattr(request, "model_name", "") or getattr(request, "name", "")
        model = model if model in self._state.registry else ""  # the labels stay bounded
        route = f"/{SERVICE}/{name}"
        self._state.metrics.observe_request(model, route, status, seconds)
        log.info('%s "GRPC %s" %d %.1fms model=%s route=grpc', oip._short(context.peer() or "-", 80), route,
                 status, seconds * 1000, model or "-")

    # ------------------------------------------------------------ the RPCs

    def server_live(self, request: Any, context: Any) -> Any:
        return self.m["ServerLiveResponse"](live=True)

    def server_ready(self, request: Any, context: Any) -> Any:
        return self.m["ServerReadyResponse"](ready=bool(self._state.registry.names))

    def server_metadata(self, request: Any, context: Any) -> Any:
        return self.m["ServerMetadataResponse"](name="vggspec", version=__version__, extensions=[])

    def model_ready(self, request: Any, context: Any) -> Any:
        served_name(self._state.registry, request.name, request.version)
        return self.m["ModelReadyResponse"](ready=True)

    def model_metadata(self, request: Any, context: Any) -> Any:
        name = served_name(self._state.registry, request.name, request.version)
        served = self._state.registry.get(name)
        assert served is not None
        described = describe(served.primary.info)
        response = self.m["ModelMetadataResponse"](name=name, versions=["1"], platform="onnxruntime_onnx")
        for field in ("inputs", "outputs"):
            for tensor in described[field]:
                getattr(response, field).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        return response

    def model_infer(self, request: Any, context: Any) -> Any:
        state = self._state
        name = served_name(state.registry, request.model_name, request.model_version)
        with state.registry.use(name) as served:
            if len(served.members) > 1:
                raise RequestError(400, f"'{name}' is an ensemble of {len(served.members)} networks with inputs "
                                        "of their own; post images to /v2/models/{name}/classify over HTTP")
            model = served.primary
            x = _input(request, model.info)
            wanted = _outputs(request, model.info)
            outputs = self._run(model, x, context)
        results = dict(zip(model.info.outputs, outputs, strict=True))
        response = self.m["ModelInferResponse"](model_name=name, model_version="1", id=request.id)
        for out in wanted:
            value = np.ascontiguousarray(results[out], dtype="<f4")
            response.outputs.add(name=out, datatype="FP32", shape=list(value.shape))
            response.raw_output_contents.append(value.tobytes())
        return response

    def _run(self, model: Any, x: np.ndarray, context: Any) -> list[np.ndarray]:
        """The batcher's answer within the request timeout (or the client's deadline, when sooner)."""
        state = self._state
        admit(state)
        try:
            future = model.batcher.submit(x)
        except Closed as exc:
            state.gate.leave()
            raise job_error(exc) from None
        future.add_done_callback(state.gate.leave)
        left = context.time_remaining()
        timeout = min(state.settings.timeout_s, left if left is not None else math.inf)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            raise RequestError(504, f"no answer within {timeout:g} s") from None
        except (Closed, VggspecError, MemoryError) as exc:
            raise job_error(exc) from None


def _input(request: Any, info: Any) -> np.ndarray:
    """The request's one input tensor, from raw_input_contents (what tritonclient sends) or typed contents."""
    oip.check_one_input(len(request.inputs), info)
    given = request.inputs[0]
    spec: dict[str, Any] = {"name": given.name, "datatype": given.datatype, "shape": [int(d) for d in given.shape]}
    binary = b""
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise RequestError(400, f"raw_input_contents holds {len(request.raw_input_contents)} tensors; "
                                    "the model takes one")
        binary = request.raw_input_contents[0]
        spec["parameters"] = {"binary_data_size": len(binary)}
    elif given.datatype in CONTENTS and given.HasField("contents"):
        spec["data"] = list(getattr(given.contents, CONTENTS[given.datatype]))
    return oip.tensor(spec, binary, info)


def _outputs(request: Any, info: Any) -> list[str]:
    names = [out.name for out in request.outputs] or list(info.outputs)
    for name in names:
        oip.check_output(name, info)
    return names

