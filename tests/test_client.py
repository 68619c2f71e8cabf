"""execd.client against a real daemon: every route, every error class, streams cut by a proxy
and resumed (each event once, output byte-identical), a retried POST that answers the same run,
and the blocking client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from execd import client as execd_client
from execd.client import AsyncClient, Client, Event
from tests.conftest import Daemon, DaemonFactory
from tests.helpers_control import served

CHATTY = "for i in $(seq 1 2000); do echo out-$i; echo err-$i >&2; done; echo end"


def url_of(daemon: Daemon) -> str:
    return str(daemon.client.make_url("")).rstrip("/")


class CuttingProxy:
    """A TCP proxy to the daemon that cuts each of the first `cuts` connections once it has passed
    `after_bytes` bytes of answer: the client sees its stream end mid-run."""

    def __init__(self, target_port: int, after_bytes: int, cuts: int) -> None:
        self.target_port, self.after_bytes, self.cuts_left = target_port, after_bytes, cuts
        self.cut = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        cut_this = self.cuts_left > 0
        self.cuts_left -= 1 if cut_this else 0
        upstream = asyncio.create_task(_pipe(down_reader, up_writer, None))
        if await _pipe(up_reader, down_writer, self.after_bytes if cut_this else None):
            self.cut += 1
        upstream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upstream
        for writer in (up_writer, down_writer):
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int | None) -> bool:
    """Copy until EOF, or until `limit` bytes have passed: then True (the connection is cut)."""
    passed = 0
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(4096):
            if limit is not None and passed + len(data) > limit:
                writer.write(data[: limit - passed])
                await writer.drain()
                return True
            writer.write(data)
            await writer.drain()
            passed += len(data)
    return False


@pytest.fixture
async def aio(daemon: Daemon) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(url_of(daemon)) as client:
        yield client


async def test_client_runs_code_and_keeps_state(aio: AsyncClient) -> None:
    async with await aio.create_session(labels={"who": "client-test"}) as session:
        assert session.info["labels"] == {"who": "client-test"}
        first = await session.run("cd /tmp; X=42; echo hi; echo oops >&2; (exit 3)")
        assert (first.exit_code, first.stdout, first.stderr, first.cwd) == (3, "hi\n", "oops\n", "/tmp")
        second = await session.run("echo $X $PWD", env={"Y": "1"}, stdin="ignored")
        assert second.stdout == "42 /tmp\n"
        assert [s["session_id"] for s in await aio.list_sessions()] == [session.id]
        details = await session.refresh()
        assert details["resources"]["num_processes"] >= 1
        runs = await session.runs()
        assert [r["run_id"] for r in runs] == [second.run_id, first.run_id]
        assert (await session.get_run(first.run_id))["exit_code"] == 3
    with pytest.raises(execd_client.SessionNotFound) as gone:
        await aio.get_session(session.id)
    assert (gone.value.status, gone.value.code) == (404, "SESSION_NOT_FOUND")


async def test_client_streams_events_as_they_come(aio: AsyncClient) -> None:
    async with await aio.create_session() as session:
        events = [e async for e in session.stream("echo a; sleep 0.1; echo b")]
        assert [e.type for e in events] == ["init", "stdout", "stdout", "execution_complete"]
        assert [e.seq for e in events] == [0, 1, 2, 3]
        assert "".join(e.text for e in events) == "a\nb\n"


async def test_client_background_run_attach_interrupt_and_stdin(aio: AsyncClient) -> None:
    async with await aio.create_session() as session:
        run = await session.start("echo started; sleep 30")
        assert run["state"] == "running"
        seen: list[Event] = []
        async for event in session.attach(run["run_id"]):
            seen.append(event)
            if event.text == "started\n":
                assert (await session.interrupt())["run_id"] == run["run_id"]
        assert seen[-1].data["interrupted"] is True and seen[-1].data["exit_code"] == 130
        later = await session.attach(run["run_id"], after=seen[-2].seq).__anext__()
        assert later == seen[-1]  # resumes after a cursor
        fed = await aio.request(
            "POST", f"/session/{session.id}/run", {"code": "cat; echo done", "stdin": "stream", "background": True}
        )
        assert await session.write_stdin(fed["run_id"], "line\n", eof=True) == 5
        result = await session.wait(fed["run_id"])
        assert (result.exit_code, result.stdout) == (0, "line\ndone\n")


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.get_session("nope"), execd_client.SessionNotFound),
        (lambda c: c.session("nope").run("true"), execd_client.SessionNotFound),
        (lambda c: c.create_session(cwd="relative"), execd_client.InvalidRequest),
        (lambda c: c.request("GET", "/no/such/route"), execd_client.NotFound),
        (lambda c: c.request("PATCH", "/session"), execd_client.InvalidRequest),
    ],
    ids=["get", "run", "invalid", "route", "method"],
)
async def test_client_raises_the_error_class_of_each_code(aio: AsyncClient, call: Any, error: type) -> None:
    with pytest.raises(error) as raised:
        await call(aio)
    assert isinstance(raised.value, execd_client.ExecdError) and raised.value.message


async def test_client_raises_session_errors_by_code(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_sessions=1, interrupt_grace_ms=500)
    async with AsyncClient(url_of(daemon)) as aio:
        session = await aio.create_session()
        with pytest.raises(execd_client.TooManySessions):
            await aio.create_session()
        running = await session.start("sleep 30")
        with pytest.raises(execd_client.SessionBusy) as busy:
            await session.run("true")
        assert busy.value.body["run_id"] == running["run_id"]
        with pytest.raises(execd_client.StdinNotStreamed):
            await session.write_stdin(running["run_id"], "x")
        with pytest.raises(execd_client.NoActiveRun):
            await session.interrupt(run_id="another")
        with pytest.raises(execd_client.RunNotFound):
            await session.get_run("unknown")
        await session.interrupt(signal="SIGKILL")
        await session.wait(running["run_id"])
        await session.run("exit 5")
        with pytest.raises(execd_client.SessionEnded):
            await session.run("true")
        await session.close()


async def test_client_token_errors_are_unauthorized(tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("client-secret")
    with served("--access-token-file", str(token)) as daemon:
        async with AsyncClient(daemon.url) as anonymous:
            with pytest.raises(execd_client.Unauthorized):
                await anonymous.list_sessions()
        async with AsyncClient(daemon.url, token="client-secret") as aio, await aio.create_session() as session:
            assert (await session.run("echo ok")).stdout == "ok\n"


async def test_client_stream_cut_mid_run_is_resumed_each_event_once(daemon: Daemon) -> None:
    async with AsyncClient(url_of(daemon)) as aio:
        session = await aio.create_session()
        whole = await session.run(CHATTY)
        proxy = CuttingProxy(daemon.client.port, after_bytes=20_000, cuts=3)
        async with AsyncClient(await proxy.start(), backoff_s=0.01) as cut:
            events = [e async for e in cut.session(session.id).stream(CHATTY)]
        await proxy.stop()
        assert proxy.cut >= 2  # cut mid-run, more than once (the last may end before its limit)
        seqs = [e.seq for e in events]
        assert seqs == list(range(len(events)))  # every event once, in order
        resumed = execd_client.RunResult.of("x", events)
        assert (resumed.stdout, resumed.stderr, resumed.exit_code) == (whole.stdout, whole.stderr, 0)
        await session.close()


async def test_client_retry_before_any_event_answers_the_same_run(daemon: Daemon) -> None:
    async with AsyncClient(url_of(daemon)) as aio:
        session = await aio.create_session()
        proxy = CuttingProxy(daemon.client.port, after_bytes=0, cuts=1)  # the first POST's answer is lost
        async with AsyncClient(await proxy.start(), backoff_s=0.01) as cut:
            result = await cut.session(session.id).run("echo once >> /tmp/execd-client-once-$EXECD_SESSION_ID; echo ok")
        await proxy.stop()
        assert proxy.cut == 1 and result.stdout == "ok\n"
        count = await session.run("wc -l < /tmp/execd-client-once-$EXECD_SESSION_ID; rm /tmp/execd-client-once-*")
        assert count.stdout.strip() == "1"  # the retried POST did not run the code again
        assert len(await session.runs()) == 2
        await session.close()


def test_the_blocking_client_has_the_same_shape() -> None:
    with served() as daemon, Client(daemon.url) as blocking:
        assert blocking.healthz()["status"] == "ok"
        with blocking.create_session(cwd="/tmp") as session:
            assert session.run("pwd").stdout == "/tmp\n"
            assert [e.type for e in session.stream("echo x")] == ["init", "stdout", "execution_complete"]
            run = session.start("echo bg")
            assert session.wait(run["run_id"]).stdout == "bg\n"
        assert blocking.list_sessions() == []


async def test_client_says_unreachable_when_nothing_answers() -> None:
    from tests.helpers_control import free_port

    async with AsyncClient(f"http://127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(execd_client.Unreachable) as raised:
            await nowhere.list_sessions()
    assert raised.value.code == "UNREACHABLE"


def test_client_has_an_error_class_for_every_code_the_daemon_answers() -> None:
    from tests.test_docs import error_codes

    run_endings = {"SESSION_DIED", "SESSION_CLOSED"}  # only in a run's `error` event, never an answer
    missing = error_codes() - run_endings - set(execd_client.ERRORS)
    assert not missing, f"codes with no ExecdError subclass: {missing}"


async def test_client_raises_conflict_size_and_reader_errors(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_body_bytes=4096, max_readers=1, interrupt_grace_ms=500)
    async with AsyncClient(url_of(daemon)) as aio, await aio.create_session() as session:
        await session.run("true", run_id="fixed")
        with pytest.raises(execd_client.RunIdConflict):
            await session.run("false", run_id="fixed")
        with pytest.raises(execd_client.PayloadTooLarge):
            await session.run("#" * 8192)
        run = await session.start("sleep 30")
        first = session.attach(run["run_id"])
        await first.__anext__()  # one reader attached: the limit
        with pytest.raises(execd_client.TooManyReaders):
            await session.attach(run["run_id"]).__anext__()
        await first.aclose()
        await session.interrupt(signal="SIGKILL")
        await session.wait(run["run_id"])
        fed = await aio.request(
            "POST", f"/session/{session.id}/run", {"code": "true", "stdin": "stream", "background": True}
        )
        await session.wait(fed["run_id"])
        with pytest.raises(execd_client.RunFinished):
            await session.write_stdin(fed["run_id"], "late")
