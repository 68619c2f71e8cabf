"""`execd mcp`, driven by the `mcp` SDK's own client over stdio, against a real daemon.

Each test launches `python -m execd mcp --url …` as the SDK's stdio client does for any agent,
and calls its tools as an agent would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from execd.mcp_server import HEAD_BYTES, TAIL_BYTES, Clip
from tests.helpers_control import REPO, ServedDaemon, free_port, served

TOOLS = {
    "open_session",
    "list_sessions",
    "close_session",
    "run",
    "start_run",
    "read_output",
    "write_stdin",
    "interrupt",
}


@pytest.fixture(scope="module")
def daemon() -> Iterator[ServedDaemon]:
    with served() as running:
        yield running


@contextlib.asynccontextmanager
async def connected(url: str, *args: str, env: dict[str, str] | None = None) -> AsyncIterator[ClientSession]:
    """An MCP client session with `execd mcp` launched over stdio (its stderr kept apart)."""
    command = ["-m", "execd", "mcp", "--url", url, *args]
    params = StdioServerParameters(command=sys.executable, args=command, cwd=str(REPO), env=env)
    with tempfile.TemporaryFile("w+") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, /, **arguments: Any) -> dict[str, Any]:
    """A tool call that must succeed; its structured result (the text content says the same)."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    assert json.loads(result.content[0].text) == data  # type: ignore[union-attr]
    return data


async def fails(session: ClientSession, tool: str, expected: str, /, **arguments: Any) -> dict[str, Any]:
    """A tool call that must end in a tool error carrying the contract code `expected` (not a crash)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result.content
    data: dict[str, Any] = result.structured_content
    assert data["code"] == expected, data
    assert data["message"]
    assert expected in result.content[0].text  # type: ignore[union-attr]
    return data


def sessions_of(daemon: ServedDaemon) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{daemon.url}/session", timeout=10) as response:
        sessions: list[dict[str, Any]] = json.load(response)["sessions"]
    return sessions


async def read_until_end(session: ClientSession, started: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """read_output from a run's cursor until it has ended; its last answer and all its stdout."""
    answer, stdout = started, started.get("stdout", "")
    for _ in range(30):
        if answer["state"] != "running":
            return answer, stdout
        answer = await call(
            session, "read_output", session_id=answer["session_id"], run_id=answer["run_id"], cursor=answer["cursor"]
        )
        stdout += answer["stdout"]
    raise AssertionError(f"the run did not end: {answer}")


