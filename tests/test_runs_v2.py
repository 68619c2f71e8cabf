"""Runs as resources (contract v2): a test per rule, named after it, against a real daemon."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse

from tests.conftest import GAP_ID, Daemon, DaemonFactory, RunResult, parse_sse, read_run, wait_for
from tests.helpers_core import LiveRun, expect_error, get_session, start_run

RUN_FIELDS = {
    "run_id",
    "session_id",
    "state",
    "started_at",
    "finished_at",
    "exit_code",
    "interrupted",
    "timed_out",
    "shell_exited",
    "error",
    "output_bytes",
    "dropped_bytes",
    "last_seq",
    "readers",
    "background",
    "on_disconnect",
    "stdin",
}


async def session_id(daemon: Daemon, **body: Any) -> str:
    return str((await daemon.create(**body))["session_id"])


async def background(daemon: Daemon, sid: str, code: str, **body: Any) -> dict[str, Any]:
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": code, "background": True, **body})
    assert response.status == 202, await response.text()
    run: dict[str, Any] = await response.json()
    return run


async def run_object(daemon: Daemon, sid: str, rid: str) -> dict[str, Any]:
    response = await daemon.client.get(f"/session/{sid}/runs/{rid}")
    assert response.status == 200, await response.text()
    run: dict[str, Any] = await response.json()
    return run


async def finished(daemon: Daemon, sid: str, rid: str, timeout: float = 30.0) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        run = await run_object(daemon, sid, rid)
        return run if run["state"] != "running" else None

    result: dict[str, Any] = await wait_for(done, timeout, f"run {rid} finished", interval=0.02)
    return result


async def events(daemon: Daemon, sid: str, rid: str, *, after: int | None = None, **headers: str) -> RunResult:
    params = {"after": str(after)} if after is not None else {}
    async with daemon.client.get(f"/session/{sid}/runs/{rid}/events", params=params, headers=headers) as response:
        return await read_run(response)


def seqs(result: RunResult) -> list[int]:
    return [event.id for event in result.events if event.id != GAP_ID]


# ----- the run object and the routes ---------------------------------------------------------


async def test_background_run_answers_202_with_the_run_object(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    run = await background(daemon, sid, "echo hi")
    assert set(run) == RUN_FIELDS
    assert run["session_id"] == sid and run["background"] is True and run["on_disconnect"] == "continue"
    assert run["state"] == "running" and run["stdin"] is None and run["last_seq"] == 0
    done = await finished(daemon, sid, run["run_id"])
    assert done["state"] == "completed" and done["exit_code"] == 0 and done["output_bytes"] == 3
    assert done["finished_at"] is not None and done["readers"] == 0
    session = await get_session(daemon, sid)
    assert session["last_run_id"] == run["run_id"] and session["current_run_id"] is None


async def test_background_with_on_disconnect_interrupt_is_a_400(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    body = {"code": "true", "background": True, "on_disconnect": "interrupt"}
    await expect_error(await daemon.client.post(f"/session/{sid}/run", json=body), 400, "INVALID_REQUEST")


@pytest.mark.parametrize(
    "body",
    [
        {"run_id": "has space"},
        {"run_id": "x" * 65},
        {"run_id": ""},
        {"on_disconnect": "later"},
        {"disconnect_grace_ms": -1},
        {"background": "yes"},
    ],
)
async def test_bad_v2_run_fields_are_a_400(daemon: Daemon, body: dict[str, Any]) -> None:
    sid = await session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true", **body})
    await expect_error(response, 400, "INVALID_REQUEST")


async def test_run_list_is_newest_first_and_keeps_the_last_runs_kept(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(runs_kept=2)
    sid = await session_id(daemon)
    ids = []
    for i in range(4):
        result = await daemon.run(sid, f"echo {i}")
        ids.append(result.events[0].data["run_id"])
    response = await daemon.client.get(f"/session/{sid}/runs")
    listed = [run["run_id"] for run in (await response.json())["runs"]]
    assert listed == [ids[3], ids[2]]
    await expect_error(await daemon.client.get(f"/session/{sid}/runs/{ids[0]}"), 404, "RUN_NOT_FOUND")


async def test_unknown_run_is_404_run_not_found_and_unknown_session_first(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    await expect_error(await daemon.client.get(f"/session/{sid}/runs/nope"), 404, "RUN_NOT_FOUND")
    await expect_error(await daemon.client.get(f"/session/{sid}/runs/nope/events"), 404, "RUN_NOT_FOUND")
    await expect_error(await daemon.client.get("/session/nope/runs/nope"), 404, "SESSION_NOT_FOUND")
    await expect_error(await daemon.client.get("/session/nope/runs"), 404, "SESSION_NOT_FOUND")


async def test_run_object_reads_completed_only_once_its_terminal_event_is_in_the_log(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    run = await background(daemon, sid, "sleep 0.2; exit 4")
    done = await finished(daemon, sid, run["run_id"])
    replay = await events(daemon, sid, run["run_id"])
    assert replay.complete["exit_code"] == 4 and replay.complete["shell_exited"] is True
    assert done["exit_code"] == 4 and done["shell_exited"] is True and done["last_seq"] == replay.terminal.id


async def test_aborted_run_object_carries_its_error(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    run = await background(daemon, sid, "kill -9 $$")
    done = await finished(daemon, sid, run["run_id"])
    assert done["state"] == "aborted" and done["error"]["code"] == "SESSION_DIED" and done["exit_code"] is None


# ----- on_disconnect -------------------------------------------------------------------------


async def test_continue_run_survives_its_client_with_its_output_and_exit_code(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    live = await start_run(daemon, sid, "echo start; sleep 2; echo done; exit 3", on_disconnect="continue")
    init = await live.next_event()
    await live.next_event()
    live.response.close()  # the client goes away mid-run
    rid = init.data["run_id"]
    done = await finished(daemon, sid, rid)
    assert done["state"] == "completed" and done["exit_code"] == 3 and done["interrupted"] is False
    replay = await events(daemon, sid, rid)
    assert replay.stdout == "start\ndone\n" and replay.complete["exit_code"] == 3


async def test_interrupt_run_reattached_within_the_grace_keeps_running(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    live = await start_run(daemon, sid, "echo a; sleep 1.5; echo b", disconnect_grace_ms=3000)
    rid = (await live.next_event()).data["run_id"]
    assert (await live.next_event()).data["text"] == "a\n"
    live.response.close()
    await asyncio.sleep(0.5)
    resumed = await events(daemon, sid, rid, **{"Last-Event-ID": "1"})
    assert resumed.stdout == "b\n" and resumed.complete["interrupted"] is False and resumed.complete["exit_code"] == 0


async def test_interrupt_run_with_no_reader_past_the_grace_is_interrupted(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    live = await start_run(daemon, sid, "echo a; sleep 30; echo never", disconnect_grace_ms=3000)
    rid = (await live.next_event()).data["run_id"]
    await live.next_event()
    started = time.monotonic()
    live.response.close()
    await asyncio.sleep(1.5)
    assert (await run_object(daemon, sid, rid))["state"] == "running"  # within the grace
    done = await finished(daemon, sid, rid, timeout=10)
    assert time.monotonic() - started >= 2.9
    assert done["interrupted"] is True and done["exit_code"] == 130
    assert (await events(daemon, sid, rid)).stdout == "a\n"


async def test_a_reader_of_the_events_route_counts_for_on_disconnect(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    live = await start_run(daemon, sid, "echo a; sleep 1; echo b")
    rid = (await live.next_event()).data["run_id"]
    async with daemon.client.get(f"/session/{sid}/runs/{rid}/events", params={"after": "0"}) as second:
        await wait_for(lambda: run_object(daemon, sid, rid), what="second reader")
        assert (await run_object(daemon, sid, rid))["readers"] == 2
        live.response.close()  # one reader left: the run goes on
        result = await read_run(second)
    assert result.stdout == "a\nb\n" and result.complete["interrupted"] is False


# ----- retries -------------------------------------------------------------------------------


async def test_same_run_id_posted_twice_executes_once(daemon: Daemon, tmp_path: Path) -> None:
    sid = await session_id(daemon)
    counter = tmp_path / "count"
    code = f"echo x >> {counter}; sleep 0.3; echo ran"
    first = await daemon.run(sid, code, run_id="job-1")
    again = await daemon.run(sid, code, run_id="job-1")
    assert first.raw == again.raw  # the same run's events, replayed from its start
    assert counter.read_text() == "x\n"


async def test_same_run_id_posted_twice_concurrently_executes_once(daemon: Daemon, tmp_path: Path) -> None:
    sid = await session_id(daemon)
    counter = tmp_path / "count"
    code = f"echo x >> {counter}; sleep 0.3; echo ran"
    results = await asyncio.gather(*(daemon.run(sid, code, run_id="job-2") for _ in range(2)))
    assert results[0].raw == results[1].raw and results[0].stdout == "ran\n"
    background_retry = await daemon.client.post(
        f"/session/{sid}/run", json={"code": code, "run_id": "job-2", "background": True}
    )
    assert background_retry.status == 202 and (await background_retry.json())["state"] == "completed"
    assert counter.read_text() == "x\n"


async def test_same_run_id_with_other_code_is_a_409_run_id_conflict(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    await daemon.run(sid, "true", run_id="job-3")
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "false", "run_id": "job-3"})
    body = await expect_error(response, 409, "RUN_ID_CONFLICT")
    assert body["run_id"] == "job-3"


async def test_retry_resumes_after_last_event_id(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    first = await daemon.run(sid, "echo 1; echo 2 >&2", run_id="job-4")
    async with daemon.client.post(
        f"/session/{sid}/run", json={"code": "echo 1; echo 2 >&2", "run_id": "job-4"}, headers={"Last-Event-ID": "1"}
    ) as response:
        rest = await read_run(response)
    assert seqs(rest) == [e.id for e in first.events[2:]]


# ----- the events route ----------------------------------------------------------------------


async def test_events_after_a_cursor_follow_in_seq_order_none_repeated(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "for i in 1 2 3 4; do echo $i; echo e$i >&2; sleep 0.05; done"))["run_id"]
    await finished(daemon, sid, rid)
    whole = await events(daemon, sid, rid)
    assert seqs(whole) == list(range(len(whole.events)))
    for cursor in range(len(whole.events) - 1):
        part = await events(daemon, sid, rid, after=cursor)
        assert part.raw == b"".join(_frames(whole.raw)[cursor + 1 :])


def _frames(raw: bytes) -> list[bytes]:
    return [block + b"\n\n" for block in raw.split(b"\n\n") if block]


async def test_last_event_id_header_wins_over_after(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    result = await daemon.run(sid, "echo 1; echo 2")
    rid = result.events[0].data["run_id"]
    last = result.terminal.id
    part = await events(daemon, sid, rid, after=0, **{"Last-Event-ID": str(last - 1)})
    assert seqs(part) == [last]


@pytest.mark.parametrize("cursor", ["-1", "x", "1.5", "99", " 1", "\u0661"])
async def test_cursor_not_a_non_negative_integer_or_past_last_seq_is_a_400(daemon: Daemon, cursor: str) -> None:
    sid = await session_id(daemon)
    rid = (await daemon.run(sid, "true")).events[0].data["run_id"]
    for params, headers in (({"after": cursor}, {}), ({}, {"Last-Event-ID": cursor.strip() or cursor})):
        if headers and cursor.strip() != cursor:
            continue  # a header value loses its leading space in transit
        response = await daemon.client.get(f"/session/{sid}/runs/{rid}/events", params=params, headers=headers)
        await expect_error(response, 400, "INVALID_REQUEST")


async def test_cursor_at_the_last_event_of_a_finished_run_is_204(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    result = await daemon.run(sid, "echo hi")
    rid = result.events[0].data["run_id"]
    response = await daemon.client.get(f"/session/{sid}/runs/{rid}/events", params={"after": str(result.terminal.id)})
    assert response.status == 204 and await response.read() == b""


async def test_too_many_readers_is_a_429(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_readers=2)
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "sleep 5"))["run_id"]
    url = f"/session/{sid}/runs/{rid}/events"
    async with daemon.client.get(url) as first, daemon.client.get(url) as second:
        assert first.status == second.status == 200
        await wait_for(lambda: _readers(daemon, sid, rid, 2), what="two readers")
        await expect_error(await daemon.client.get(url), 429, "TOO_MANY_READERS")
    await daemon.client.post(f"/session/{sid}/interrupt")


async def _readers(daemon: Daemon, sid: str, rid: str, count: int) -> bool:
    return (await run_object(daemon, sid, rid))["readers"] == count


async def test_access_token_in_the_query_is_accepted_on_the_events_route_only(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="s3cret-token")
    auth = {"X-EXECD-ACCESS-TOKEN": "s3cret-token"}
    response = await daemon.client.post("/session", headers=auth)
    sid = (await response.json())["session_id"]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "echo hi"}, headers=auth)
    rid = (await read_run(response)).events[0].data["run_id"]
    ok = await daemon.client.get(f"/session/{sid}/runs/{rid}/events", params={"access_token": "s3cret-token"})
    assert (await read_run(ok)).stdout == "hi\n"
    for path in (f"/session/{sid}/runs/{rid}", f"/session/{sid}/runs", f"/session/{sid}"):
        await expect_error(await daemon.client.get(path, params={"access_token": "s3cret-token"}), 401, "UNAUTHORIZED")
    wrong = await daemon.client.get(f"/session/{sid}/runs/{rid}/events", params={"access_token": "guess"})
    body = await expect_error(wrong, 401, "UNAUTHORIZED")
    assert "guess" not in json.dumps(body)


# ----- the log's window, gaps and retention --------------------------------------------------


async def test_dropped_events_are_marked_by_one_gap_with_their_exact_wire_bytes(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(run_log_bytes=4096)
    sid = await session_id(daemon)
    # More text than the window holds however it is chunked (a loaded machine reads bigger chunks).
    code = "for i in $(seq 1 1000); do echo line-$i; (( i % 125 )) || sleep 0.01; done; echo tail >&2"
    rid = (await background(daemon, sid, code))["run_id"]
    done = await finished(daemon, sid, rid)
    replay = await events(daemon, sid, rid)
    assert replay.events[0].type == "init" and replay.events[1].type == "gap"
    gap = replay.events[1].data
    assert gap["after"] == 0 and gap["next_seq"] == replay.events[2].id
    kept = _frames(replay.raw)[2:]
    assert sum(len(frame) for frame in kept[:-1]) <= 4096
    assert done["dropped_bytes"] == gap["dropped_bytes"] > 0
    assert replay.stderr == "tail\n" and replay.stdout.endswith("line-1000\n")
    assert done["output_bytes"] == sum(len(f"line-{i}\n") for i in range(1, 1001)) + len("tail\n")
    # A cursor inside the dropped region: the gap counts only what lies after it.
    inside = await events(daemon, sid, rid, after=3)
    assert inside.events[0].type == "gap" and inside.events[0].data["after"] == 3
    assert inside.events[0].data["next_seq"] == gap["next_seq"]
    assert 0 < inside.events[0].data["dropped_bytes"] < gap["dropped_bytes"]


async def test_an_older_run_keeps_init_and_its_terminal_event_when_a_newer_one_starts(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    old = await daemon.run(sid, "echo old-output")
    rid = old.events[0].data["run_id"]
    await daemon.run(sid, "true")
    replay = await events(daemon, sid, rid)
    assert [e.type for e in replay.events] == ["init", "gap", "execution_complete"]
    assert replay.events[1].data["dropped_bytes"] == len(_frames(old.raw)[1])
    assert (await run_object(daemon, sid, rid))["dropped_bytes"] == 0  # its reader was sent them


async def test_a_run_that_belongs_to_its_readers_never_drops_what_a_slow_reader_has_not_read(
    make_daemon: DaemonFactory,
) -> None:
    daemon = await make_daemon(run_log_bytes=64 * 1024)
    sid = await session_id(daemon)
    async with daemon.client.post(f"/session/{sid}/run", json={"code": "seq 1 300000"}) as response:
        await asyncio.sleep(0.5)  # the reader stalls: the command must wait, nothing is dropped
        result = await read_run(response)
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 300001))
    assert not result.of("gap")
    rid = result.events[0].data["run_id"]
    assert (await run_object(daemon, sid, rid))["dropped_bytes"] == 0


async def test_delete_ends_a_run_in_progress_for_every_reader(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "echo a; sleep 30"))["run_id"]
    url = f"/session/{sid}/runs/{rid}/events"
    async with daemon.client.get(url) as first, daemon.client.get(url) as second:
        live = [LiveRun(first), LiveRun(second)]
        for reader in live:
            assert (await reader.next_event()).type == "init"
        await daemon.delete(sid)
        for reader in live:
            terminal = await reader.until_terminal()
            assert terminal.type == "error" and terminal.data["code"] == "SESSION_CLOSED"


# ----- streamed stdin ------------------------------------------------------------------------


async def _stdin(daemon: Daemon, sid: str, rid: str, **body: Any) -> ClientResponse:
    return await daemon.client.post(f"/session/{sid}/runs/{rid}/stdin", json=body)


@pytest.mark.parametrize(
    "code",
    [
        'while IFS= read -r line; do echo "got $line"; done; echo end',
        # One write per line: print() of several arguments writes them one by one when unbuffered.
        'python3 -u -c \'import sys\nfor line in sys.stdin: sys.stdout.write("got " + line)\nprint("end")\'',
    ],
    ids=["bash-read-loop", "python-echo"],
)
async def test_streamed_stdin_answers_each_line_as_it_is_sent_and_eof_ends_it(daemon: Daemon, code: str) -> None:
    sid = await session_id(daemon)
    async with daemon.client.post(f"/session/{sid}/run", json={"code": code, "stdin": "stream"}) as response:
        live = LiveRun(response)
        rid = (await live.next_event()).data["run_id"]
        for i in range(3):
            written = await _stdin(daemon, sid, rid, data=f"line {i}\n")
            assert (await written.json()) == {"written": len(f"line {i}\n")}
            event = await live.next_event()
            assert event.type == "stdout" and event.data["text"] == f"got line {i}\n"
        await _stdin(daemon, sid, rid, eof=True)
        terminal = await live.until_terminal()
    assert terminal.data["exit_code"] == 0
    assert "".join(e.data["text"] for e in live.events if e.type == "stdout").endswith("end\n")


async def test_streamed_stdin_carries_any_character_nul_included(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "od -An -c", stdin="stream"))["run_id"]
    response = await _stdin(daemon, sid, rid, data="a\x00é", eof=True)
    assert (await response.json()) == {"written": 4}
    await finished(daemon, sid, rid)
    assert "a  \\0" in (await events(daemon, sid, rid)).stdout


async def test_a_read_of_streamed_stdin_before_any_data_waits_for_it(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "read -r x; echo got $x", stdin="stream"))["run_id"]
    await asyncio.sleep(0.3)
    assert (await run_object(daemon, sid, rid))["state"] == "running"
    await _stdin(daemon, sid, rid, data="late\n")
    await finished(daemon, sid, rid)
    assert (await events(daemon, sid, rid)).stdout == "got late\n"


async def test_eof_sent_before_the_shell_opens_the_pipe_does_not_hang(daemon: Daemon) -> None:
    session = await daemon.create()
    sid, pid = session["session_id"], session["pid"]
    os.kill(pid, signal.SIGSTOP)  # the shell cannot open the pipe before the data and eof are in
    try:
        rid = (await background(daemon, sid, "cat", stdin="stream"))["run_id"]
        response = await asyncio.wait_for(_stdin(daemon, sid, rid, data="early\n", eof=True), 5)
        assert (await response.json()) == {"written": 6}
    finally:
        os.kill(pid, signal.SIGCONT)
    done = await finished(daemon, sid, rid, timeout=10)
    assert done["exit_code"] == 0 and (await events(daemon, sid, rid)).stdout == "early\n"


async def test_stdin_errors_in_their_order(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    text_run = (await background(daemon, sid, "cat", stdin="text"))["run_id"]
    await finished(daemon, sid, text_run)
    await expect_error(await _stdin(daemon, sid, text_run, data="x"), 409, "STDIN_NOT_STREAMED")
    streamed = (await background(daemon, sid, "sleep 0.5; cat", stdin="stream"))["run_id"]
    assert (await run_object(daemon, sid, streamed))["stdin"] == "stream"
    await _stdin(daemon, sid, streamed, eof=True)
    await expect_error(await _stdin(daemon, sid, streamed, data="x"), 409, "STDIN_CLOSED")
    await finished(daemon, sid, streamed)
    await expect_error(await _stdin(daemon, sid, streamed, data="x"), 409, "RUN_FINISHED")
    await expect_error(await _stdin(daemon, sid, "nope", data="x"), 404, "RUN_NOT_FOUND")
    await expect_error(await _stdin(daemon, sid, streamed, data=3), 400, "INVALID_REQUEST")


async def test_an_interrupt_closes_streamed_stdin_and_the_shell_survives(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "read -r x; echo after-read", stdin="stream"))["run_id"]
    await asyncio.sleep(0.2)  # the shell's own `read` waits on the pipe
    interrupted = await daemon.client.post(f"/session/{sid}/interrupt", json={"run_id": rid})
    assert interrupted.status == 202
    done = await finished(daemon, sid, rid, timeout=5)
    assert done["interrupted"] is True and done["exit_code"] == 130
    await expect_error(await _stdin(daemon, sid, rid, data="x"), 409, "RUN_FINISHED")
    assert (await daemon.run(sid, "echo alive")).stdout == "alive\n"


# ----- whole streams cut and resumed -----------------------------------------------------------


async def test_a_stream_cut_anywhere_resumes_with_nothing_lost_or_repeated(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    code = "for i in $(seq 1 60); do echo out-$i; echo err-$i >&2; (( i % 10 )) || sleep 0.05; done"
    rid = (await background(daemon, sid, code))["run_id"]
    pieces, cursor = await read_in_cuts(daemon, sid, rid, [137, 1, 900, 40, 5000])
    await finished(daemon, sid, rid)
    assert b"".join(pieces) == (await events(daemon, sid, rid)).raw
    assert cursor == (await run_object(daemon, sid, rid))["last_seq"]


async def read_in_cuts(daemon: Daemon, sid: str, rid: str, cuts: list[int]) -> tuple[list[bytes], int]:
    """Read the run's events, cutting the connection after each of `cuts` bytes and resuming with
    Last-Event-ID; returns the complete frames received and the last seq."""
    pieces: list[bytes] = []
    cursor: int | None = None
    cuts = list(cuts)
    while True:
        headers = {"Last-Event-ID": str(cursor)} if cursor is not None else {}
        response = await daemon.client.get(f"/session/{sid}/runs/{rid}/events", headers=headers)
        if response.status == 204:
            return pieces, cursor if cursor is not None else -1
        assert response.status == 200, await response.text()
        limit = cuts.pop(0) if cuts else None
        raw = b""
        while limit is None or len(raw) < limit:
            chunk = await response.content.read(64 if limit is None else max(1, limit - len(raw)))
            if not chunk:
                break
            raw += chunk
        response.close()
        complete = raw[: raw.rfind(b"\n\n") + 2] if b"\n\n" in raw else b""
        frames = [f for f in _frames(complete) if not f.startswith(b":")]
        pieces.extend(frames)
        if frames:
            cursor = parse_sse(frames[-1])[0].id
        if limit is None:
            return pieces, cursor if cursor is not None else -1


async def test_a_resume_at_the_end_of_a_quiet_running_run_gets_its_headers_at_once(daemon: Daemon) -> None:
    sid = await session_id(daemon)
    rid = (await background(daemon, sid, "echo a; sleep 30; echo b"))["run_id"]
    await wait_for(lambda: _last_seq_at_least(daemon, sid, rid, 1), what="first output")
    # Headers now, not with the run's next event (30 s away).
    response = await asyncio.wait_for(
        daemon.client.get(f"/session/{sid}/runs/{rid}/events", headers={"Last-Event-ID": "1"}), 10
    )
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
    await daemon.client.post(f"/session/{sid}/interrupt", json={"run_id": rid})
    result = await read_run(response)
    assert result.stdout == "" and result.complete["interrupted"] is True


async def _last_seq_at_least(daemon: Daemon, sid: str, rid: str, seq: int) -> bool:
    return bool((await run_object(daemon, sid, rid))["last_seq"] >= seq)


async def test_the_disconnect_grace_holds_when_runs_have_no_time_limit(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_run_timeout_ms=0)
    sid = await session_id(daemon)
    live = await start_run(daemon, sid, "echo a; sleep 1; echo b", disconnect_grace_ms=5000)
    rid = (await live.next_event()).data["run_id"]
    await live.next_event()
    live.response.close()
    done = await finished(daemon, sid, rid, timeout=10)
    assert done["interrupted"] is False and done["exit_code"] == 0
