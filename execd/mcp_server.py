"""`execd mcp`: an MCP server that gives agents a daemon's sessions and runs as tools.

Built on the official `mcp` SDK (the `mcp` extra: the daemon's own install does not carry it) and
talking to the daemon through `execd.client` only. stdio is the default transport; streamable HTTP
is an option, on loopback only, since whoever reaches it runs shell code.

Every run goes to the daemon as a background run and is read by attaching to it, so a tool call
never hangs on a long run: `run` waits up to its `timeout_s`, then answers with the run id, `state:
running` and a cursor (the `seq` of the last event read), and `read_output` carries on from there.
The run itself goes on on the daemon whether or not anyone reads it.

Output is clipped per stream to its first and last 8 KiB with the cut counted in the text, so one
noisy build cannot flood the agent's context, and the end of it (where the error usually is)
survives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

import aiohttp
from mcp.server import MCPServer
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from execd.client import (
    DEFAULT_URL,
    AsyncClient,
    AsyncSession,
    Event,
    ExecdError,
    SessionEnded,
    SessionNotFound,
    Unreachable,
)

HEAD_BYTES = 8 * 1024  # kept from the start of each stream
TAIL_BYTES = 8 * 1024  # kept from the end of each stream
# `run`'s default wait: below the 60 s request timeout that many MCP clients apply to a tool call.
RUN_WAIT_S = 30.0
READ_WAIT_S = 10.0
# read_output returns this long after the last new output, so a dialogue through write_stdin stays
# quick; a run that keeps printing is read until the wait bound.
QUIET_S = 0.3
UNREACHABLE = Unreachable.CODE  # not a contract code: the daemon did not answer at all (the client says so too)

INSTRUCTIONS = """\
Persistent bash shells on an execd daemon. A session is one long-lived shell: the current
directory, variables, functions and background jobs persist between runs. Call `run` to execute
code and get its exit code, stdout and stderr; without a session_id it uses this server's own
session. A run still going when the wait ends comes back with `state: running`, its run_id and a
cursor: call `read_output` with them until `state` is `completed` (or `aborted`), or `interrupt` it.
Long output keeps its first and last 8 KiB per stream with the cut counted."""

# ----- parameters, as the tools' JSON schemas show them --------------------------------------

SessionId = Annotated[str, Field(description="The session's id (from open_session, run or list_sessions).")]
RunSessionId = Annotated[
    str | None,
    Field(description="The session to run in. Omit it to use this server's own session, opened on first use."),
]
RunId = Annotated[str, Field(description="The run's id (from run or start_run).")]
Code = Annotated[
    str,
    Field(
        description="Bash code, any number of lines, run in the session's shell as if typed at a prompt: "
        "cd, export, functions and set options persist to later runs."
    ),
]
Cwd = Annotated[str | None, Field(description="Directory to cd to first (it persists, like a typed cd).")]
Env = Annotated[dict[str, str] | None, Field(description="Environment variables for this run only.")]
Stdin = Annotated[str | None, Field(description="Text given to the code on its stdin (default: end of file).")]
LimitS = Annotated[
    float,
    Field(ge=0, description="Interrupt the run (SIGINT) after this many seconds; 0 = no limit."),
]
WaitS = Annotated[
    float,
    Field(
        ge=0,
        le=3600,
        description="How long to wait for the run to end, in seconds. The run is not stopped when the wait "
        "ends: it goes on, and the answer has its run_id and a cursor.",
    ),
]
Cursor = Annotated[
    int | None,
    Field(ge=0, description="The cursor from the last run or read_output answer; omit it to read from the start."),
]
Signal = Annotated[
    Literal["SIGINT", "SIGTERM", "SIGKILL"],
    Field(description="SIGINT is Ctrl-C; SIGTERM and SIGKILL go to every process of the run, never the shell."),
]

# ----- output -------------------------------------------------------------------------------


class Clip:
    """One stream's text: its first and last bytes kept, the middle counted."""

    def __init__(self, head: int = HEAD_BYTES, tail: int = TAIL_BYTES) -> None:
        self.head, self.tail = bytearray(), bytearray()
        self.head_max, self.tail_max = head, tail
        self.total = 0

    def add(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        self.total += len(data)
        room = max(0, self.head_max - len(self.head))
        self.head += data[:room]
        self.tail += data[room:]
        del self.tail[: max(0, len(self.tail) - self.tail_max)]

    def __str__(self) -> str:
        if self.total == len(self.head) + len(self.tail):
            return (self.head + self.tail).decode("utf-8", "replace")
        # A character split at either edge of the cut goes into the count.
        head, tail = self.head.decode("utf-8", "ignore"), self.tail.decode("utf-8", "ignore")
        cut = self.total - len(head.encode()) - len(tail.encode())
        return f"{head}\n[… {cut} bytes cut …]\n{tail}"


class Reading:
    """What one read of a run's events found: its output, the cursor, and its end if it came."""

    def __init__(self, cursor: int | None) -> None:
        self.stdout, self.stderr = Clip(), Clip()
        self.cursor = cursor
        self.end: Event | None = None
        self.dropped_bytes = 0

    def take(self, event: Event) -> None:
        if event.seq is not None:
            self.cursor = event.seq
        if event.type == "stdout":
            self.stdout.add(event.text)
        elif event.type == "stderr":
            self.stderr.add(event.text)
        elif event.type == "gap":
            self.dropped_bytes += int(event.data.get("dropped_bytes", 0))
        elif event.terminal:
            self.end = event


async def read_run(
    session: AsyncSession, run_id: str, after: int | None, wait_s: float, quiet_s: float | None = None
) -> Reading:
    """A run's events after `after` until its end or `wait_s`, whichever comes first; with
    `quiet_s`, also until that long passes without new output once some has come."""
    reading = Reading(after)
    events = session.attach(run_id, after)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        async with asyncio.timeout_at(deadline) as limit:
            async for event in events:
                reading.take(event)
                if quiet_s is not None and event.type in ("stdout", "stderr"):
                    limit.reschedule(min(deadline, loop.time() + quiet_s))
    except TimeoutError:
        pass  # the run goes on; the cursor says where to read on
    finally:
        await _close(events)
    return reading


async def _close(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


def outcome(session_id: str, run_id: str, reading: Reading, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """The answer of run and read_output: output, cursor, and the state the reading found (`run`
    is the run object, for a reading that ended without the terminal event)."""
    result: dict[str, Any] = {"session_id": session_id, "run_id": run_id, "state": "running", "exit_code": None}
    if reading.end is not None:
        result.update(_ended(reading.end))
    elif run is not None and run.get("state") != "running":
        result.update(_ended_run(run))
    result.update(stdout=str(reading.stdout), stderr=str(reading.stderr), cursor=reading.cursor)
    if reading.dropped_bytes:
        result["dropped_bytes"] = reading.dropped_bytes  # dropped from the daemon's log before it was read
    if result["state"] == "running":
        result["next"] = "Still running: call read_output with this session_id, run_id and cursor, or interrupt it."
    return result


def _ended(end: Event) -> dict[str, Any]:
    data = end.data
    if end.type == "error":
        return {"state": "aborted", "error": {"code": data.get("code"), "message": data.get("message")}}
    flags = ("interrupted", "timed_out", "shell_exited", "output_truncated")
    return {
        "state": "completed",
        "exit_code": data.get("exit_code"),
        "cwd": data.get("cwd"),
        **{flag: True for flag in flags if data.get(flag)},
    }


def _ended_run(run: dict[str, Any]) -> dict[str, Any]:
    ended: dict[str, Any] = {"state": run.get("state"), "exit_code": run.get("exit_code")}
    ended.update({flag: True for flag in ("interrupted", "timed_out", "shell_exited") if run.get(flag)})
    if run.get("error"):
        ended["error"] = run["error"]
    return ended


# ----- answers ------------------------------------------------------------------------------


def answer(data: dict[str, Any], is_error: bool = False) -> CallToolResult:
    text = json.dumps(data, ensure_ascii=False)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=is_error)


async def answered(work: Awaitable[dict[str, Any]]) -> CallToolResult:
    """The tool's result, or the daemon's error as a tool error carrying its contract code."""
    try:
        return answer(await work)
    except ExecdError as exc:
        extra = {k: v for k, v in exc.body.items() if k not in ("code", "message")}
        return answer({"code": exc.code, "message": exc.message, **extra}, is_error=True)
    except (aiohttp.ClientError, OSError) as exc:
        return answer({"code": UNREACHABLE, "message": f"the daemon did not answer: {exc}"}, is_error=True)


# ----- the tools ----------------------------------------------------------------------------


class Tools:
    """The tools, over one client; `default` is the session used when a run names none."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.default: str | None = None
        self._opening = asyncio.Lock()

    async def open_session(
        self,
        cwd: Annotated[str | None, Field(description="Absolute start directory (default: the daemon's).")] = None,
        env: Annotated[dict[str, str] | None, Field(description="Environment variables of the shell.")] = None,
        labels: Annotated[dict[str, str] | None, Field(description="Free-form labels, e.g. {'task': 'x'}.")] = None,
    ) -> CallToolResult:
        """Open a new session: a persistent bash shell. Returns the session object; pass its
        session_id to run, start_run and the other tools. Close it with close_session."""
        return await answered(self._open(cwd, env, labels))

    async def _open(self, cwd: str | None, env: dict[str, str] | None, labels: dict[str, str] | None) -> dict[str, Any]:
        return (await self.client.create_session(cwd=cwd, env=env, labels=labels)).info

    async def list_sessions(self) -> CallToolResult:
        """List the daemon's sessions (live ones, and ended ones not yet forgotten) with their state,
        current directory, labels and the run in progress."""
        return await answered(self._list())

    async def _list(self) -> dict[str, Any]:
        return {"sessions": await self.client.list_sessions(), "default_session_id": self.default}

    async def close_session(self, session_id: SessionId) -> CallToolResult:
        """Close a session: its shell and every process it started are killed. Returns the final
        session object."""
        if session_id == self.default:
            self.default = None
        return await answered(self.client.delete_session(session_id))

    async def run(
        self,
        code: Code,
        session_id: RunSessionId = None,
        timeout_s: WaitS = RUN_WAIT_S,
        cwd: Cwd = None,
        env: Env = None,
        stdin: Stdin = None,
        limit_s: LimitS = 0,
    ) -> CallToolResult:
        """Run bash code in a session and wait for it: returns exit_code, stdout and stderr (each
        clipped to its first and last 8 KiB, the cut counted as "[… N bytes cut …]"). If the run has
        not ended within timeout_s, returns state "running", its run_id and a cursor: continue with
        read_output, or stop it with interrupt."""
        return await answered(self._run(code, session_id, timeout_s, cwd, env, stdin, limit_s))

    async def _run(
        self,
        code: str,
        session_id: str | None,
        timeout_s: float,
        cwd: str | None,
        env: dict[str, str] | None,
        stdin: str | None,
        limit_s: float,
    ) -> dict[str, Any]:
        session, run = await self._start(session_id, code, cwd=cwd, env=env, stdin=stdin, timeout_ms=_ms(limit_s))
        reading = await read_run(session, run["run_id"], None, timeout_s)
        return outcome(session.id, run["run_id"], reading)

    async def start_run(
        self,
        code: Code,
        session_id: RunSessionId = None,
        cwd: Cwd = None,
        env: Env = None,
        stdin: Stdin = None,
        stream_stdin: Annotated[
            bool, Field(description="Keep the run's stdin open, to be fed with write_stdin (then leave stdin out).")
        ] = False,
        limit_s: LimitS = 0,
    ) -> CallToolResult:
        """Start bash code in the background and return at once with its run_id (and session_id).
        Read its output with read_output, feed its stdin with write_stdin (with stream_stdin),
        stop it with interrupt."""
        return await answered(self._start_run(code, session_id, cwd, env, stdin, stream_stdin, limit_s))

    async def _start_run(
        self,
        code: str,
        session_id: str | None,
        cwd: str | None,
        env: dict[str, str] | None,
        stdin: str | None,
        stream_stdin: bool,
        limit_s: float,
    ) -> dict[str, Any]:
        if stream_stdin and stdin is not None:
            raise ExecdError(400, "INVALID_REQUEST", "give either stdin or stream_stdin, not both")
        stdin = "stream" if stream_stdin else stdin
        session, run = await self._start(session_id, code, cwd=cwd, env=env, stdin=stdin, timeout_ms=_ms(limit_s))
        return {"session_id": session.id, "run_id": run["run_id"], "state": run["state"], "cursor": None}

    async def read_output(
        self,
        session_id: SessionId,
        run_id: RunId,
        cursor: Cursor = None,
        wait_s: Annotated[
            float,
            Field(ge=0, le=60, description="While the run is live, wait up to this long for new output."),
        ] = READ_WAIT_S,
    ) -> CallToolResult:
        """Read a run's output since a cursor: the new stdout and stderr (clipped like run's), the
        run's state (running, completed or aborted), its exit_code once ended, and the new cursor
        to pass next time. While the run is live it waits up to wait_s, returning soon after new
        output arrives."""
        return await answered(self._read(session_id, run_id, cursor, wait_s))

    async def _read(self, session_id: str, run_id: str, cursor: int | None, wait_s: float) -> dict[str, Any]:
        session = self.client.session(session_id)
        reading = await read_run(session, run_id, cursor, wait_s, QUIET_S)
        run = await session.get_run(run_id) if reading.end is None and reading.cursor == cursor else None
        if run is not None and run.get("last_seq") != cursor:
            run = None  # it ended after the wait: its last events are still to be read
        return outcome(session_id, run_id, reading, run)

    async def write_stdin(
        self,
        session_id: SessionId,
        run_id: RunId,
        data: Annotated[str, Field(description="Text to write to the run's stdin (add \\n to end a line).")] = "",
        eof: Annotated[bool, Field(description="Close the run's stdin after the data.")] = False,
    ) -> CallToolResult:
        """Write to the stdin of a run started with start_run(stream_stdin=true). Returns the bytes
        written; read the run's answer with read_output."""
        return await answered(self._write(session_id, run_id, data, eof))

    async def _write(self, session_id: str, run_id: str, data: str, eof: bool) -> dict[str, Any]:
        return {"written": await self.client.session(session_id).write_stdin(run_id, data, eof)}

    async def interrupt(
        self,
        session_id: SessionId,
        run_id: Annotated[
            str | None, Field(description="Interrupt only if this is the run in progress (recommended).")
        ] = None,
        signal: Signal = "SIGINT",
    ) -> CallToolResult:
        """Interrupt the run in progress in a session, like Ctrl-C: the rest of its code is skipped,
        the shell and its state survive, and the run ends with exit code 128 + the signal's number.
        Read its end with read_output."""
        return await answered(self.client.session(session_id).interrupt(signal, run_id))

    async def _start(self, session_id: str | None, code: str, **options: Any) -> tuple[AsyncSession, dict[str, Any]]:
        """Start a background run; in the default session, reopened once if it has ended."""
        session = await self._session(session_id)
        try:
            return session, await session.start(code, **options)
        except (SessionEnded, SessionNotFound):
            if session_id is not None or self.default != session.id:
                raise
            self.default = None
        session = await self._session(None)
        return session, await session.start(code, **options)

    async def _session(self, session_id: str | None) -> AsyncSession:
        if session_id is not None:
            return self.client.session(session_id)
        async with self._opening:
            if self.default is None:
                self.default = (await self.client.create_session(labels={"opened_by": "execd mcp"})).id
        return self.client.session(self.default)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)
