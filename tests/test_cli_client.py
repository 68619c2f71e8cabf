"""The `execd` command line as a user runs it: a real subprocess (`python -m execd run ...`) against
a real daemon. Exit codes pass through, stdout and stderr stay apart, Ctrl-C interrupts the run,
JSON for scripts, sessions/attach/close, and a stream cut by a proxy resumed without a trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execd.client import AsyncClient, Client
from tests.helpers_control import REPO, ServedDaemon, free_port, served

# Long enough that a first Ctrl-C alone cannot end a run that ignores SIGINT: the second must.
INTERRUPT_GRACE_MS = 30_000
CHATTY = (
    "for i in $(seq 1 300); do echo out-$i; echo err-$i >&2; "
    "[ $((i % 60)) = 0 ] && sleep 0.05; done; printf 'h\\xc3\\xa9llo \\xe2\\x9c\\x93 no newline'"
)
# Over 60 KB of stdout however the daemon chunks it, so that every cut point below is mid-stream.
BIG = CHATTY.replace("echo out-$i", "printf 'out-%d %0200d\\n' $i 0")


@pytest.fixture(scope="module")
def daemon() -> Iterator[ServedDaemon]:
    with served("--interrupt-grace-ms", str(INTERRUPT_GRACE_MS)) as served_daemon:
        yield served_daemon


def environment(url: str | None, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    return {**base, **({"EXECD_URL": url} if url else {}), **extra}


def execd(url: str | None, *args: str, stdin: bytes = b"", **env: str) -> subprocess.CompletedProcess[bytes]:
    """The command line, its URL from $EXECD_URL (the default a user sets once)."""
    command = [sys.executable, "-m", "execd", *args]
    return subprocess.run(command, input=stdin, capture_output=True, cwd=REPO, env=environment(url, **env), timeout=60)


async def start_execd(url: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "execd", *args, cwd=REPO, env=environment(url),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def session_ids(url: str) -> set[str]:
    with Client(url) as client:
        return {s["session_id"] for s in client.list_sessions()}


# ----- execd run -------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status"), [("true", 0), ("(exit 3)", 3), ("exit 3", 3)])
def test_run_exits_with_the_runs_exit_code(daemon: ServedDaemon, code: str, status: int) -> None:
    done = execd(daemon.url, "run", "--", code)
    assert (done.returncode, done.stdout, done.stderr) == (status, b"", b"")


def test_run_keeps_stdout_and_stderr_apart_byte_for_byte(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", "--", CHATTY)
    assert done.returncode == 0, done.stderr
    out = "".join(f"out-{i}\n" for i in range(1, 301)) + "héllo ✓ no newline"
    assert done.stdout == out.encode()
    assert done.stderr == "".join(f"err-{i}\n" for i in range(1, 301)).encode()


def test_run_reads_the_code_from_stdin_and_joins_words_after_the_dashes(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", stdin=b"x=1\nfor i in a b; do\n  echo $x$i\ndone\n")
    assert (done.returncode, done.stdout) == (0, b"1a\n1b\n")
    words = execd(daemon.url, "run", "--cwd", "/tmp", "--", "echo", "-n", "$PWD")
    assert (words.returncode, words.stdout) == (0, b"/tmp")


def test_run_closes_the_session_it_opened_and_keeps_a_given_one(daemon: ServedDaemon) -> None:
    before = session_ids(daemon.url)
    assert execd(daemon.url, "run", "--", "true").returncode == 0
    assert session_ids(daemon.url) == before
    with Client(daemon.url) as client, client.create_session() as session:
        assert execd(daemon.url, "run", "--session", session.id, "--", "x=42; cd /tmp").returncode == 0
        later = execd(daemon.url, "run", "--session", session.id, "--", "echo $x $PWD")
        assert later.stdout == b"42 /tmp\n"


def test_run_timeout_exits_with_the_interrupts_code(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", "--timeout-ms", "200", "--", "echo before; sleep 30")
    assert (done.returncode, done.stdout, done.stderr) == (130, b"before\n", b"")


def test_run_error_event_exits_1_with_its_code(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", "--", "kill -9 $$")
    assert done.returncode == 1
    assert done.stderr.decode().startswith("execd: SESSION_DIED: ") and done.stderr.count(b"\n") == 1


def test_run_in_an_unknown_session_exits_1_with_the_contract_code(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", "--session", "nope", "--", "true")
    assert done.returncode == 1
    assert done.stderr == b"execd: SESSION_NOT_FOUND: no session with id 'nope'\n"


def test_run_json_prints_events_then_a_summary(daemon: ServedDaemon) -> None:
    done = execd(daemon.url, "run", "--json", "--", "echo hi; echo oops >&2; (exit 4)")
    assert done.returncode == 4 and done.stderr == b""
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [e["type"] for e in lines] == ["init", "stdout", "stderr", "execution_complete", "summary"]
    summary = lines[-1]
    assert summary["exit_code"] == 4 and summary["error"] is None and summary["last_seq"] == 3
    assert summary["run_id"] == lines[0]["run_id"] and summary["session_id"] == lines[0]["session_id"]


async def test_ctrl_c_interrupts_the_run_and_exits_130(daemon: ServedDaemon) -> None:
    before = session_ids(daemon.url)
    proc = await start_execd(daemon.url, "run", "--", "echo started; sleep 30; echo never")
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"started\n"
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert (proc.returncode, out, err) == (130, b"", b"")
    assert session_ids(daemon.url) == before


async def test_second_ctrl_c_sends_sigkill(daemon: ServedDaemon) -> None:
    ignores_sigint = (
        "python3 -c 'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        'print("started", flush=True); time.sleep(60)\''
    )
    proc = await start_execd(daemon.url, "run", "--", ignores_sigint)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"started\n"
    proc.send_signal(signal.SIGINT)
    with pytest.raises(TimeoutError):  # the program ignores SIGINT, and the daemon's grace is long
        await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 130  # the run's code keeps the first interrupt's signal


# ----- sessions, close, attach -----------------------------------------------------------------


def test_sessions_lists_a_table_and_json(daemon: ServedDaemon) -> None:
    with Client(daemon.url) as client, client.create_session(cwd="/tmp", labels={"who": "cli"}) as session:
        table = execd(daemon.url, "sessions")
        assert table.returncode == 0
        header, *rows = table.stdout.decode().splitlines()
        assert header.split() == ["ID", "STATE", "USER", "CWD", "RUNS", "LABELS"]
        row = next(r.split() for r in rows if r.startswith(session.id))
        assert row[1] == "idle" and row[3:] == ["/tmp", "0", "who=cli"]
        listed = json.loads(execd(daemon.url, "sessions", "--json").stdout)
        assert session.id in [s["session_id"] for s in listed["sessions"]]


def test_close_closes_and_an_unknown_session_is_an_error(daemon: ServedDaemon) -> None:
    with Client(daemon.url) as client:
        first, second = client.create_session(), client.create_session()
    closed = execd(daemon.url, "close", first.id)
    assert (closed.returncode, closed.stdout) == (0, f"closed {first.id} (closed)\n".encode())
    as_json = execd(daemon.url, "close", second.id, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["state"] == "closed"
    again = execd(daemon.url, "close", first.id)
    assert again.returncode == 1 and again.stdout == b""
    assert again.stderr == f"execd: SESSION_NOT_FOUND: no session with id '{first.id}'\n".encode()
    assert not session_ids(daemon.url) & {first.id, second.id}


def test_attach_follows_a_background_run_and_exits_with_its_code(daemon: ServedDaemon) -> None:
    with Client(daemon.url) as client, client.create_session() as session:
        session.start("echo one; sleep 0.3; echo two >&2; (exit 5)", run_id="bg-1")
        whole = execd(daemon.url, "attach", session.id, "bg-1")
        assert (whole.returncode, whole.stdout, whole.stderr) == (5, b"one\n", b"two\n")
        after = execd(daemon.url, "attach", session.id, "bg-1", "--after", "1")
        assert (after.returncode, after.stdout, after.stderr) == (5, b"", b"two\n")
        # After its last event the daemon answers 204: the exit code comes from the run object.
        at_end = execd(daemon.url, "attach", session.id, "bg-1", "--after", "3", "--json")
        assert at_end.returncode == 5 and json.loads(at_end.stdout)["exit_code"] == 5
        unknown = execd(daemon.url, "attach", session.id, "nope")
        assert unknown.returncode == 1 and unknown.stderr.startswith(b"execd: RUN_NOT_FOUND: ")
    gone = execd(daemon.url, "attach", session.id, "bg-1")
    assert gone.returncode == 1 and gone.stderr.startswith(b"execd: SESSION_NOT_FOUND: ")


async def test_ctrl_c_detaches_attach_and_leaves_the_run_alone(daemon: ServedDaemon) -> None:
    async with AsyncClient(daemon.url) as client, await client.create_session() as session:
        await session.start("echo started; sleep 30", run_id="long")
        proc = await start_execd(daemon.url, "attach", session.id, "long")
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 15) == b"started\n"
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 130
        assert err == f"execd: detached; the run goes on: execd attach {session.id} long --after 1\n".encode()
        assert (await session.get_run("long"))["state"] == "running"


# ----- usage, tokens, reachability -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("attach", "only-a-session"), ("run", "--timeout-ms", "-1", "--", "true"), ("close",), ("run", "--bogus")],
    ids=["missing", "negative", "close", "flag"],
)
def test_bad_usage_is_one_line_and_status_2(args: tuple[str, ...]) -> None:
    done = execd("http://127.0.0.1:1", *args)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.startswith(b"execd: usage: ") and done.stderr.count(b"\n") == 1, done.stderr


def test_the_token_comes_from_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("cli-secret\n")
    with served("--access-token-file", str(token)) as daemon:
        anonymous = execd(daemon.url, "sessions")
        assert anonymous.returncode == 1 and anonymous.stderr.startswith(b"execd: UNAUTHORIZED: ")
        by_flag = execd(daemon.url, "run", "--token-file", str(token), "--", "echo ok")
        assert (by_flag.returncode, by_flag.stdout) == (0, b"ok\n")
        by_env = execd(daemon.url, "sessions", "--json", EXECD_TOKEN_FILE=str(token))
        assert by_env.returncode == 0 and json.loads(by_env.stdout) == {"sessions": []}
    missing = execd(daemon.url, "sessions", "--token-file", str(tmp_path / "absent"))
    assert missing.returncode == 2 and missing.stderr.startswith(b"execd: usage: cannot read the token file")


def test_an_unreachable_daemon_is_one_line_and_status_1() -> None:
    done = execd(None, "sessions", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and done.stderr.startswith(b"execd: UNREACHABLE: ") and done.stderr.count(b"\n") == 1


# ----- resume across a cut ---------------------------------------------------------------------


class CutOnce:
    """A TCP proxy to the daemon that cuts the first event stream (the first answer that says
    `text/event-stream`) once `after_bytes` of it have passed; every other byte goes through."""

    def __init__(self, target_port: int, after_bytes: int) -> None:
        self.target_port, self.after_bytes = target_port, after_bytes
        self.cuts = 0
        self.tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> Any:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            for task in self.tasks:
                task.cancel()

    async def _serve(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        upstream = asyncio.create_task(self._copy(down_reader, up_writer, cut=False))
        self.tasks.add(upstream)
        await self._copy(up_reader, down_writer, cut=True)
        upstream.cancel()
        for writer in (up_writer, down_writer):
            writer.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: bool) -> None:
        passed: int | None = None  # bytes of the stream so far, once this answer is a stream
        head = b""  # the answer's first bytes, where its headers are
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                head = (head + data)[:8192] if len(head) < 8192 else head
                if cut and passed is None and self.cuts == 0 and b"text/event-stream" in head:
                    passed = 0
                if passed is not None and passed + len(data) > self.after_bytes:
                    writer.write(data[: self.after_bytes - passed])
                    await writer.drain()
                    self.cuts += 1
                    return
                writer.write(data)
                await writer.drain()
                if passed is not None:
                    passed += len(data)


@pytest.mark.parametrize("after_bytes", [300, 9000])
async def test_a_cut_stream_is_resumed_and_the_output_is_byte_identical(daemon: ServedDaemon, after_bytes: int) -> None:
    uncut = await asyncio.to_thread(execd, daemon.url, "run", "--", BIG)
    assert uncut.returncode == 0 and len(uncut.stdout) > 60_000
    proxy = CutOnce(daemon.port, after_bytes)
    async with proxy.serving() as url:
        cut = await asyncio.to_thread(execd, None, "run", "--url", url, "--", BIG)
    assert proxy.cuts == 1
    assert (cut.returncode, cut.stdout, cut.stderr) == (0, uncut.stdout, uncut.stderr)
