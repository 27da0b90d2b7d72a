"""The Starlette app: Open Inference Protocol routes, the image endpoint, metrics, the page.

Every inference request (protocol infer or image) is one job on a worker thread, admitted only while
fewer than `max_queue` are in flight (else 503 with Retry-After): the queue, the threads and the memory
they hold stay bounded. Bodies are read here, asynchronously, against a size limit (413) and a deadline,
so a slow or vanishing client holds only its own connection. Errors are one line for people, never an
exception's internals or a path of the server's files.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import VggspecError
from ..version import __version__
from . import oip
from .batcher import Closed
from .images import MEDIA_TYPES, ClassifyParams, classify
from .metrics import Metrics
from .oip import RequestError
from .registry import Registry, describe

log = logging.getLogger("vggspec.serve")
PUBLIC = ("/v2/health/",)  # no API key needed
PAGE = ("/", "/static/")  # the page holds no data; it sends the key the user types with its requests
INLINE_JSON = 64 * 1024  # bytes of JSON tensors parsed on the event loop itself (a 1 x 3 x 32 x 32 image)


@dataclass(frozen=True)
class Settings:
    max_batch: int = 8
    max_delay_ms: float = 0.0
    max_queue: int = 64
    max_body_mb: float = 20.0
    timeout_s: float = 30.0
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class Gate:
    """How many inference jobs are in flight; admits up to `limit`."""

    def __init__(self, limit: int, gauge: Any) -> None:
        self.limit, self.gauge, self.count = limit, gauge, 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            self.gauge.set(self.count)
            return True

    def leave(self, *_: Any) -> None:
        with self._lock:
            self.count -= 1
            self.gauge.set(self.count)


class State:
    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics) -> None:
        self.registry, self.settings, self.metrics = registry, settings, metrics
        self.gate = Gate(settings.max_queue, metrics.queue)
        self.pool = ThreadPoolExecutor(max_workers=settings.max_queue + 2, thread_name_prefix="vggspec-serve")
        self.scratch = Path(tempfile.mkdtemp(prefix="vggspec-serve-"))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


# ---------------------------------------------------------------- errors


_PATHS = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"(),;]+){2,}")


def public_reason(exc: BaseException) -> str:
    """One line about what went wrong, without paths or a library's internals."""
    text = exc.message if isinstance(exc, VggspecError) else "the input could not be processed"
    text = _PATHS.sub("<file>", text.splitlines()[0] if text else "").split("; ")[0]
    return text if len(text) <= 200 else text[:197] + "..."


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


# ---------------------------------------------------------------- bodies and jobs


# A 408 closes its connection (RFC 9110: the server gave up waiting), rather than holding it to keep-alive's end.
# A 413 does not: uvicorn has no lingering close, so closing on a client still sending its body resets the
# connection, and the client may never read why.
CLOSE = {"Connection": "close"}


async def read_body(request: Request, settings: Settings) -> bytes:
    """The whole body, refused with 413 past the limit (from Content-Length, and while it streams) and 408
    when it does not arrive within the request timeout (closing the connection)."""
    limit = settings.max_body_bytes
    too_large = RequestError(413, f"the body is over the {settings.max_body_mb:g} MB limit")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise too_large

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), settings.timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(408, f"the body did not arrive within {settings.timeout_s:g} s", CLOSE) from None
    except ClientDisconnect:
        raise RequestError(400, "the client disconnected") from None


async def run_job(state: State, job: Callable[[], Any]) -> Any:
    """Run `job` on a worker thread if the queue has room (503 otherwise), within the request timeout (504).
    Its slot is held until the thread is really done, even when the client got its 504 already."""
    admit(state)
    try:
        future = state.pool.submit(job)
    except RuntimeError:  # the pool is shut down: the server is stopping
        state.gate.leave()
        raise RequestError(503, "the server is stopping", {"Retry-After": "1"}) from None
    future.add_done_callback(state.gate.leave)
    return await settle(state, future)