CHANGES = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)


def build_server(client: AsyncClient) -> tuple[MCPServer, Tools]:
    tools = Tools(client)
    server: MCPServer = MCPServer("execd", instructions=INSTRUCTIONS, log_level="WARNING")
    opens = ToolAnnotations(read_only_hint=False, destructive_hint=False)
    closes = ToolAnnotations(read_only_hint=False, destructive_hint=True)
    annotated: list[tuple[Callable[..., Awaitable[CallToolResult]], ToolAnnotations]] = [
        (tools.open_session, opens),
        (tools.list_sessions, READ_ONLY),
        (tools.close_session, closes),
        (tools.run, CHANGES),
        (tools.start_run, CHANGES),
        (tools.read_output, READ_ONLY),
        (tools.write_stdin, CHANGES),
        (tools.interrupt, CHANGES),
    ]
    for tool, hints in annotated:
        # The docstring as one paragraph: what the agent reads to choose the tool.
        server.add_tool(tool, description=" ".join((tool.__doc__ or "").split()), annotations=hints)
    return server, tools


# ----- the command --------------------------------------------------------------------------


def read_token(path: str | None) -> str | None:
    path = path or os.environ.get("EXECD_TOKEN_FILE")
    if not path:
        return None
    with open(path, encoding="utf-8") as file:
        return file.read().strip() or None


