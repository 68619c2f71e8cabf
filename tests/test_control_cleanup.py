"""The control contract, part 2: client disconnects, DELETE during a run, escapees, the shell ending
by itself, idle reaping, resources, and a bounded stress of hostile process trees.

After each test the `daemon` / `make_daemon` fixture asserts that no process of the test's sessions
is alive and that the test process has no zombie child.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import psutil
import pytest

from execd.process import tag_of
from tests.conftest import Daemon, DaemonFactory, assert_no_processes
from tests.conftest import wait_for as poll
from tests.helpers_control import is_live, open_run, run_children, session_commands, session_processes


async def get(daemon: Daemon, session_id: str) -> tuple[int, dict[str, Any]]:
    response = await daemon.client.get(f"/session/{session_id}")
    return response.status, await response.json()


async def state(daemon: Daemon, session_id: str) -> str | None:
    status, body = await get(daemon, session_id)
    return body["state"] if status == 200 else None


# ----- client disconnect -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["sleep 100; touch {marker}", "yes; touch {marker}", "while :; do echo x; done; touch {marker}"],
    ids=["quiet-sleep", "noisy-yes", "noisy-builtin-loop"],
)
async def test_client_disconnect_interrupts_the_run_and_the_session_goes_on(
    daemon: Daemon, code: str, tmp_path: Any
) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "KEPT=still-here")
    marker = tmp_path / "rest-of-code-ran"
    stream = await open_run(daemon.client, sid, code.format(marker=marker))
    if code.startswith("sleep"):
        await poll(lambda: run_children(session["pid"], "sleep"), 5, "sleep started")
    else:
        await stream.until_stdout("y" if code.startswith("yes") else "x")
    stream.response.close()  # the client goes away mid-run
    await poll(lambda: not psutil.Process(session["pid"]).children(recursive=True), 10, "the run's processes died")
    await poll(lambda: _is(daemon, sid, "idle"), 10, "session idle again")
    after = await daemon.run(sid, "echo $? $KEPT")
    assert after.stdout == "130 still-here\n"
    assert after.complete["interrupted"] is False
    assert not marker.exists(), "the rest of the code ran after the client went away"
    assert session_commands(sid) == [" ".join(psutil.Process(session["pid"]).cmdline())]


class _Missed:
    """A falsy poll value that shows, when the poll fails, what the session looked like."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.seen = (status, body.get("state"), body.get("reason"), body.get("current_run_id"))

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"status, state, reason, current_run_id = {self.seen}"


async def _is(daemon: Daemon, session_id: str, wanted: str) -> bool | _Missed:
    status, body = await get(daemon, session_id)
    return True if status == 200 and body["state"] == wanted else _Missed(status, body)


async def test_repeated_client_disconnects_of_a_noisy_run_never_leave_the_session_busy(daemon: Daemon) -> None:
    """The write to a gone client may fail before the handler is cancelled: the run must still be
    interrupted and finished, every time."""
    session = await daemon.create()
    sid = session["session_id"]
    for i in range(15):
        stream = await open_run(daemon.client, sid, "yes")
        await stream.until_stdout("y")
        stream.response.close()
        await poll(lambda: _is(daemon, sid, "idle"), 10, f"session idle again after disconnect #{i}")
    assert (await daemon.run(sid, "echo ok")).stdout == "ok\n"