def admit(state: State) -> None:
    """Take a slot of the queue, or refuse the request with 503 and Retry-After."""
    if not state.gate.enter():
        state.metrics.rejected.inc()
        raise RequestError(503, "the server is busy (its queue is full); retry shortly", {"Retry-After": "1"})


async def settle(state: State, future: Future) -> Any:
    """The result of a thread's or a batch's Future within the request timeout, its errors as one line."""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), state.settings.timeout_s)
    except asyncio.TimeoutError:
        raise RequestError(504, f"no answer within {state.settings.timeout_s:g} s") from None
    except (Closed, VggspecError, MemoryError) as exc:
        raise job_error(exc) from None


def job_error(exc: Closed | VggspecError | MemoryError) -> RequestError:
    """What a client is told when its model run failed: a replaced model (503) or its own input (400)."""
    if isinstance(exc, Closed):
        return RequestError(503, "the model was being replaced; retry", {"Retry-After": "1"})
    return RequestError(400, public_reason(exc) if isinstance(exc, VggspecError) else "out of memory for this input")


def _state(request: Request) -> State:
    return request.app.state.vggspec


def _served_name(request: Request) -> str:
    return served_name(_state(request).registry, request.path_params["name"], request.path_params.get("version"))


def served_name(registry: Registry, name: str, version: str | None) -> str:
    """`name` when it is served, in version 1 (or no version named); 404 otherwise."""
    if name not in registry:
        raise RequestError(404, f"no model named '{oip._short(name)}'")
    if version and version != "1":
        raise RequestError(404, f"model '{name}' has only version 1")
    return name


# ---------------------------------------------------------------- routes


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    ok = bool(_state(request).registry.names)
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


async def server_metadata(request: Request) -> Response:
    return JSONResponse({"name": "vggspec", "version": __version__,
                         "extensions": ["binary_tensor_data", "model_repository"]})


async def model_metadata(request: Request) -> Response:
    name = _served_name(request)
    served = _state(request).registry.get(name)
    assert served is not None
    info = served.primary.info
    body = {"name": name, "versions": ["1"], "platform": "onnxruntime_onnx", **describe(info)}
    body["parameters"] = {"labels": list(info.labels), "fully_conv": info.fully_conv,
                          "members": len(served.members), "input_size": list(info.input_size)}
    return JSONResponse(body)


async def model_ready(request: Request) -> Response:
    _served_name(request)
    return JSONResponse({"name": request.path_params["name"], "ready": True})


async def infer(request: Request) -> Response:
    """Binary tensors are decoded on the event loop (a view of the body: no work) and go straight to the
    model's batcher: no worker thread between the request and its batch. JSON tensors over INLINE_JSON
    bytes are parsed on a worker thread, so that a large one never stalls the loop."""
    state, name = _state(request), _served_name(request)
    body = await read_body(request, state.settings)
    header = request.headers.get(oip.HEADER)
    admit(state)
    queued = False
    try:
        with state.registry.use(name) as served:
            if len(served.members) > 1:
                raise RequestError(400, f"'{name}' is an ensemble of {len(served.members)} networks with inputs "
                                        "of their own; post images to /v2/models/{name}/classify")
            model = served.primary
            if header is None and len(body) > INLINE_JSON:
                loop = asyncio.get_running_loop()
                x, requested = await loop.run_in_executor(state.pool, oip.decode, body, header, model.info)
            else:
                x, requested = oip.decode(body, header, model.info)
            future = model.batcher.submit(x)
            future.add_done_callback(state.gate.leave)
            queued = True
            outputs = await settle(state, future)
    except Closed as exc:
        raise job_error(exc) from None
    finally:
        if not queued:
            state.gate.leave()
    content, headers = oip.encode(name, dict(zip(model.info.outputs, outputs, strict=True)), requested)
    media = "application/octet-stream" if headers else "application/json"
    return Response(content, media_type=media, headers=headers)


