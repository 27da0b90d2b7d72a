"""The HTTP connection: uvicorn's protocol with a deadline for a request's headers, and the uvicorn settings
`vggspec serve` runs with (one place, for the CLI and the tests). The protocol is uvicorn's httptools one when
httptools is installed (the `serve` extra installs it: its C parser costs a fraction of h11's per request),
else its h11 one; both carry the same deadline.

uvicorn bounds the silence between keep-alive requests but not the time a client may take to finish its request
line and headers: a client that sends "GET / HTTP/1.1\\r\\nHost: x" and stops would hold its connection, and one
of the connection allowance, for ever (slowloris). The body has its own deadline in the app (--timeout-s).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("vggspec.serve")


def _late_reply(timeout: float) -> bytes:
    body = json.dumps({"error": f"the request's headers did not arrive within {timeout:g} s"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Deadline:
    """The timer both parser classes share: armed when a connection opens and at a request's first bytes,
    disarmed when its headers are complete. On expiry the parser class says, in `_headers_state`, whether
    a request's headers are part-way ("partial": 408 and close), nothing came ("none": close) or the
    connection is past its headers ("done": leave it to uvicorn's own timers)."""

    header_timeout = 30.0
    on_timeout: Callable[[], None] | None = None  # told of each 408, for /metrics
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def _start_deadline(self) -> None:
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        """The deadline from now."""
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout, self._late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_state(self) -> str:
        raise NotImplementedError

    def _late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        state = self._headers_state()
        if state == "done":
            return
        if state == "partial":
            log.info("408 %s: request headers not complete within %g s", _peer(self.transport), self.header_timeout)
            self.transport.write(_late_reply(self.header_timeout))
            if self.on_timeout is not None:
                self.on_timeout()
        self.transport.close()


class HeaderDeadline(_Deadline, H11Protocol):
    """H11Protocol that closes a connection whose request headers are not complete `header_timeout` seconds
    after its first byte (or after the connection opened): 408 when some bytes came, a plain close when none."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._got_bytes = False
        self._start_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self._disarm()
        elif self.conn.trailing_data[0] and not self._got_bytes:
            # The first bytes of a new request (after a keep-alive pause, uvicorn's own timer is off now).
            self._got_bytes = True
            self._arm()

    def on_response_complete(self) -> None:
        self._got_bytes = False  # the next request's deadline starts with its first byte
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._got_bytes = True
            self._arm()  # a pipelined request's first bytes already came with the last one

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _headers_state(self) -> str:
        if self.conn.their_state is not h11.IDLE:
            return "done"
        return "partial" if self.conn.trailing_data[0] else "none"


def httptools_deadline() -> type | None:
    """HttpToolsProtocol with HeaderDeadline's deadline, or None without httptools. httptools reports a
    request's first bytes (on_message_begin) and the end of its headers (on_headers_complete) itself."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttpToolsDeadline(_Deadline, HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._in_headers = False
            self._start_deadline()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers = True
            self._arm()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_state(self) -> str:
            if self._in_headers:
                return "partial"
            # A connection that has been answered: its keep-alive timer rules.
            return "done" if self.cycle is not None else "none"

    return HttpToolsDeadline


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "client"


def uvicorn_config(app: Any, timeout_s: float, max_queue: int, grace: float,
                   on_timeout: Callable[[], None] | None = None, parser: str = "auto", **options: Any) -> Any:
    """uvicorn.Config for `app`: the header deadline at `timeout_s` (`on_timeout` called on each 408 it sends),
    a connection allowance above the queue's. `parser`: "httptools", "h11", or "auto" (httptools if installed)."""
    import uvicorn

    hook = staticmethod(on_timeout) if on_timeout is not None else None
    fast = httptools_deadline() if parser in ("auto", "httptools") else None
    if parser == "httptools" and fast is None:
        raise ImportError("httptools is not installed", name="httptools")
    base = fast or HeaderDeadline
    protocol = type(base.__name__, (base,), {"header_timeout": timeout_s, "on_timeout": hook})
    settings: dict[str, Any] = {"log_config": None, "log_level": "warning", "access_log": False,
                                "timeout_graceful_shutdown": grace, "server_header": False,
                                "limit_concurrency": max(2 * max_queue, max_queue + 32), **options}
    return uvicorn.Config(app, http=protocol, **settings)