async def test_client_disconnect_before_the_run_prints_anything_leaves_no_busy_session(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    for _ in range(5):
        stream = await open_run(daemon.client, sid, "sleep 100")
        stream.response.close()
        await poll(lambda: _is(daemon, sid, "idle"), 10, "session idle again")
    assert (await daemon.run(sid, "echo ok")).stdout == "ok\n"
    await poll(lambda: not run_children(session["pid"], "sleep"), 5, "no sleep left")


# ----- DELETE during a run ---------------------------------------------------------------------


async def test_delete_during_a_run_ends_the_stream_with_session_closed(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    stream = await open_run(daemon.client, sid, "setsid sleep 300 >/dev/null 2>&1 & sleep 100 | cat; echo AFTER")
    await poll(lambda: len(run_children(session["pid"], "sleep")) == 2, 5, "both sleeps started")
    final = await daemon.delete(sid)
    assert final["state"] == "closed" and final["session_id"] == sid
    terminal = await stream.until_terminal()
    assert terminal.type == "error", stream.events
    assert terminal.data["code"] == "SESSION_CLOSED"
    assert terminal.data["error"] == {"ename": "SESSION_CLOSED", "evalue": terminal.data["message"], "traceback": []}
    assert "AFTER" not in stream.stdout
    assert not session_processes(sid)
    assert (await daemon.client.get(f"/session/{sid}")).status == 404


async def test_delete_during_a_run_that_ignores_signals_still_kills_everything(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    stream = await open_run(daemon.client, sid, """trap '' INT TERM USR2; bash -c 'trap "" INT TERM; sleep 100'""")
    await poll(lambda: run_children(session["pid"], "sleep"), 5, "sleep started")
    await daemon.delete(sid)
    terminal = await stream.until_terminal()
    assert terminal.type == "error" and terminal.data["code"] == "SESSION_CLOSED", stream.events
    assert not session_processes(sid)


# ----- escapees --------------------------------------------------------------------------------


ESCAPEES = {
    "setsid": "setsid sleep 300 >/dev/null 2>&1 &",
    "setsid-fork": "setsid -f sleep 300 >/dev/null 2>&1",
    "nohup": "nohup sleep 300 >/dev/null 2>&1 &",
    "double-fork": "( (sleep 300 &) & )",
    "disown": "sleep 300 & disown",
    "setsid-bash": "setsid bash -c 'sleep 300' &",
    "setsid-closed-fds": "setsid bash -c 'exec </dev/null >/dev/null 2>&1; sleep 300' &",
}


@pytest.mark.parametrize("code", list(ESCAPEES.values()), ids=list(ESCAPEES))
async def test_delete_kills_escapees(daemon: Daemon, code: str) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, code)
    assert result.complete["exit_code"] == 0
    await poll(lambda: any("sleep 300" in c for c in session_commands(sid)), 5, "the escapee is running")
    escapees = [p for p in session_processes(sid) if p.pid != session["pid"]]
    final = await daemon.delete(sid)
    assert final["state"] == "closed"
    alive = [p.pid for p in escapees if is_live(p.pid)]
    assert not alive, f"escapees alive after DELETE: {alive}"
    assert not session_processes(sid)


async def test_delete_kills_every_escapee_of_a_session_at_once(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "\n".join(ESCAPEES.values()))
    await poll(
        lambda: sum("sleep 300" in c for c in session_commands(sid)) >= len(ESCAPEES), 5, "every escapee running"
    )
    await daemon.delete(sid)
    assert not session_processes(sid)


async def test_delete_kills_a_forking_job_that_respawns(daemon: Daemon) -> None:
    """A job that keeps forking new children while the sweep runs."""
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "( while :; do setsid sleep 300 >/dev/null 2>&1 & done ) >/dev/null 2>&1 &")
    await poll(lambda: len(session_processes(sid)) > 10, 5, "the fork loop is spinning")
    await daemon.delete(sid)
    await poll(lambda: not session_processes(sid), 5, "nothing of the session left")


# ----- the shell ending by itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expect"),
    [
        ("exit 0", ("exited", 0)),
        ("exit 3", ("exited", 3)),
        ("set -e; false", ("exited", 1)),
        ("kill -9 $$", ("failed", "SIGKILL")),
    ],
    ids=["exit-0", "exit-3", "set-e", "kill-9-self"],
)
async def test_shell_ending_by_itself_kills_its_jobs_and_escapees(
    daemon: Daemon, code: str, expect: tuple[str, Any]
) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "sleep 300 & setsid sleep 300 >/dev/null 2>&1 & ( (sleep 300 &) & )")
    await poll(lambda: sum("sleep 300" in c for c in session_commands(sid)) == 3, 5, "three jobs running")
    jobs = [p for p in session_processes(sid) if p.pid != session["pid"]]
    result = await daemon.run(sid, code)
    if expect[0] == "exited":
        assert result.complete["shell_exited"] is True and result.complete["exit_code"] == expect[1]
    else:
        assert result.terminal.type == "error" and result.terminal.data["code"] == "SESSION_DIED", result.events
    await poll(lambda: not any(is_live(p.pid) for p in jobs), 5, "the jobs died with the shell")
    await poll(lambda: not session_processes(sid), 5, "nothing of the session left")
    _, body = await get(daemon, sid)
    assert body["state"] == expect[0], body
    if expect[0] == "exited":
        assert body["exit_code"] == expect[1]
    else:
        assert body["signal"] == expect[1]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    assert response.status == 410