async def classify_image(request: Request) -> Response:
    state, name = _state(request), _served_name(request)
    served = state.registry.get(name)
    assert served is not None
    params = ClassifyParams.parse(request.query_params, served)
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data" and media not in MEDIA_TYPES:
        raise RequestError(415, f"unsupported media type '{oip._short(media)}': send the image as "
                                "image/jpeg, image/png, image/webp, image/bmp, image/gif, image/tiff, "
                                "application/octet-stream, or multipart/form-data field 'image'")
    body = await read_body(request, state.settings)
    image = await _multipart_image(request, body) if media == "multipart/form-data" else body
    if not image:
        raise RequestError(400, "the image is empty (0 bytes)")

    def job() -> dict:
        with state.registry.use(name) as current:
            return classify(current, params, image, state.scratch, state.settings.max_batch)

    return JSONResponse(await run_job(state, job))


async def _multipart_image(request: Request, body: bytes) -> bytes:
    async def stream() -> Any:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as exc:
        raise RequestError(400, f"unreadable multipart body ({oip._short(exc.message)})") from None
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise RequestError(400, "the multipart body needs a file field named 'image'")
    try:
        return await upload.read()
    finally:
        await form.close()


async def repository_index(request: Request) -> Response:
    registry = _state(request).registry
    return JSONResponse([{"name": n, "version": "1", "state": "READY"} for n in registry.names])


async def repository_load(request: Request) -> Response:
    """Reload a served model from its own files (a request never names a file)."""
    state = _state(request)
    name = request.path_params["name"]
    if name not in state.registry:
        raise RequestError(404, f"no model named '{oip._short(name)}' (only served models can be reloaded)")
    await read_body(request, state.settings)
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, state.registry.reload, name)
    except (VggspecError, OSError, MemoryError) as exc:
        log.warning("reload of %s failed: %s", name, exc)
        raise RequestError(400, f"reload of '{name}' failed: {public_reason(exc)}; the old model is still "
                                "served") from None
    log.info("reloaded %s", name)
    return JSONResponse({})


async def metrics(request: Request) -> Response:
    m = _state(request).metrics
    return Response(m.render(), media_type=m.content_type)


async def page(request: Request) -> Response:
    index = resources.files("vggspec.serve").joinpath("static", "index.html")
    try:
        return Response(index.read_bytes(), media_type="text/html; charset=utf-8")
    except (FileNotFoundError, NotADirectoryError):
        raise RequestError(404, "this installation has no page") from None


def routes() -> list[Any]:
    return [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata), Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/classify", classify_image, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/metrics", metrics), Route("/", page),
        Mount("/static", StaticFiles(packages=[("vggspec.serve", "static")], check_dir=False), name="static"),
    ]


# ---------------------------------------------------------------- the front door


class AccessLog:
    """ASGI middleware, the outermost: one log line and the metrics of every request, CORS preflights and
    refusals included; a bug's exception is logged once, with its traceback, and answered 500 here (Starlette's
    own handler would re-raise it to uvicorn, which logs it a second time)."""

    def __init__(self, app: Any, state: State, table: list[Any]) -> None:
        self.app, self.state, self.table = app, state, table

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]  # the response's status once it has started

        async def tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            log.error("internal error on %s %s", scope["method"], oip._short(scope["path"], 200), exc_info=exc)
            if status[0] == 0:  # nothing sent yet: the client learns it failed, never why
                await error(500, "internal error")(scope, receive, tracked)
            status[0] = 500
        finally:
            self._record(scope, status[0] or 500, time.perf_counter() - start)

    def _record(self, scope: dict, status: int, seconds: float) -> None:
        model, route = self._route(scope)
        self.state.metrics.observe_request(model, route, status, seconds)
        client = scope.get("client") or ("-", 0)
        # the path as decoded from the URL: a %0A in it must not start a forged line of its own
        log.info('%s:%s "%s %s" %d %.1fms model=%s route=%s', client[0], client[1], scope["method"],
                 oip._short(scope["path"], 200), status, seconds * 1000, model or "-", route)

    def _route(self, scope: dict) -> tuple[str, str]:
        """The served model's name ('' for any other: the labels stay bounded) and the route's template; a
        route matched but for its method (405, a preflight) counts as that route."""
        found: tuple[Any, dict] | None = None
        for candidate in self.table:  # as Starlette's router picks: the first full match, else the first partial
            match, child = candidate.matches(scope)
            if match == Match.FULL:
                found = (candidate, child)
                break
            if match == Match.PARTIAL and found is None:
                found = (candidate, child)
        if found is None:
            return "", "unmatched"
        name = found[1].get("path_params", {}).get("name", "")
        return (name if name in self.state.registry else ""), found[0].path


