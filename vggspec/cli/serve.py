"""`vggspec serve`: the long-running server (vggspec.serve) on uvicorn.

Nothing heavy at import time: Starlette, uvicorn and onnxruntime load inside the command, and torch never.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import click

from .common import examples

EXTRA_HINT = "pip install 'vggspec[serve]'"
GRPC_HINT = "pip install 'vggspec[serve,grpc]'"


@click.command(epilog=examples(
    "vggspec serve d_dense.onnx",
    "vggspec serve scenes=runs/scenes/d_dense.onnx --port 8080 --max-batch 16 --max-delay-ms 5",
    "vggspec serve d.safetensors vgg=vgg_dense.onnx+vgg.onnx --api-key \"$KEY\" --host 0.0.0.0",
    "vggspec serve ens=a_dense.onnx,b_dense.onnx --max-queue 128 --timeout-s 10 --grace 20",
    "vggspec serve d_dense.onnx --grpc-port 8001"))
@click.argument("models", metavar="MODEL...", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 (or ::) opens the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="TCP port; 0 picks a free one (printed at start).")
@click.option("--grpc-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Also speak the protocol over gRPC on PORT (tritonclient.grpc; Triton's 8001); 0 picks a free "
                   "one. Needs the grpc extra.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=8, show_default=True,
              help="Most images in one onnxruntime run (dynamic batching; 1 turns it off).")
@click.option("--max-delay-ms", type=click.FloatRange(0, 1000), default=0.0, show_default=True,
              help="How long the first input of a batch waits for others of its shape; 0: not at all, a batch "
                   "is what queued while the previous one ran (as Triton's default).")
@click.option("--max-queue", type=click.IntRange(1, 100_000), default=64, show_default=True,
              help="Inference requests in flight at most; beyond it: 503 with Retry-After.")
@click.option("--max-body-mb", type=click.FloatRange(0.001, 4096), default=20.0, show_default=True,
              help="Largest request body (413 beyond it).")
@click.option("--timeout-s", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              help="Per request: receiving the body, and from admission to answer (408, 504).")
@click.option("--grace", type=click.FloatRange(0, 3600), default=10.0, show_default=True,
              help="On SIGTERM: seconds for in-flight requests to finish before exiting.")
@click.option("--api-key", metavar="KEY", envvar="VGGSPEC_API_KEY",
              help="Require `Authorization: Bearer KEY` (or X-API-Key) on every route but /v2/health/* "
                   "(also read from $VGGSPEC_API_KEY).")
@click.option("--cors-origin", "cors_origins", metavar="ORIGIN", multiple=True,
              help="Allow browser pages from ORIGIN (repeatable); CORS is off without it.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto",
              show_default=True, help="auto: the first of TensorRT, CUDA, CPU that initialises.")
@click.option("--threads", type=click.IntRange(min=1), metavar="N", help="onnxruntime intra-op threads per model.")
@click.option("--http", "parser", type=click.Choice(["auto", "httptools", "h11"]), default="auto", show_default=True,
              help="HTTP parser: httptools (C, what the serve extra installs) or h11 (pure Python); auto: "
                   "httptools when installed.")
def serve(models: tuple[str, ...], host: str, port: int, grpc_port: int | None, max_batch: int,
          max_delay_ms: float, max_queue: int, max_body_mb: float, timeout_s: float, grace: float,
          api_key: str | None, cors_origins: tuple[str, ...], device: str, threads: int | None,
          parser: str) -> None:
    """Serve MODEL... over HTTP: the Open Inference Protocol (KServe v2, as Triton's clients speak it),
    an image endpoint, /metrics, and a page at /.

    MODEL is an .onnx file or a vggspec checkpoint (.safetensors: both forms exported at start), named
    after its file or as NAME=PATH. NAME=A_dense.onnx+A.onnx gives the two forms of one network (for the
    combined protocol); NAME=A.onnx,B.onnx an ensemble whose posteriors are averaged.

    Routes: GET /v2/health/live|ready, GET /v2, GET /v2/models/NAME, POST /v2/models/NAME/infer (tensors),
    POST /v2/models/NAME/classify (image bytes; ?topk=5&protocol=dense&scales=256,384&flip=true&heatmap=true),
    POST /v2/repository/index, POST /v2/repository/models/NAME/load (reload from its files; SIGHUP reloads
    all), GET /metrics. With --grpc-port, the protocol's gRPC service too (health, metadata, ModelInfer).
    SIGTERM stops accepting, lets in-flight requests finish, and exits 0.
    """
    try:
        import uvicorn

        from ..serve import Entry, LoadOptions, Metrics, Registry, Settings, create_app
        from ..serve.protocol import httptools_deadline, uvicorn_config
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("starlette", "uvicorn", "prometheus_client", "multipart",
                                              "python_multipart"):
            click.echo(f"error: `vggspec serve` needs {exc.name}, which is not installed\n  hint: {EXTRA_HINT}",
                       err=True)
            sys.exit(1)
        raise
    from .runtime import _export_checkpoint

    if parser == "httptools" and httptools_deadline() is None:
        click.echo(f"error: --http httptools needs httptools, which is not installed\n  hint: {EXTRA_HINT}", err=True)
        sys.exit(1)

    _configure_logging()
    entries = [Entry.parse(m) for m in models]
    settings = Settings(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                        max_body_mb=max_body_mb, timeout_s=timeout_s, api_key=api_key or None,
                        cors_origins=cors_origins)
    sock = _bind(host, port)  # before loading: a port in use fails at once, not after minutes of export
    rpc = _grpc(settings, host, grpc_port) if grpc_port is not None else None
    metrics = Metrics()
    registry = Registry(entries, LoadOptions(device, threads, max_batch, max_delay_ms / 1000),
                        _export_checkpoint, metrics.observe_batch)
    try:
        app = create_app(registry, settings, metrics)
        server = _server_class(uvicorn, lambda: rpc.stop(grace) if rpc else None)(  # gRPC drains with HTTP
            uvicorn_config(app, timeout_s, max_queue, grace, metrics.observe_header_timeout, parser))
        bound = sock.getsockname()
        where = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        click.echo(f"vggspec serve: {', '.join(registry.names)} on http://{where}:{bound[1]} "
                   f"({registry.get(registry.names[0]).primary.provider})", err=True)  # type: ignore[union-attr]
        if rpc is not None:
            rpc.start(app.state.vggspec)
            click.echo(f"vggspec serve: gRPC on {where}:{rpc.port}", err=True)
        # uvicorn re-raises the signal that stopped it once it has drained; a handler of ours turns that
        # into a normal return, so a drained SIGTERM exits 0 as orchestrators expect.
        signal.signal(signal.SIGTERM, lambda *_: None)
        server.run(sockets=[sock])
        if rpc is not None:  # in-flight RPCs finish within the grace that SIGTERM started
            rpc.stop(grace).wait(grace + 1)
    finally:
        if rpc is not None:
            rpc.stop(0)
        registry.close()
        sock.close()
    click.echo("vggspec serve: stopped", err=True)


def _grpc(settings: Any, host: str, port: int) -> Any:
    try:
        from ..serve.grpc_service import GrpcServer
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in ("grpc", "google"):
            click.echo(f"error: --grpc-port needs {exc.name}, which is not installed\n  hint: {GRPC_HINT}", err=True)
            sys.exit(1)
        raise
    return GrpcServer(settings, host, port)


def _server_class(uvicorn: Any, on_exit: Callable[[], object]) -> Any:
    """uvicorn.Server that also calls `on_exit` when a signal asks it to stop (gRPC then drains alongside)."""

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()
            super().handle_exit(sig, frame)

    return Server


def _bind(host: str, port: int) -> socket.socket:
    from ..errors import VggspecError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio turns Nagle off only on sockets that say they are TCP, and with Nagle on,
    # a response written as headers then body waits for the client's delayed ACK (40 ms per request on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted connections on Linux
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise VggspecError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", None,
                           "pick another --port (0: any free one), or stop what holds it") from None
    sock.set_inheritable(True)
    return sock


def _configure_logging() -> None:
    """One line per request on stderr (vggspec.serve's logger; uvicorn's access log is off)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("vggspec.serve", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    logging.getLogger("vggspec.serve").setLevel(logging.INFO)


def register(main: click.Group) -> None:
    main.add_command(serve)