async def serve(url: str, token: str | None, transport: str, port: int) -> int:
    """Serve until the MCP client goes away or SIGTERM/SIGINT; then close this server's own session."""
    main = asyncio.current_task()
    assert main is not None
    # uvicorn (streamable-http) stops gracefully on these signals by itself, then raises them again
    # once its own handlers are gone: ours must then only keep the process alive for the cleanup.
    on_signal = main.cancel if transport == "stdio" else _ignore
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, on_signal)
    async with AsyncClient(url, token) as client:
        server, tools = build_server(client)
        try:
            await _transport(server, transport, port)
        except asyncio.CancelledError:
            main.uncancel()  # a signal: end as if the client had gone
        finally:
            if tools.default is not None:
                await answered(client.delete_session(tools.default))
    return 0


def _ignore() -> None:
    pass


async def _transport(server: MCPServer, transport: str, port: int) -> None:
    if transport == "stdio":
        await server.run_stdio_async()
    else:
        await server.run_streamable_http_async(host="127.0.0.1", port=port)


def main(args: argparse.Namespace) -> int:
    """`execd mcp`, with the flags cli.py parsed."""
    try:
        token = read_token(args.token_file)
    except OSError as exc:
        print(f"execd mcp: cannot read the token file: {exc.strerror or exc}", file=sys.stderr)
        return 2
    url = args.url or os.environ.get("EXECD_URL") or DEFAULT_URL
    return asyncio.run(serve(url, token, args.transport, args.port))
