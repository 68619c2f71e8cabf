"""A Python client of the execd HTTP API: `AsyncClient` (aiohttp) and `Client`, the same shape for
code that does not use asyncio.

    async with AsyncClient("http://127.0.0.1:44772", token=token) as client:
        async with await client.create_session(cwd="/work") as session:
            result = await session.run("make test")
            print(result.exit_code, result.stdout)
            async for event in session.stream("tail -f log", timeout_ms=5000):
                print(event.type, event.text)

A stream whose connection drops is resumed where it stopped (`Last-Event-ID`, with a bounded
backoff): the caller sees every event once. Runs started by a stream carry a client-chosen
`run_id`, so a POST retried after a cut answers the same run instead of starting another, and a
grace (`disconnect_grace_ms`) that keeps the run going while the client reconnects. Every error
answer raises an `ExecdError` subclass named after its contract code.

It talks HTTP only: nothing here imports the daemon's code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import aiohttp

DEFAULT_URL = "http://127.0.0.1:44772"
RESUME_GRACE_MS = 10_000  # how long a run of a stream waits for its client to come back
TERMINAL = frozenset({"execution_complete", "error"})
T = TypeVar("T")

# ----- errors ----------------------------------------------------------------------------------


class ExecdError(Exception):
    """An error answer of the daemon: its HTTP status, contract code and message."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.body = dict(body or {})


class InvalidRequest(ExecdError): ...


class Unauthorized(ExecdError): ...


class SessionNotFound(ExecdError): ...


class RunNotFound(ExecdError): ...


class NotFound(ExecdError): ...


class SessionBusy(ExecdError): ...


class NoActiveRun(ExecdError): ...


class RunIdConflict(ExecdError): ...


class StdinNotStreamed(ExecdError): ...


class RunFinished(ExecdError): ...


class StdinClosed(ExecdError): ...


class SessionEnded(ExecdError): ...


class PayloadTooLarge(ExecdError): ...


class TooManySessions(ExecdError): ...


class TooManyReaders(ExecdError): ...


class ShuttingDown(ExecdError): ...


class SessionStartFailed(ExecdError): ...


class ResourceExhausted(ExecdError): ...


class Internal(ExecdError): ...


class StreamLost(ExecdError):
    """The stream could not be resumed within the client's reconnect budget."""


class Unreachable(ExecdError):
    """No answer from the daemon at all (refused, reset, timed out)."""

    CODE = "UNREACHABLE"  # not a contract code: no answer carried one


ERRORS: dict[str, type[ExecdError]] = {
    "INVALID_REQUEST": InvalidRequest,
    "UNAUTHORIZED": Unauthorized,
    "SESSION_NOT_FOUND": SessionNotFound,
    "RUN_NOT_FOUND": RunNotFound,
    "NOT_FOUND": NotFound,
    "METHOD_NOT_ALLOWED": InvalidRequest,
    "SESSION_BUSY": SessionBusy,
    "NO_ACTIVE_RUN": NoActiveRun,
    "RUN_ID_CONFLICT": RunIdConflict,
    "STDIN_NOT_STREAMED": StdinNotStreamed,
    "RUN_FINISHED": RunFinished,
    "STDIN_CLOSED": StdinClosed,
    "SESSION_ENDED": SessionEnded,
    "PAYLOAD_TOO_LARGE": PayloadTooLarge,
    "TOO_MANY_SESSIONS": TooManySessions,
    "TOO_MANY_READERS": TooManyReaders,
    "SHUTTING_DOWN": ShuttingDown,
    "SESSION_START_FAILED": SessionStartFailed,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "INTERNAL": Internal,
}


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    try:
        body = await response.json(content_type=None)
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError, aiohttp.ClientError):
        body, code, message = {}, "INTERNAL", f"HTTP {response.status} without the contract's JSON"
    raise ERRORS.get(code, ExecdError)(response.status, code, message, body)


