"""Routes of runs: start one and stream its events as SSE; interrupt it."""

from __future__ import annotations

import secrets
import time
from typing import Any

from aiohttp import web

from execd.api.keys import REGISTRY, SETTINGS
from execd.api.validation import interrupt_spec, read_json, run_spec
from execd.logging import get_logger
from execd.registry import Aborted, ActiveRun, Completed, RunRequest
from execd.sse import RunStream

log = get_logger("execd.api")
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start_run(request: web.Request) -> web.StreamResponse:
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    session = registry.get(request.match_info["session_id"])
    spec = run_spec(await read_json(request, settings.max_body_bytes), session.shell.cwd)
    run_id = secrets.token_hex(8)
    active = registry.start_run(session, RunRequest(spec.code, spec.cwd, spec.env, spec.stdin), run_id, spec.timeout_ms)
    try:
        response = LazyResponse(request)
        stream = RunStream(response, run_id, settings.max_output_bytes, settings.sse_ping_s)
        try:
            await stream_events(stream, active, session.id)
        except Exception as exc:
            if isinstance(exc, ConnectionError) or stream.terminal_sent:
                raise
            # A bug: the headers are sent, so the stream still ends with its one terminal event,
            # written once the run has ended (the session is idle again by then).
            log.exception("run_stream_failed", session_id=session.id, run_id=run_id)
            await active.abandon()
            await stream.send("error", **error_fields("INTERNAL", f"internal error: {type(exc).__name__}"))
        await stream.close()
        return response.sent
    finally:
        # The client went away (or writing failed): Ctrl-C the run and let it end unseen.
        await active.abandon()


class LazyResponse:
    """The response of a run, started only when something must reach the client before the run
    ends. A run that ends within its first quiet moment (most do) is answered as one plain
    response with a length: no chunked framing, one write."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._stream: web.StreamResponse | None = None
        self._whole: web.Response | None = None

    async def write(self, data: bytes) -> None:
        if self._stream is None:
            self._stream = web.StreamResponse(headers=SSE_HEADERS)
            await self._stream.prepare(self._request)
        await self._stream.write(data)

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


async def stream_events(stream: RunStream, active: ActiveRun, session_id: str) -> None:
    started = time.monotonic()
    await stream.send("init", session_id=session_id, text=active.run_id)
    stream.start_pings()
    try:
        while not active.finished:
            event = await active.next_event(on_quiet=stream.flush)
            if isinstance(event, Completed):
                await stream.flush_text()
                await stream.send(
                    "execution_complete",
                    exit_code=event.exit_code,
                    execution_time=int((time.monotonic() - started) * 1000),
                    interrupted=event.interrupted,
                    timed_out=event.timed_out,
                    output_truncated=stream.output_truncated,
                    cwd=event.cwd,
                    shell_exited=event.shell_exited,
                )
            elif isinstance(event, Aborted):
                await stream.flush_text()
                await stream.send("error", **error_fields(event.code, event.message))
            elif event.dropped_bytes:
                await stream.send_output(event.stream, event.data, between_runs=True, dropped_bytes=event.dropped_bytes)
            else:
                await stream.send_output(event.stream, event.data, between_runs=event.between_runs)
    finally:
        stream.stop_pings()


def error_fields(code: str, message: str) -> dict[str, Any]:
    """An `error` event's fields; `error` is the shape OpenSandbox clients read."""
    return {"code": code, "message": message, "error": {"ename": code, "evalue": message, "traceback": []}}


async def interrupt_run(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    session = registry.get(request.match_info["session_id"])
    spec = interrupt_spec(await read_json(request, request.app[SETTINGS].max_body_bytes))
    run_id = registry.interrupt(session, spec.signal, spec.run_id)
    return web.json_response({"run_id": run_id, "signal": spec.signal.name}, status=202)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/session/{session_id}/run", start_run)
    router.add_post("/session/{session_id}/interrupt", interrupt_run)