async def test_tools_are_listed_with_input_schemas(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and "\n" not in tool.description, tool.name
        assert tool.input_schema["type"] == "object", tool.name
    assert tools["run"].input_schema["required"] == ["code"]
    assert tools["run"].input_schema["properties"]["timeout_s"]["default"] == 30.0
    assert set(tools["read_output"].input_schema["required"]) == {"session_id", "run_id"}
    signal = tools["interrupt"].input_schema["properties"]["signal"]
    assert signal["enum"] == ["SIGINT", "SIGTERM", "SIGKILL"]


async def test_session_lifecycle_and_state_between_runs(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        opened = await call(session, "open_session", cwd="/tmp", env={"X": "1"}, labels={"task": "mcp"})
        sid = opened["session_id"]
        assert opened["cwd"] == "/tmp" and opened["labels"] == {"task": "mcp"}
        first = await call(session, "run", session_id=sid, code="echo $X $PWD; y=2; cd /")
        assert (first["state"], first["exit_code"], first["stdout"]) == ("completed", 0, "1 /tmp\n")
        second = await call(session, "run", session_id=sid, code="echo $y $PWD")
        assert second["stdout"] == "2 /\n" and second["cwd"] == "/"
        listed = await call(session, "list_sessions")
        assert [s["labels"] for s in listed["sessions"] if s["session_id"] == sid] == [{"task": "mcp"}]
        closed = await call(session, "close_session", session_id=sid)
        assert closed["state"] == "closed"
        await fails(session, "run", "SESSION_NOT_FOUND", session_id=sid, code="true")


async def test_run_keeps_stdout_stderr_and_exit_code_apart(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        # No session_id: the server's own session, opened on first use, kept between runs.
        result = await call(session, "run", code="echo out; echo err >&2; z=9; (exit 3)")
        assert (result["exit_code"], result["stdout"], result["stderr"]) == (3, "out\n", "err\n")
        again = await call(session, "run", code="echo $z", stdin=None)
        assert again["session_id"] == result["session_id"] and again["stdout"] == "9\n"
        fed = await call(session, "run", code="tr a-z A-Z", stdin="hi\n")
        assert fed["stdout"] == "HI\n"
        limited = await call(session, "run", code="sleep 10", limit_s=0.3)
        assert limited["timed_out"] and limited["exit_code"] == 130
        ended = await call(session, "run", code="exit 4")
        assert ended["shell_exited"] and ended["exit_code"] == 4
        # The server's own session has ended: the next run gets a new one, and says which.
        fresh = await call(session, "run", code="echo ${z:-unset}")
        assert fresh["session_id"] != result["session_id"] and fresh["stdout"] == "unset\n"
    # The server closes its own session when its client goes away.
    assert fresh["session_id"] not in {s["session_id"] for s in sessions_of(daemon)}


async def test_a_long_run_returns_a_cursor_and_read_output_continues_it(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        began = time.monotonic()
        first = await call(session, "run", code="echo start; sleep 3; echo done", timeout_s=1)
        assert time.monotonic() - began < 2.5
        assert first["state"] == "running" and first["exit_code"] is None
        assert isinstance(first["cursor"], int) and first["run_id"]
        assert "read_output" in first["next"]
        last, stdout = await read_until_end(session, first)
    assert (last["state"], last["exit_code"]) == ("completed", 0)
    assert stdout == "start\ndone\n"  # each byte once across the calls


async def test_long_output_keeps_head_and_tail_and_counts_the_cut(daemon: ServedDaemon) -> None:
    code = "printf START; head -c 100000 /dev/zero | tr '\\0' x; printf END; echo small >&2"
    async with connected(daemon.url) as session:
        result = await call(session, "run", code=code)
    stdout = result["stdout"]
    cut = 5 + 100_000 + 3 - HEAD_BYTES - TAIL_BYTES
    assert stdout.startswith("START") and stdout.endswith("END")
    assert f"\n[… {cut} bytes cut …]\n" in stdout
    assert len(stdout.replace(f"\n[… {cut} bytes cut …]\n", "")) == HEAD_BYTES + TAIL_BYTES
    assert result["stderr"] == "small\n"


def test_a_cut_never_splits_a_character() -> None:
    clip = Clip(head=4, tail=4)
    clip.add("ab€" + "z" * 10 + "€€")  # € is 3 bytes: one is split at each edge of the cut
    assert str(clip) == "ab\n[… 16 bytes cut …]\n€"
    whole = Clip(head=4, tail=4)
    whole.add("ab€z")  # 6 bytes: fits, even though € straddles head and tail
    assert str(whole) == "ab€z"


async def test_start_run_with_streamed_stdin(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        sid = (await call(session, "open_session"))["session_id"]
        code = "while read -r line; do echo got $line; done; echo bye"
        started = await call(session, "start_run", session_id=sid, code=code, stream_stdin=True)
        assert started["state"] == "running" and started["run_id"]
        rid = started["run_id"]
        assert await call(session, "write_stdin", session_id=sid, run_id=rid, data="hello\n") == {"written": 6}
        began = time.monotonic()
        read = await call(session, "read_output", session_id=sid, run_id=rid)
        assert read["stdout"] == "got hello\n" and read["state"] == "running"
        assert time.monotonic() - began < 5  # back soon after the output, not at the end of the wait
        await call(session, "write_stdin", session_id=sid, run_id=rid, eof=True)
        last, stdout = await read_until_end(session, read)
        assert last["exit_code"] == 0 and stdout == "got hello\nbye\n"
        # Read again at the run's last cursor: nothing new, and its end.
        final = await call(session, "read_output", session_id=sid, run_id=rid, cursor=last["cursor"])
        assert (final["state"], final["exit_code"], final["stdout"]) == ("completed", 0, "")
        await call(session, "close_session", session_id=sid)


async def test_interrupt_ends_the_run_and_keeps_the_shell(daemon: ServedDaemon) -> None:
    async with connected(daemon.url) as session:
        await call(session, "run", code="v=kept")
        started = await call(session, "start_run", code="sleep 30")
        sid, rid = started["session_id"], started["run_id"]
        sent = await call(session, "interrupt", session_id=sid, run_id=rid)
        assert sent == {"run_id": rid, "signal": "SIGINT"}
        last, _ = await read_until_end(session, {**started, "state": "running"})
        assert last["exit_code"] == 130 and last["interrupted"] is True
        assert (await call(session, "run", session_id=sid, code="echo $v"))["stdout"] == "kept\n"


async def test_daemon_errors_are_tool_errors_with_their_contract_codes(daemon: ServedDaemon) -> None:
    nobody = "0" * 24
    async with connected(daemon.url) as session:
        await fails(session, "close_session", "SESSION_NOT_FOUND", session_id=nobody)
        await fails(session, "run", "SESSION_NOT_FOUND", session_id=nobody, code="true")
        await fails(session, "start_run", "SESSION_NOT_FOUND", session_id=nobody, code="true")
        await fails(session, "read_output", "SESSION_NOT_FOUND", session_id=nobody, run_id="r")
        await fails(session, "write_stdin", "SESSION_NOT_FOUND", session_id=nobody, run_id="r", data="x")
        await fails(session, "interrupt", "SESSION_NOT_FOUND", session_id=nobody)
        await fails(session, "open_session", "INVALID_REQUEST", cwd="/no/such/dir")
        sid = (await call(session, "open_session"))["session_id"]
        await fails(session, "read_output", "RUN_NOT_FOUND", session_id=sid, run_id="nope")
        await fails(session, "interrupt", "NO_ACTIVE_RUN", session_id=sid)
        rid = (await call(session, "start_run", session_id=sid, code="sleep 30"))["run_id"]
        busy = await fails(session, "run", "SESSION_BUSY", session_id=sid, code="true")
        assert busy["run_id"] == rid  # the contract's extra field comes along
        await fails(session, "write_stdin", "STDIN_NOT_STREAMED", session_id=sid, run_id=rid, data="x")
        await fails(session, "start_run", "INVALID_REQUEST", session_id=sid, code="cat", stdin="x", stream_stdin=True)
        await call(session, "close_session", session_id=sid)
        # The server still answers after all of that.
        assert (await call(session, "run", code="echo ok"))["stdout"] == "ok\n"


async def test_an_unreachable_daemon_is_a_tool_error() -> None:
    async with connected(f"http://127.0.0.1:{free_port()}") as session:
        await fails(session, "list_sessions", "UNREACHABLE")


async def test_the_token_comes_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with served("--access-token-file", str(token)) as locked:
        async with connected(locked.url) as session:
            await fails(session, "list_sessions", "UNAUTHORIZED")
        async with connected(locked.url, "--token-file", str(token)) as session:
            assert "sessions" in await call(session, "list_sessions")
        async with connected(locked.url, env={"EXECD_TOKEN_FILE": str(token)}) as session:
            assert "sessions" in await call(session, "list_sessions")


async def test_streamable_http_transport_and_a_clean_stop_on_sigterm(daemon: ServedDaemon) -> None:
    port = free_port()
    command = [sys.executable, "-m", "execd", "mcp", "--url", daemon.url, "--transport", "streamable-http"]
    server = await asyncio.create_subprocess_exec(*command, "--port", str(port), cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        await listening(port)
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            result = await client.call_tool("run", {"code": "echo over http"})
        assert not result.is_error and result.structured_content["stdout"] == "over http\n"
    finally:
        server.terminate()
        assert await asyncio.wait_for(server.wait(), 15) == 0
    # SIGTERM: the server closed its own session before it exited.
    assert result.structured_content["session_id"] not in {s["session_id"] for s in sessions_of(daemon)}


async def listening(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


def test_without_the_extra_it_says_how_to_install_it() -> None:
    # `mcp` made unimportable, as in an install without the extra.
    code = "import sys; sys.modules['mcp'] = None; from execd.cli import main; sys.exit(main(['mcp']))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.count("\n") == 1
    assert "pip install 'execd[mcp]'" in done.stderr


def test_serve_does_not_import_the_mcp_sdk() -> None:
    code = "import sys, execd.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'pydantic')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert done.stdout == "[]\n", done.stderr