class KeyCheck:
    """ASGI middleware: the API key on every route but health and the page; inside the CORS layer, so that
    preflights (which carry no key) are answered and a 401 still carries CORS headers."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.startswith(PUBLIC) or self._page(path) or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await error(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                    {"WWW-Authenticate": "Bearer"})(scope, receive, send)

    @staticmethod
    def _page(path: str) -> bool:
        return path == PAGE[0] or path.startswith(PAGE[1])

    def _authorised(self, scope: dict) -> bool:
        headers = dict(scope.get("headers") or [])
        return key_matches(self.key, headers.get(b"x-api-key"), headers.get(b"authorization"))


def key_matches(key: bytes, x_api_key: bytes | None, authorization: bytes | None) -> bool:
    """Whether a request's X-API-Key, else its `Authorization: Bearer`, is `key` (compared in constant time)."""
    given, auth = x_api_key, authorization or b""
    if given is None and auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    return hmac.compare_digest(given or b"", key)


# ---------------------------------------------------------------- the app


def create_app(registry: Registry, settings: Settings, metrics: Metrics | None = None) -> Starlette:
    """The server over loaded models. `metrics` must be the one the registry's batchers report to."""
    metrics = metrics or Metrics()
    state = State(registry, settings, metrics)
    table = routes()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        loop = asyncio.get_running_loop()
        try:  # SIGHUP reloads every model; only where the loop runs in the main thread (the CLI)
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, _reload_all, registry))
        except (NotImplementedError, RuntimeError, ValueError, AttributeError):
            pass
        try:
            yield
        finally:
            state.close()

    middleware = [Middleware(AccessLog, state=state, table=table)]  # outermost first
    if settings.cors_origins:
        middleware.append(Middleware(_cors_middleware(), allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "X-API-Key", "Content-Type", oip.HEADER],
                                     expose_headers=[oip.HEADER]))
    if settings.api_key:
        middleware.append(Middleware(KeyCheck, key=settings.api_key))
    handlers = {RequestError: _request_error, HTTPException: _http_error}
    app = Starlette(routes=table, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.vggspec = state
    return app


def _cors_middleware() -> type:
    """Starlette's CORSMiddleware, whose refused preflight (plain text there) is a JSON error like every other."""
    from starlette.middleware.cors import CORSMiddleware

    class JsonCORS(CORSMiddleware):
        def preflight_response(self, request_headers: Any) -> Response:
            response = super().preflight_response(request_headers)
            if response.status_code < 400:
                return response
            keep = {k: v for k, v in response.headers.items() if k.lower() not in ("content-type", "content-length")}
            return error(response.status_code, bytes(response.body).decode("utf-8", "replace"), keep)

    return JsonCORS


def _reload_all(registry: Registry) -> None:
    for name, exc in registry.reload_all():
        if exc is None:
            log.info("reloaded %s (SIGHUP)", name)
        else:
            log.warning("reload of %s failed, the old model is still served: %s", name, public_reason(exc))