# ----- events and results ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Event:
    """One SSE event of a run: its `type`, `seq` (None for a `gap`) and JSON `data`."""

    type: str
    seq: int | None
    data: dict[str, Any]

    @property
    def text(self) -> str:
        return str(self.data.get("text", "")) if self.type in ("stdout", "stderr") else ""

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


@dataclasses.dataclass(frozen=True)
class RunResult:
    run_id: str
    exit_code: int | None  # None when the run ended with an error event
    stdout: str
    stderr: str
    interrupted: bool = False
    timed_out: bool = False
    output_truncated: bool = False
    cwd: str | None = None
    shell_exited: bool = False
    error: dict[str, str] | None = None  # code and message of an error event
    dropped_bytes: int = 0  # output the daemon's log dropped before it was read (gap events)

    @classmethod
    def of(cls, run_id: str, events: list[Event]) -> RunResult:
        out = "".join(e.text for e in events if e.type == "stdout")
        err = "".join(e.text for e in events if e.type == "stderr")
        dropped = sum(int(e.data.get("dropped_bytes", 0)) for e in events if e.type == "gap")
        end = events[-1].data if events and events[-1].terminal else {}
        if events and events[-1].type == "error":
            error = {"code": str(end.get("code")), "message": str(end.get("message"))}
            return cls(run_id, None, out, err, error=error, dropped_bytes=dropped)
        return cls(
            run_id,
            end.get("exit_code"),
            out,
            err,
            interrupted=bool(end.get("interrupted")),
            timed_out=bool(end.get("timed_out")),
            output_truncated=bool(end.get("output_truncated")),
            cwd=end.get("cwd"),
            shell_exited=bool(end.get("shell_exited")),
            dropped_bytes=dropped,
        )


async def _events(response: aiohttp.ClientResponse) -> AsyncGenerator[Event, None]:
    """The SSE events of a response, as they arrive (comments, such as pings, skipped)."""
    fields: dict[str, str] = {}
    async for raw in response.content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if "data" in fields:
                data = json.loads(fields["data"])
                seq = int(fields["id"]) if "id" in fields else None
                yield Event(fields.get("event", data.get("type", "message")), seq, data)
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value


# ----- the client ------------------------------------------------------------------------------

_CUT = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError)