async def test_shell_killed_while_idle_kills_its_jobs_and_the_session_fails(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "setsid sleep 300 >/dev/null 2>&1 & sleep 300 &")
    await poll(lambda: sum("sleep 300" in c for c in session_commands(sid)) == 2, 5, "jobs running")
    os.kill(session["pid"], 9)
    await poll(lambda: _is(daemon, sid, "failed"), 5, "session failed")
    await poll(lambda: not session_processes(sid), 5, "nothing of the session left")
    _, body = await get(daemon, sid)
    assert body["signal"] == "SIGKILL" and body["resources"]["num_processes"] == 0
    final = await daemon.delete(sid)
    assert final["state"] == "failed"


# ----- idle reaping ----------------------------------------------------------------------------


async def test_idle_session_is_closed_by_the_daemon_wide_idle_timeout(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(idle_timeout_s=2.0, interrupt_grace_ms=500)
    session = await daemon.create()
    sid = session["session_id"]
    assert session["idle_timeout_s"] == 2.0
    await daemon.run(sid, "setsid sleep 300 >/dev/null 2>&1 &")
    await poll(lambda: _is(daemon, sid, "closed"), 10, "session closed by the reaper")
    _, body = await get(daemon, sid)
    assert body["reason"] == "idle_timeout", body
    assert not session_processes(sid)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    assert response.status == 410
    assert (await response.json())["code"] == "SESSION_ENDED"
    # An ended session is forgotten once it has been ended for longer than its idle timeout.
    await poll(lambda: _gone(daemon, sid), 10, "closed session forgotten")


async def _gone(daemon: Daemon, session_id: str) -> bool:
    return (await daemon.client.get(f"/session/{session_id}")).status == 404


async def test_per_session_idle_timeout_overrides_the_daemon_default(daemon: Daemon) -> None:
    reaped = await daemon.create(idle_timeout_s=0.5)
    kept = await daemon.create()
    await poll(lambda: _is(daemon, reaped["session_id"], "closed"), 10, "session reaped")
    _, body = await get(daemon, reaped["session_id"])
    assert body["reason"] == "idle_timeout"
    assert await state(daemon, kept["session_id"]) == "idle"
    assert (await daemon.run(kept["session_id"], "echo ok")).stdout == "ok\n"


async def test_running_session_is_never_reaped_while_running(daemon: Daemon) -> None:
    session = await daemon.create(idle_timeout_s=0.3)
    sid = session["session_id"]
    result = await daemon.run(sid, "sleep 2.5; echo finished")  # several reaper passes go by
    assert result.complete["exit_code"] == 0 and result.complete["interrupted"] is False
    assert result.stdout == "finished\n"
    # Once idle, it is reaped as usual.
    await poll(lambda: _is(daemon, sid, "closed"), 10, "session reaped after the run")


async def test_exited_session_is_forgotten_after_its_idle_timeout(daemon: Daemon) -> None:
    session = await daemon.create(idle_timeout_s=0.5)
    sid = session["session_id"]
    result = await daemon.run(sid, "exit 5")
    assert result.complete["shell_exited"] is True
    _, body = await get(daemon, sid)
    assert body["state"] == "exited" and body["exit_code"] == 5
    await poll(lambda: _gone(daemon, sid), 10, "exited session forgotten")
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    assert response.status == 404


# ----- resources -------------------------------------------------------------------------------


SLEEPS = ["sleep 300", "sleep 301", "sleep 302"]


async def test_resources_count_the_whole_tree_including_escapees(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    _, body = await get(daemon, sid)
    assert body["resources"]["num_processes"] == 1
    await daemon.run(sid, "setsid sleep 300 >/dev/null 2>&1 & sleep 301 & ( (sleep 302 &) & )")
    # Exactly these four: the subshells of the double fork are tagged too while they live.
    await poll(lambda: sorted(c for c in session_commands(sid) if c.startswith("sleep")) == SLEEPS, 5, "3 sleeps")
    await poll(lambda: len(session_processes(sid)) == 4, 5, "shell + three sleeps, nothing else")
    _, body = await get(daemon, sid)
    resources = body["resources"]
    assert resources["num_processes"] == 4, resources
    expected_rss = sum(p.memory_info().rss for p in session_processes(sid))
    assert resources["rss_bytes"] > 0, resources
    assert resources["rss_bytes"] >= expected_rss // 2, (resources, expected_rss)
    assert isinstance(resources["cpu_seconds"], float | int) and resources["cpu_seconds"] >= 0


async def test_resources_include_cpu_of_a_busy_child(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "( while :; do :; done ) &")
    pid = session["pid"]

    def cpu() -> float:
        return sum(sum(c.cpu_times()[:2]) for c in psutil.Process(pid).children())

    await poll(lambda: cpu() > 0.05, 10, "the busy child used some cpu")
    _, body = await get(daemon, sid)
    assert body["resources"]["num_processes"] == 2
    assert body["resources"]["cpu_seconds"] > 0


async def test_resources_of_an_ended_session_are_zero(daemon: Daemon) -> None:
    session = await daemon.create()
    await daemon.run(session["session_id"], "exit 0")
    _, body = await get(daemon, session["session_id"])
    assert body["resources"]["num_processes"] == 0 and body["resources"]["rss_bytes"] == 0


# ----- bounded stress --------------------------------------------------------------------------


HOSTILE = "\n".join(
    [
        "setsid sleep 300 >/dev/null 2>&1 &",
        "nohup sleep 300 >/dev/null 2>&1 &",
        "( (sleep 300 &) & )",
        "sleep 300 & disown",
        "setsid bash -c 'sleep 300' >/dev/null 2>&1 &",
        "nice -n 19 bash -c 'while :; do :; done' &",  # busy, without starving the daemon on 2 cores
        "echo started",
    ]
)


STRESS_BUDGET_S = 20.0


def non_socket_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            out.append(target)
    return out


def describe(session_ids: set[str]) -> list[str]:
    """Who is left, with enough to diagnose it: pid, ppid, pgid, sid, command, session."""
    out = []
    for proc in session_processes_of(session_ids):
        try:
            out.append(
                f"pid={proc.pid} ppid={proc.ppid()} pgid={os.getpgid(proc.pid)} sid={os.getsid(proc.pid)} "
                f"cmd={' '.join(proc.cmdline())!r} session={tag_of(proc.pid)}"
            )
        except (psutil.Error, OSError):
            pass
    return out


def session_processes_of(session_ids: set[str]) -> list[psutil.Process]:
    return [
        p for p in psutil.process_iter() if p.pid != os.getpid() and tag_of(p.pid) in session_ids and is_live(p.pid)
    ]


async def test_stress_200_hostile_sessions_leave_nothing_behind(daemon: Daemon) -> None:
    """200 sessions, 20 at a time, each with escapees, jobs and a busy child; half are deleted with a
    run in flight. Bounded: no new batch starts after STRESS_BUDGET_S (the count done is printed)."""
    concurrency, total = 20, 200
    all_ids: set[str] = set()
    deleted: set[str] = set()
    base_url = str(daemon.client.make_url(""))

    async def one(http: aiohttp.ClientSession, index: int) -> None:
        async with http.post("/session", json={"labels": {"stress": str(index)}}) as response:
            assert response.status == 200, await response.text()
            sid = (await response.json())["session_id"]
        all_ids.add(sid)
        stream = await open_run(http, sid, HOSTILE)
        assert (await stream.until_terminal()).data["exit_code"] == 0
        assert stream.stdout == "started\n", stream.events
        run = None
        if index % 2:  # half of them also have a run in flight when they are deleted
            run = await open_run(http, sid, "sleep 100")
        async with http.delete(f"/session/{sid}") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["state"] == "closed"
        deleted.add(sid)
        left = describe({sid})
        assert not left, f"alive right after DELETE returned: {left}"
        if run is not None:
            assert (await run.until_terminal()).data["code"] == "SESSION_CLOSED"

    async def sessions(first: int, count: int, budget_s: float | None = None) -> int:
        # A client of its own, closed at the end, so its pooled connections are not counted as fds.
        done, started = 0, time.monotonic()
        async with aiohttp.ClientSession(base_url) as http:
            for start in range(first, first + count, concurrency):
                if budget_s is not None and time.monotonic() - started > budget_s:
                    break
                await asyncio.gather(*(one(http, i) for i in range(start, start + concurrency)))
                done += concurrency
        return done

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    await sessions(-concurrency, concurrency)  # warm-up: watchdog, thread pool, logging reach their size
    assert_no_processes(set(all_ids))
    fds_before, plain_before = fds(), sorted(non_socket_fds())
    started = time.monotonic()
    done = await sessions(0, total, STRESS_BUDGET_S)
    elapsed = time.monotonic() - started
    assert not describe(all_ids), describe(all_ids)
    assert_no_processes(all_ids)
    assert (await (await daemon.client.get("/session")).json())["sessions"] == []
    # The server side of the closed connections goes away asynchronously: poll for it.
    deadline = time.monotonic() + 5
    while fds() > fds_before + 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    fds_after, plain_after = fds(), sorted(non_socket_fds())
    print(
        f"\nstress: {done} of {total} hostile sessions ({concurrency} at a time) in {elapsed:.1f}s "
        f"(budget {STRESS_BUDGET_S}s); fds {fds_before} -> {fds_after}"
    )
    assert plain_after == plain_before, (plain_before, plain_after)
    assert fds_after <= fds_before + 4, (fds_before, fds_after)


async def test_delete_whose_client_goes_away_still_closes_the_session(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "sleep 1000 &")
    host, port = daemon.client.server.host, daemon.client.server.port
    _, writer = await asyncio.open_connection(host, port)
    writer.write(f"DELETE /session/{sid} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    writer.close()  # gone before the answer (a FIN: the request itself is still read)
    await poll(lambda: not session_processes(sid), 10, "every process of the session killed")
    await poll(lambda: _gone(daemon, sid), 10, "the session closed and forgotten")
    response = await daemon.client.delete(f"/session/{sid}")
    assert response.status == 404


async def test_create_whose_client_goes_away_leaves_no_half_started_session(daemon: Daemon) -> None:
    host, port = daemon.client.server.host, daemon.client.server.port
    for _ in range(5):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async def settled() -> bool:
        # However many of the requests got as far as starting a shell, none is left half-started.
        sessions = (await (await daemon.client.get("/session")).json())["sessions"]
        return all(s["state"] == "idle" for s in sessions)

    await poll(settled, 10, "every started session idle")
    health = await (await daemon.client.get("/healthz")).json()
    listed = (await (await daemon.client.get("/session")).json())["sessions"]
    assert health["sessions"] == len(listed)
    for s in (await (await daemon.client.get("/session")).json())["sessions"]:
        await daemon.delete(s["session_id"])
