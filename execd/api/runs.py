"""Routes of runs: start one, list and show them, read their events as SSE, feed stdin, interrupt.

Every stream is a reader of the run's log (execd.runlog): the engine drives the run whether or not
anyone reads it; a stream only sends the frames after its cursor, batched, with pings while quiet.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from execd.api.errors import json_response
from execd.api.keys import REGISTRY, SETTINGS
from execd.api.server import expect_continue
from execd.api.validation import cursor, interrupt_spec, read_json, run_spec, stdin_spec
from execd.logging import get_logger
from execd.registry import Session
from execd.run import Run, RunRequest
from execd.runlog import NO_CURSOR, Reader
from execd.sse import PING, frame_size

log = get_logger("execd.api")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A stream sends what it holds once 64 KiB wait, once the run has been quiet for 2 ms, once the
# oldest has waited 5 ms, and at the end: a short run costs one write, a chatty one stays live.
FLUSH_BYTES = 64 * 1024
QUIET_S = 0.002
FLUSH_DELAY_S = 0.005
EVENTS_ROUTE = "run_events"  # the one route that also takes ?access_token= (EventSource)


async def start_run(request: web.Request) -> web.StreamResponse:
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    session = registry.get(request.match_info["session_id"])
    spec = run_spec(await read_json(request), session.shell.cwd, session.user, session.root)
    grace_ms = settings.disconnect_grace_ms if spec.disconnect_grace_ms is None else spec.disconnect_grace_ms
    run_request = RunRequest(
        spec.code,
        spec.cwd,
        spec.env,
        spec.stdin,
        stdin_stream=spec.stdin_stream,
        background=spec.background,
        on_disconnect=spec.on_disconnect,
        disconnect_grace_s=(min(grace_ms, settings.max_run_timeout_ms) if settings.max_run_timeout_ms else grace_ms)
        / 1000,
    )
    run, started = registry.start_run(session, run_request, spec.run_id, spec.timeout_ms)
    if spec.background:
        return json_response(run.to_dict(), status=202)
    after = NO_CURSOR if started else _cursor(request, run)
    return await stream(request, run, after)


def _cursor(request: web.Request, run: Run) -> int:
    value = request.headers.get("Last-Event-ID")
    if value is None:
        value = request.query.get("after")
    seq = cursor(value, run.log.last_seq)
    return NO_CURSOR if seq is None else seq


# The terminal event as another dialect writes it (the OpenSandbox adapter): None keeps the run's own.
Terminal = Callable[[Run], bytes | None]


async def stream(request: web.Request, run: Run, after: int, terminal: Terminal | None = None) -> web.StreamResponse:
    """The run's events after `after`, live until the terminal event."""
    if run.log.finished and after == run.log.last_seq:
        return web.Response(status=204)  # nothing more will come: an EventSource stops here
    reader = run.attach(after)
    response = LazyResponse(request)
    try:
        await _pump(reader, response, request.app[SETTINGS].sse_ping_s, _rewrite(run, terminal))
        return response.sent
    except Exception as exc:
        if isinstance(exc, ConnectionError):
            raise
        log.exception("run_stream_failed", session_id=run.session_id, run_id=run.run_id)
        raise
    finally:
        reader.detach()


def _rewrite(run: Run, terminal: Terminal | None) -> Callable[[], bytes | None] | None:
    return None if terminal is None else lambda: terminal(run)


