"""The listening socket and the HTTP protocol around the application: a cap on open connections,
a deadline for a new connection's first request, and the contract's JSON for errors that aiohttp's
own protocol answers before any middleware runs (a bad request line, oversized headers, bad
chunking)."""

from __future__ import annotations

import asyncio
import json
import socket
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from execd.logging import RateLimit, get_logger

log = get_logger("execd.api.server")


class ConnectionLimits:
    """What every connection is held to, and how many are open."""

    def __init__(self, max_connections: int, first_request_s: float) -> None:
        self.max_connections = max_connections
        self.first_request_s = first_request_s
        self.open = 0
        self._limit = RateLimit()

    def note(self, event: str, **fields: Any) -> None:
        """Log `event` at most once a second: a flood of junk or connections must not become a
        flood of log."""
        folded = self._limit.allow(event)
        if folded is not None:
            log.warning(event, repeated_since_last=folded, **fields)


class GuardedHandler(RequestHandler):
    """aiohttp's protocol, held to the limits: a connection that has not sent a whole request head
    within `first_request_s` is closed (aiohttp's keep-alive timeout covers the idle time after a
    response), and protocol-level errors answer JSON."""

    def __init__(self, manager: web.Server, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = limits
        self.heads = 0
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline = asyncio.get_running_loop().call_later(self.limits.first_request_s, self._first_request_due)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.limits.open -= 1
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def head_received(self) -> None:
        self.heads += 1
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _first_request_due(self) -> None:
        self._deadline = None
        if self.heads == 0:
            self.force_close()
            if self.transport is not None:
                self.transport.close()

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response has begun: no error can be sent on it")
        reason = message or (str(exc) if exc is not None else HTTPStatus(status).phrase)
        self.limits.note("http_protocol_error", status=status, reason=reason[:200])
        code = "INVALID_REQUEST" if status < 500 else "INTERNAL"
        if status == 413:
            code = "PAYLOAD_TOO_LARGE"
        body = {"code": code, "message": f"the request could not be read: {reason}"}
        response = web.Response(status=status, text=json.dumps(body), content_type="application/json")
        response.force_close()
        return response


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` as aiohttp answers it; any other expectation is a JSON 417 (aiohttp's
    own answers text, or fails with a 500 on bytes that are not UTF-8)."""
    expect = request.headers.get("Expect", "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not begun
        return None
    body = {"code": "INVALID_REQUEST", "message": f"unknown expectation in Expect: {ascii(expect)[:200]}"}
    return web.Response(status=417, text=json.dumps(body), content_type="application/json")


FALLBACK_ROUTE = "fallback"  # its requests are counted as route "other": a path holds ids


def add_fallback(router: web.UrlDispatcher) -> None:
    """The last route: every path and method no other route takes, so that aiohttp's own 404 and
    405 (which answer an odd Expect header before any middleware) never serve a request."""
    fallback = router.add_resource("/{path:.*}", name=FALLBACK_ROUTE)

    async def no_route(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in router.resources():
            if resource is not fallback:
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    fallback.add_route("*", no_route, expect_handler=expect_continue)


def mark_head_received(request: web.Request) -> None:
    """Called once a request's head is parsed (the first middleware): its connection met its deadline."""
    protocol = request.protocol
    if type(protocol) is GuardedHandler:
        protocol.head_received()


class Listener:
    """Accepts connections for the runner's server, up to the cap: past it a new connection gets
    a 503 and is closed at once (its fd is not held, nothing is logged per connection)."""

    def __init__(self, runner: web.AppRunner, limits: ConnectionLimits, handler_args: dict[str, Any]) -> None:
        self.runner = runner
        self.limits = limits
        self.handler_args = handler_args
        self._server: asyncio.base_events.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, sock=sock, backlog=1024)

    def _protocol(self) -> asyncio.Protocol:
        if self.limits.open >= self.limits.max_connections:
            return _Refused(self.limits)
        server = self.runner.server
        assert server is not None
        # Counted here, not in connection_made: one wake-up may accept many connections before
        # any of them is made.
        self.limits.open += 1
        return GuardedHandler(server, self.limits, loop=asyncio.get_running_loop(), **self.handler_args)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


MAX_LINGERING_REFUSALS = 256  # refused connections that may wait for their client to close first
REFUSAL_LINGER_S = 0.5
_REFUSAL_BODY = b'{"code":"RESOURCE_EXHAUSTED","message":"too many open connections: try again later"}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_REFUSAL_BODY)}\r\n\r\n".encode()
    + _REFUSAL_BODY
)


class _Refused(asyncio.Protocol):
    """Answers 503 and closes. It waits (briefly, and only while few do) for the client to close
    first: closing a socket with a request unread in it would reset the connection, and the
    client might lose the answer."""

    lingering = 0

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.limits.note("connection_refused", max_connections=self.limits.max_connections)
        transport.write(_REFUSAL)
        if _Refused.lingering >= MAX_LINGERING_REFUSALS:
            transport.close()
            return
        _Refused.lingering += 1
        self.transport = transport
        transport.write_eof()
        self.timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: it was refused

    def eof_received(self) -> bool:
        return False  # the client has closed its side: close ours

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is not None:
            _Refused.lingering -= 1
            self.transport = None
        if self.timer is not None:
            self.timer.cancel()
