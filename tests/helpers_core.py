"""Helpers for the core-contract tests: read a run's events while it is still going, check errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import ClientResponse

from tests.conftest import Daemon, Event, parse_sse

TERMINAL_TYPES = ("execution_complete", "error")
SESSION_FIELDS = {
    "session_id",
    "state",
    "pid",
    "cwd",
    "user",  # v2: whom the shell runs as
    "labels",
    "created_at",
    "last_active_at",
    "idle_timeout_s",
    "run_count",
    "current_run_id",
    "last_run_id",
    "reason",
    "exit_code",
    "signal",
}


class LiveRun:
    """A run's SSE stream read event by event, so a test can act while the run is in progress."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.raw = b""
        self._buffer = b""
        self.events: list[Event] = []

    async def next_event(self) -> Event:
        """The next event (ping comments are skipped); fails if the stream ends first."""
        while True:
            while b"\n\n" not in self._buffer:
                chunk = await self.response.content.readany()
                if not chunk:
                    raise AssertionError(f"the stream ended without another event; got {self.events}")
                self._buffer += chunk
                self.raw += chunk
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            parsed = parse_sse(block + b"\n\n")
            if parsed:
                self.events.extend(parsed)
                return parsed[0]

    async def until_terminal(self) -> Event:
        """Read up to and including the terminal event (the stream itself may still be open)."""
        while True:
            event = await self.next_event()
            if event.type in TERMINAL_TYPES:
                return event

    async def rest(self) -> list[Event]:
        """Every event left, up to the end of the response."""
        tail = self._buffer + await self.response.content.read()
        self.raw += tail[len(self._buffer) :]
        self._buffer = b""
        more = parse_sse(tail)
        self.events.extend(more)
        return more


async def start_run(daemon: Daemon, session_id: str, code: str, **body: Any) -> LiveRun:
    """POST a run and return its stream once the answer is 200 (the caller releases the response)."""
    response = await daemon.client.post(f"/session/{session_id}/run", json={"code": code, **body})
    assert response.status == 200, await response.text()
    return LiveRun(response)


@asynccontextmanager
async def open_run(daemon: Daemon, session_id: str, code: str, **body: Any) -> AsyncIterator[LiveRun]:
    live = await start_run(daemon, session_id, code, **body)
    try:
        yield live
    finally:
        live.response.release()


async def expect_error(response: ClientResponse, status: int, code: str) -> dict[str, Any]:
    """The answer is `status` with the contract's JSON error body {code, message}; returns the body."""
    text = await response.text()
    assert response.status == status, (response.status, text)
    assert response.content_type == "application/json", (response.content_type, text)
    assert "<html" not in text.lower()
    body = await response.json()
    assert isinstance(body, dict), body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


async def get_session(daemon: Daemon, session_id: str) -> dict[str, Any]:
    response = await daemon.client.get(f"/session/{session_id}")
    assert response.status == 200, await response.text()
    return await response.json()  # type: ignore[no-any-return]
