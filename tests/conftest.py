"""Fixtures shared by every test: a real daemon (aiohttp app + real bash), an SSE reader, leak checks."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer

from execd.api import create_app
from execd.api.keys import REGISTRY
from execd.config import Settings
from execd.process import SESSION_TAG, tag_of


@dataclass
class Event:
    type: str
    id: int
    data: dict[str, Any]


@dataclass
class RunResult:
    events: list[Event] = field(default_factory=list)
    raw: bytes = b""

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]

    def text(self, stream: str) -> str:
        return "".join(e.data["text"] for e in self.of(stream))

    @property
    def stdout(self) -> str:
        return self.text("stdout")

    @property
    def stderr(self) -> str:
        return self.text("stderr")

    @property
    def terminal(self) -> Event:
        return self.events[-1]

    @property
    def complete(self) -> dict[str, Any]:
        assert self.terminal.type == "execution_complete", self.events
        return self.terminal.data


GAP_ID = -1  # a `gap` event has no `id:` line (v2)


def parse_sse(raw: bytes) -> list[Event]:
    """Strict parser of the framing the contract pins: id, event, one data line; `: ping` comments;
    `gap` events with an event and a data line only."""
    events = []
    for block in raw.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        if lines[0] == "event: gap":
            assert len(lines) == 2 and lines[1].startswith("data: "), block
            data = json.loads(lines[1][len("data: ") :])
            assert data["type"] == "gap" and "seq" not in data and "timestamp" not in data, data
            events.append(Event(type="gap", id=GAP_ID, data=data))
            continue
        assert len(lines) == 3, block
        assert lines[0].startswith("id: ") and lines[1].startswith("event: ") and lines[2].startswith("data: "), block
        data = json.loads(lines[2][len("data: ") :])
        event = Event(type=lines[1][len("event: ") :], id=int(lines[0][len("id: ") :]), data=data)
        assert data["type"] == event.type and data["seq"] == event.id
        events.append(event)
    return events


async def read_run(response: ClientResponse) -> RunResult:
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    raw = await response.read()
    return RunResult(parse_sse(raw), raw)


class Daemon:
    """A client of one real daemon, with helpers named after the contract's routes."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    @property
    def app(self) -> Any:
        return self.client.server.app

    async def create(self, **body: Any) -> dict[str, Any]:
        response = await self.client.post("/session", json=body)
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]

    async def run(self, session_id: str, code: str, **body: Any) -> RunResult:
        async with self.client.post(f"/session/{session_id}/run", json={"code": code, **body}) as response:
            return await read_run(response)

    async def delete(self, session_id: str) -> dict[str, Any]:
        response = await self.client.delete(f"/session/{session_id}")
        assert response.status == 200, await response.text()
        return await response.json()  # type: ignore[no-any-return]


DaemonFactory = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def make_daemon() -> AsyncIterator[DaemonFactory]:
    """Start real daemons with the given settings; on teardown check no process of theirs is left."""
    clients: list[TestClient] = []

    async def start(**settings: Any) -> Daemon:
        app = create_app(Settings(**settings))
        client = TestClient(TestServer(app, handler_cancellation=True))
        await client.start_server()
        clients.append(client)
        return Daemon(client)

    yield start
    session_ids: set[str] = set()
    for client in clients:
        session_ids.update(client.server.app[REGISTRY].sessions)
        await client.close()
    assert_no_processes(session_ids)


@pytest.fixture
async def daemon(make_daemon: DaemonFactory) -> Daemon:
    return await make_daemon(interrupt_grace_ms=500)


def tagged_processes(session_ids: set[str]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        if proc.pid != os.getpid() and tag_of(proc.pid) in session_ids:
            found.append(proc)
    return found


def assert_no_processes(session_ids: set[str], timeout: float = 5.0) -> None:
    """No process of these sessions alive and no zombie child of ours, within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in tagged_processes(session_ids) if _is_live(p)]
        zombies = [c for c in psutil.Process().children() if is_zombie(c)]
        if not alive and not zombies:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: {alive} zombies: {zombies}")
        time.sleep(0.02)


def _is_live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def is_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def wait_for(
    condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition", interval: float = 0.01
) -> Any:
    """Poll `condition` (plain or async) until it is truthy and return its value: no fixed sleeps,
    the machines are shared and noisy. Fails naming `what` and the last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(interval)


__all__ = ["SESSION_TAG", "Daemon", "Event", "RunResult", "assert_no_processes", "parse_sse", "read_run", "wait_for"]