async def _pump(
    reader: Reader, response: LazyResponse, ping_s: float, terminal: Callable[[], bytes | None] | None = None
) -> None:
    """Send the log's frames after the reader's cursor until the terminal event."""
    runlog = reader.log
    taken = reader.cursor
    pending: list[bytes] = []
    size = 0
    oldest = last_write = time.monotonic()
    catching_up = True  # what the log held when the reader came is sent at once (a resume)
    while True:
        part = runlog.after(taken)
        if terminal is not None and part.frames and runlog.finished and part.last_seq == runlog.last_seq:
            replaced = terminal()  # the last frame is the terminal event
            if replaced is not None:
                part.frames[-1] = (replaced,)
        if part.frames:
            if not pending:
                oldest = time.monotonic()
            for frame in part.frames:
                if size >= FLUSH_BYTES:
                    # Writes of about 64 KiB: a join of a whole backlog is one big fresh buffer.
                    await response.write(b"".join(pending))
                    pending.clear()
                    size = 0
                pending.extend(frame)
                size += frame_size(frame)
            taken = part.last_seq
        if runlog.finished and taken == runlog.last_seq:
            await response.write_eof(b"".join(pending))
            reader.sent(taken)
            return
        if catching_up and not pending:
            await response.start()  # a resume with nothing to send yet: its headers, at once
        now = time.monotonic()
        if pending and (size >= FLUSH_BYTES or now - oldest >= FLUSH_DELAY_S or (catching_up and taken > 0)):
            await response.write(b"".join(pending))
            pending.clear()
            size = 0
            last_write = time.monotonic()
            reader.sent(taken)
            catching_up = False
            continue
        catching_up = False
        timeout: float | None
        if pending:
            timeout = min(QUIET_S, FLUSH_DELAY_S - (now - oldest))
        else:
            timeout = max(0.0, ping_s - (now - last_write)) if ping_s > 0 else None
        if not await runlog.wait(taken, timeout):
            if not pending:
                pending.append(PING)
            size = FLUSH_BYTES  # quiet: send what is held now


class LazyResponse:
    """The response of a stream, started only when something must reach the client before the
    run ends. A run that ends within its first quiet moment (most do) is answered as one plain
    response with a length: no chunked framing, one write."""

    __slots__ = ("_request", "_stream", "_whole")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._stream: web.StreamResponse | None = None
        self._whole: web.Response | None = None

    async def start(self) -> web.StreamResponse:
        if self._stream is None:
            self._stream = web.StreamResponse(headers=SSE_HEADERS)
            await self._stream.prepare(self._request)
        return self._stream

    async def write(self, data: bytes) -> None:
        await (await self.start()).write(data)

    async def write_eof(self, data: bytes = b"") -> None:
        if self._stream is None:
            self._whole = web.Response(body=data, headers=SSE_HEADERS)
        else:
            await self._stream.write_eof(data)

    @property
    def sent(self) -> web.StreamResponse:
        response = self._whole or self._stream
        assert response is not None, "write_eof was not called"
        return response


def _session_run(request: web.Request) -> tuple[Session, Run]:
    session = request.app[REGISTRY].get(request.match_info["session_id"])
    return session, session.run(request.match_info["run_id"])


async def list_runs(request: web.Request) -> web.Response:
    session = request.app[REGISTRY].get(request.match_info["session_id"])
    return json_response({"runs": [run.to_dict() for run in session.runs_newest_first()]})


async def get_run(request: web.Request) -> web.Response:
    _, run = _session_run(request)
    return json_response(run.to_dict())


async def run_events(request: web.Request) -> web.StreamResponse:
    _, run = _session_run(request)
    return await stream(request, run, _cursor(request, run))


async def write_stdin(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    session, run = _session_run(request)
    spec = stdin_spec(await read_json(request))
    written = await registry.write_stdin(session, run.run_id, spec.data, spec.eof)
    return json_response({"written": written})


async def interrupt_run(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    session = registry.get(request.match_info["session_id"])
    spec = interrupt_spec(await read_json(request))
    run_id = registry.interrupt(session, spec.signal, spec.run_id)
    return web.json_response({"run_id": run_id, "signal": spec.signal.name}, status=202)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/session/{session_id}/run", start_run, expect_handler=expect_continue)
    router.add_post("/session/{session_id}/interrupt", interrupt_run, expect_handler=expect_continue)
    router.add_get("/session/{session_id}/runs", list_runs, expect_handler=expect_continue)
    router.add_get("/session/{session_id}/runs/{run_id}", get_run, expect_handler=expect_continue)
    router.add_get(
        "/session/{session_id}/runs/{run_id}/events", run_events, expect_handler=expect_continue, name=EVENTS_ROUTE
    )
    router.add_post("/session/{session_id}/runs/{run_id}/stdin", write_stdin, expect_handler=expect_continue)