class AsyncClient:
    """One daemon: `url` and its access `token` (None when it has none)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        max_reconnects: int = 8,
        backoff_s: float = 0.05,
        timeout_s: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(self.url, headers=self._headers, timeout=self._timeout)
        return self._http

    async def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """One JSON request; an error answer raises its ExecdError, no answer Unreachable."""
        try:
            async with self.http.request(method, path, json=body) as response:
                await _raise_for(response)
                if response.status == 204:
                    return None
                return await response.json()
        except _CUT as exc:
            raise Unreachable(0, Unreachable.CODE, f"{method} {self.url}{path}: {exc or type(exc).__name__}") from exc

    # ----- daemon and sessions ------------------------------------------------------------------

    async def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/healthz")
        return result

    async def create_session(
        self,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        user: str | int | None = None,
        idle_timeout_s: float | None = None,
    ) -> AsyncSession:
        body = _without_none(cwd=cwd, env=env, labels=labels, user=user, idle_timeout_s=idle_timeout_s)
        info = await self.request("POST", "/session", body)
        return AsyncSession(self, info["session_id"], info)

    def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (nothing is asked of the daemon yet)."""
        return AsyncSession(self, session_id)

    async def list_sessions(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/session"))["sessions"])

    async def get_session(self, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/session/{session_id}")
        return result

    async def delete_session(self, session_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/session/{session_id}")
        return result

    # ----- streams ------------------------------------------------------------------------------

    async def follow(
        self, session_id: str, run_id: str, start: Mapping[str, Any] | None, after: int | None
    ) -> AsyncGenerator[Event, None]:
        """A run's events after `after` until its terminal event, across cuts: `start` is the body
        that starts the run (POSTed, and POSTed again while nothing of it was read: its run_id
        makes that safe), None to attach to a run that exists."""
        cursor, failures = after, 0
        while True:
            try:
                async with self._open(session_id, run_id, start, cursor) as response:
                    if response.status == 204:
                        return  # the run has ended and the cursor was its last event
                    await _raise_for(response)
                    async for event in _events(response):
                        failures = 0
                        if event.seq is not None:
                            cursor = event.seq
                        yield event
                        if event.terminal:
                            return
            except _CUT:
                pass
            failures += 1
            if failures > self.max_reconnects:
                raise StreamLost(0, "STREAM_LOST", f"run {run_id}: no answer after {self.max_reconnects} reconnects")
            await asyncio.sleep(min(self.backoff_s * 2 ** (failures - 1), 2.0))

    def _open(
        self, session_id: str, run_id: str, start: Mapping[str, Any] | None, cursor: int | None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        headers = {"Last-Event-ID": str(cursor)} if cursor is not None else {}
        if start is not None and cursor is None:
            return self.http.post(f"/session/{session_id}/run", json=start, headers=headers)
        return self.http.get(f"/session/{session_id}/runs/{run_id}/events", headers=headers)


class AsyncSession:
    """A session of a daemon; `async with` closes (deletes) it at the end."""

    def __init__(self, client: AsyncClient, session_id: str, info: Mapping[str, Any] | None = None) -> None:
        self.client = client
        self.id = session_id
        self.info: dict[str, Any] = dict(info or {})

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.close()
        except SessionNotFound:
            pass

    async def refresh(self) -> dict[str, Any]:
        """The session object now, with its resources."""
        self.info = await self.client.get_session(self.id)
        return self.info

    async def close(self) -> dict[str, Any]:
        return await self.client.delete_session(self.id)

    def stream(
        self,
        code: str,
        *,
        timeout_ms: int = 0,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        run_id: str | None = None,
        disconnect_grace_ms: int = RESUME_GRACE_MS,
    ) -> AsyncGenerator[Event, None]:
        """Run `code` and yield its events as they come, resuming across cuts."""
        run_id = run_id or secrets.token_hex(8)
        body = _run_body(code, timeout_ms, cwd, env, stdin, run_id, disconnect_grace_ms=disconnect_grace_ms)
        return self.client.follow(self.id, run_id, body, None)

    async def run(self, code: str, **options: Any) -> RunResult:
        """Run `code` to its end; its output and outcome."""
        run_id = options.pop("run_id", None) or secrets.token_hex(8)
        events = [event async for event in self.stream(code, run_id=run_id, **options)]
        return RunResult.of(run_id, events)

    async def start(
        self,
        code: str,
        *,
        timeout_ms: int = 0,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | None = None,
        run_id: str | None = None,
    ) -> dict[str, Any]:
        """A background run: it goes on with no reader; the run object at once."""
        body = _run_body(code, timeout_ms, cwd, env, stdin, run_id, background=True)
        result: dict[str, Any] = await self.client.request("POST", f"/session/{self.id}/run", body)
        return result

    def attach(self, run_id: str, after: int | None = None) -> AsyncGenerator[Event, None]:
        """An existing run's events after `after` (from its start when None), live until its end."""
        return self.client.follow(self.id, run_id, None, after)

    async def wait(self, run_id: str) -> RunResult:
        """Attach to a run until it ends; what is still in its log, and its outcome."""
        return RunResult.of(run_id, [event async for event in self.attach(run_id)])

    async def interrupt(self, signal: str = "SIGINT", run_id: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.request(
            "POST", f"/session/{self.id}/interrupt", _without_none(signal=signal, run_id=run_id)
        )
        return result

    async def write_stdin(self, run_id: str, data: str = "", eof: bool = False) -> int:
        body = {"data": data, "eof": eof}
        return int((await self.client.request("POST", f"/session/{self.id}/runs/{run_id}/stdin", body))["written"])

    async def runs(self) -> list[dict[str, Any]]:
        return list((await self.client.request("GET", f"/session/{self.id}/runs"))["runs"])

    async def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.client.request("GET", f"/session/{self.id}/runs/{run_id}")
        return result


def _run_body(
    code: str,
    timeout_ms: int,
    cwd: str | None,
    env: Mapping[str, str] | None,
    stdin: str | None,
    run_id: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """A run's request body, with only the fields given (a timeout of 0 is no timeout)."""
    return _without_none(
        code=code, timeout_ms=timeout_ms or None, cwd=cwd, env=env, stdin=stdin, run_id=run_id, **extra
    )


def _without_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


# ----- the same, without asyncio ---------------------------------------------------------------


class _Loop:
    """An event loop in a thread of its own, for the blocking client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="execd-client", daemon=True)
        self.thread.start()

    def call(self, work: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(_awaited(work), self.loop).result()

    def iterate(self, events: AsyncIterator[T]) -> Iterator[T]:
        while True:
            try:
                yield self.call(events.__anext__())
            except StopAsyncIteration:
                return

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


async def _awaited(work: Awaitable[T]) -> T:
    return await work


class Client:
    """The blocking client: the same methods as AsyncClient, without `await`."""

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, **options: Any) -> None:
        self._loop = _Loop()
        self.aio = AsyncClient(url, token, **options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._loop.call(self.aio.close())
        self._loop.stop()

    def healthz(self) -> dict[str, Any]:
        return self._loop.call(self.aio.healthz())

    def create_session(self, **options: Any) -> Session:
        return Session(self._loop, self._loop.call(self.aio.create_session(**options)))

    def session(self, session_id: str) -> Session:
        return Session(self._loop, self.aio.session(session_id))

    def list_sessions(self) -> list[dict[str, Any]]:
        return self._loop.call(self.aio.list_sessions())

    def get_session(self, session_id: str) -> dict[str, Any]:
        return self._loop.call(self.aio.get_session(session_id))

    def delete_session(self, session_id: str) -> dict[str, Any]:
        return self._loop.call(self.aio.delete_session(session_id))


class Session:
    """A session through the blocking client; `with` closes it at the end."""

    def __init__(self, loop: _Loop, aio: AsyncSession) -> None:
        self._loop = loop
        self.aio = aio
        self.id = aio.id

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call(self.aio.__aexit__())

    def close(self) -> dict[str, Any]:
        return self._loop.call(self.aio.close())

    def refresh(self) -> dict[str, Any]:
        return self._loop.call(self.aio.refresh())

    def run(self, code: str, **options: Any) -> RunResult:
        return self._loop.call(self.aio.run(code, **options))

    def stream(self, code: str, **options: Any) -> Iterator[Event]:
        return self._loop.iterate(self.aio.stream(code, **options))

    def start(self, code: str, **options: Any) -> dict[str, Any]:
        return self._loop.call(self.aio.start(code, **options))

    def attach(self, run_id: str, after: int | None = None) -> Iterator[Event]:
        return self._loop.iterate(self.aio.attach(run_id, after))

    def wait(self, run_id: str) -> RunResult:
        return self._loop.call(self.aio.wait(run_id))

    def interrupt(self, signal: str = "SIGINT", run_id: str | None = None) -> dict[str, Any]:
        return self._loop.call(self.aio.interrupt(signal, run_id))

    def write_stdin(self, run_id: str, data: str = "", eof: bool = False) -> int:
        return self._loop.call(self.aio.write_stdin(run_id, data, eof))

    def runs(self) -> list[dict[str, Any]]:
        return self._loop.call(self.aio.runs())

    def get_run(self, run_id: str) -> dict[str, Any]:
        return self._loop.call(self.aio.get_run(run_id))
