"""The control contract, part 1: POST /session/{id}/interrupt, escalation, timeouts.

Real shells and processes; psutil proves what is alive. The `daemon` fixture runs with
interrupt_grace_ms=500 and checks after each test that no process of its sessions is left.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import psutil
import pytest

from execd import process
from tests.conftest import Daemon, DaemonFactory
from tests.conftest import wait_for as poll
from tests.helpers_control import EventStream, is_live, open_run, percentile, run_children, session_commands

GRACE_S = 0.5  # the `daemon` fixture's interrupt grace


def process_start_tick_passed(pid: int) -> bool:
    """True once the boot clock is past the tick `pid` started in (start times have tick resolution)."""
    ticks = process.start_ticks(pid)
    return ticks is not None and process.boot_ticks_now() > ticks


async def interrupt(daemon: Daemon, session_id: str, **body: Any) -> tuple[int, dict[str, Any]]:
    response = await daemon.client.post(f"/session/{session_id}/interrupt", json=body or None)
    return response.status, await response.json()


async def running(
    daemon: Daemon, session: dict[str, Any], code: str, wait_for_child: str | None = "sleep"
) -> EventStream:
    """Start `code` streaming; return once the named child process exists (the run is really busy)."""
    stream = await open_run(daemon.client, session["session_id"], code)
    if wait_for_child:
        await poll(lambda: run_children(session["pid"], wait_for_child), 10, f"{wait_for_child} started")
    return stream


async def interrupted_run(
    daemon: Daemon, session: dict[str, Any], code: str, sig: str = "SIGINT", child: str | None = "sleep"
) -> tuple[EventStream, dict[str, Any]]:
    stream = await running(daemon, session, code, child)
    status, body = await interrupt(daemon, session["session_id"], signal=sig)
    assert status == 202, body
    terminal = await stream.until_terminal()
    assert terminal.type == "execution_complete", stream.events
    return stream, terminal.data


# ----- the route -------------------------------------------------------------------------------


async def test_interrupt_answers_202_with_run_id_and_signal(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await running(daemon, session, "sleep 100")
    run_id = stream.events[0].data["text"]
    status, body = await interrupt(daemon, session["session_id"])
    assert (status, body) == (202, {"run_id": run_id, "signal": "SIGINT"})
    assert (await stream.until_terminal()).data["interrupted"] is True

    stream = await running(daemon, session, "sleep 100")
    run_id = stream.events[0].data["text"]
    status, body = await interrupt(daemon, session["session_id"], signal="SIGTERM", run_id=run_id)
    assert (status, body) == (202, {"run_id": run_id, "signal": "SIGTERM"})
    assert (await stream.until_terminal()).data["exit_code"] == 143


async def test_interrupt_without_body_defaults_to_sigint(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await running(daemon, session, "sleep 100")
    response = await daemon.client.post(f"/session/{session['session_id']}/interrupt")
    assert response.status == 202
    assert (await response.json())["signal"] == "SIGINT"
    assert (await stream.until_terminal()).data["exit_code"] == 130


async def test_interrupt_when_idle_is_409_no_active_run(daemon: Daemon) -> None:
    session = await daemon.create()
    status, body = await interrupt(daemon, session["session_id"])
    assert status == 409 and body["code"] == "NO_ACTIVE_RUN", body
    await daemon.run(session["session_id"], "true")
    status, body = await interrupt(daemon, session["session_id"], signal="SIGKILL")
    assert status == 409 and body["code"] == "NO_ACTIVE_RUN", body


async def test_interrupt_naming_another_run_is_409_and_spares_the_run_in_progress(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    old_run = (await daemon.run(sid, "true")).events[0].data["text"]
    stream = await running(daemon, session, "sleep 100; echo AFTER")
    for other in (old_run, "0123456789abcdef"):
        status, body = await interrupt(daemon, sid, run_id=other)
        assert status == 409 and body["code"] == "NO_ACTIVE_RUN", body
    assert run_children(session["pid"], "sleep"), "a refused interrupt must not touch the run"
    assert (await daemon.client.get(f"/session/{sid}")).status == 200
    status, _ = await interrupt(daemon, sid, run_id=stream.events[0].data["text"])
    assert status == 202
    assert (await stream.until_terminal()).data["exit_code"] == 130
    assert "AFTER" not in stream.stdout


@pytest.mark.parametrize("bad", ["SIGHUP", "SIGUSR2", "INT", "sigint", "9", 2, ["SIGINT"]])
async def test_interrupt_with_unknown_signal_is_400_and_does_nothing(daemon: Daemon, bad: Any) -> None:
    session = await daemon.create()
    stream = await running(daemon, session, "sleep 100; echo AFTER")
    status, body = await interrupt(daemon, session["session_id"], signal=bad)
    assert status == 400 and body["code"] == "INVALID_REQUEST", body
    assert run_children(session["pid"], "sleep"), "a refused interrupt must not touch the run"
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    assert (await stream.until_terminal()).data["exit_code"] == 130


async def test_interrupt_after_the_shell_exited_is_410(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "exit 4")
    assert result.complete["shell_exited"] is True
    status, body = await interrupt(daemon, session["session_id"])
    assert status == 410 and body["code"] == "SESSION_ENDED", body
    assert body["state"] == "exited"


async def test_interrupt_after_delete_is_404(daemon: Daemon) -> None:
    session = await daemon.create()
    await daemon.delete(session["session_id"])
    status, body = await interrupt(daemon, session["session_id"])
    assert status == 404 and body["code"] == "SESSION_NOT_FOUND", body


# ----- what an interrupt does ------------------------------------------------------------------


async def test_interrupt_stops_sleep_skips_the_rest_and_keeps_shell_state(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "KEPT=yes-$$; cd /tmp; f() { echo fn-kept; }")
    stream, done = await interrupted_run(daemon, session, "echo BEFORE; sleep 100; echo AFTER")
    assert done["exit_code"] == 130
    assert done["interrupted"] is True and done["timed_out"] is False and done["shell_exited"] is False
    assert stream.stdout == "BEFORE\n"
    assert not run_children(session["pid"], "sleep")
    after = await daemon.run(sid, 'echo "$KEPT $PWD $$"; f')
    assert after.stdout == f"yes-{session['pid']} /tmp {session['pid']}\nfn-kept\n"
    got = await (await daemon.client.get(f"/session/{sid}")).json()
    assert got["state"] == "idle" and got["pid"] == session["pid"]


async def test_interrupted_run_hands_130_to_the_next_run_as_status(daemon: Daemon) -> None:
    session = await daemon.create()
    await interrupted_run(daemon, session, "sleep 100")
    assert (await daemon.run(session["session_id"], "echo $?")).stdout == "130\n"


async def test_interrupt_stops_a_busy_builtin_loop(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await open_run(daemon.client, session["session_id"], "echo go; while :; do :; done; echo AFTER")
    await stream.until_stdout("go\n")  # the loop is spinning now
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.type == "execution_complete", stream.events
    assert terminal.data["exit_code"] == 130 and terminal.data["interrupted"] is True
    assert "AFTER" not in stream.stdout
    assert (await daemon.run(session["session_id"], "echo alive")).stdout == "alive\n"


async def test_interrupt_stops_a_busy_loop_inside_nested_functions(daemon: Daemon) -> None:
    """A builtin loop that spins inside nested functions: no child process at all to signal."""
    session = await daemon.create()
    code = "inner() { while :; do :; done; echo INNER_AFTER; }; outer() { inner; echo OUTER_AFTER; }; outer; echo TOP"
    stream = await open_run(daemon.client, session["session_id"], code)
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.type == "execution_complete" and terminal.data["exit_code"] == 130, stream.events
    assert stream.stdout == ""


@pytest.mark.parametrize(
    "code",
    [
        'x=$(sleep 100); echo "AFTER $x"',
        'for i in 1 2; do y=$(sleep 100); echo "AFTER $i"; done',
        "echo $(sleep 100) | cat",
    ],
    ids=["assignment", "loop", "pipeline"],
)
async def test_interrupt_of_a_command_substitution_keeps_the_shell(daemon: Daemon, code: str) -> None:
    # bash sends itself SIGINT when a command substitution dies of it: a plain script would end.
    session = await daemon.create()
    stream, complete = await interrupted_run(daemon, session, code)
    assert (complete["exit_code"], complete["interrupted"], complete["shell_exited"]) == (130, True, False)
    assert "AFTER" not in stream.stdout
    assert (await daemon.run(session["session_id"], "echo alive")).stdout == "alive\n"


async def test_the_users_int_trap_runs_when_a_command_substitution_is_interrupted(daemon: Daemon) -> None:
    session = await daemon.create()
    await daemon.run(session["session_id"], "trap 'echo TRAPPED' INT")
    stream, complete = await interrupted_run(daemon, session, 'x=$(sleep 100); echo "AFTER $x"')
    assert complete["exit_code"] == 130
    # Once by the daemon's interrupt, and again if bash's own SIGINT got there first (docs/api.md).
    assert 1 <= stream.stdout.count("TRAPPED") <= 2 and "AFTER" not in stream.stdout
    listed = await daemon.run(session["session_id"], "trap -p INT")
    assert listed.stdout == "trap -- 'echo TRAPPED' SIGINT\n"


async def test_interrupt_works_under_a_zero_file_size_limit_and_a_user_colon_function(daemon: Daemon) -> None:
    # The wrapper writes no regular file while it handles an interrupt (SIGXFSZ would end the
    # shell), and never calls `:`, which the user may define.
    session = await daemon.create()
    await daemon.run(session["session_id"], "ulimit -f 0; :() { echo COLON; }")
    stream, complete = await interrupted_run(daemon, session, "sleep 100", child="sleep")
    assert (complete["exit_code"], complete["shell_exited"]) == (130, False)
    with_env = await daemon.run(session["session_id"], 'echo "$T_E"', env={"T_E": "x"})
    assert with_env.stdout == "x\n"
    assert "COLON" not in stream.stdout + with_env.stdout


async def test_interrupt_stops_every_process_of_a_pipeline(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await running(daemon, session, "sleep 100 | cat | sort; echo AFTER")
    await poll(lambda: run_children(session["pid"], "sort"), 5, "pipeline started")
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.data["exit_code"] == 130 and terminal.data["interrupted"] is True
    assert "AFTER" not in stream.stdout
    await poll(lambda: not psutil.Process(session["pid"]).children(recursive=True), 5, "pipeline gone")


async def test_interrupt_inside_nested_functions_skips_the_callers_following_lines(daemon: Daemon) -> None:
    session = await daemon.create()
    code = "\n".join(
        [
            "inner() { sleep 100; echo INNER_AFTER; }",
            "middle() { inner; echo MIDDLE_AFTER; return 0; }",
            "outer() { middle || echo MIDDLE_FAILED; echo OUTER_AFTER; }",
            "outer",
            "echo TOP_AFTER",
        ]
    )
    stream, done = await interrupted_run(daemon, session, code)
    assert done["exit_code"] == 130
    assert stream.stdout == "", stream.events
    # The functions stay defined, and work normally in the next run.
    again = await daemon.run(session["session_id"], "inner() { echo quick; }; outer")
    assert again.stdout == "quick\nMIDDLE_AFTER\nOUTER_AFTER\n"


async def test_interrupt_in_sourced_file_skips_the_rest_of_the_sourcing_code(daemon: Daemon, tmp_path: Any) -> None:
    script = tmp_path / "lib.sh"
    script.write_text("sleep 100\necho LIB_AFTER\n")
    session = await daemon.create()
    stream, done = await interrupted_run(daemon, session, f"source {script}; echo TOP_AFTER")
    assert done["exit_code"] == 130
    assert stream.stdout == ""


async def test_interrupt_skips_the_rest_even_when_the_child_handles_int_and_exits_0(daemon: Daemon) -> None:
    session = await daemon.create()
    code = """bash -c 'trap "exit 0" INT; sleep 100 & wait'; echo AFTER rc=$?"""
    stream, done = await interrupted_run(daemon, session, code)
    assert done["exit_code"] == 130 and done["interrupted"] is True
    assert "AFTER" not in stream.stdout
    assert (await daemon.run(session["session_id"], "echo alive")).stdout == "alive\n"


async def test_interrupt_skips_the_rest_when_a_python_child_catches_sigint_and_exits_0(daemon: Daemon) -> None:
    session = await daemon.create()
    py = (
        "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(0));"
        " print('ready', flush=True); time.sleep(100)"
    )
    code = f'{sys.executable} -c "{py}"; echo AFTER rc=$?'
    stream = await open_run(daemon.client, session["session_id"], code)
    await stream.until_stdout("ready\n")
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    done = (await stream.until_terminal()).data
    assert done["exit_code"] == 130
    assert "AFTER" not in stream.stdout


async def test_interrupt_escalation_kills_run_processes_orphaned_by_their_parent(daemon: Daemon) -> None:
    """`sleep 100 &` in a non-interactive `bash -c` ignores SIGINT; its parent exits 0 on INT, so the
    sleep is orphaned (adopted by the daemon, no longer under the shell). It is still a process the
    run started: after the grace it is killed like any run process that did not end."""
    session = await daemon.create()
    code = """bash -c 'trap "exit 0" INT; sleep 100 & echo $!; wait'; echo AFTER"""
    stream = await running(daemon, session, code)
    sleep_pid = int(await stream.until_stdout("\n"))
    status, _ = await interrupt(daemon, session["session_id"])
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.data["exit_code"] == 130 and "AFTER" not in stream.stdout
    await poll(lambda: not is_live(sleep_pid), GRACE_S + 5, f"the run's orphaned sleep {sleep_pid} killed after grace")


async def test_interrupt_escalation_kills_background_jobs_the_interrupted_run_started(daemon: Daemon) -> None:
    """The run's processes are the shell's descendants the run started, `&` jobs included: a job that
    survives the signal (a non-interactive shell starts `&` jobs with SIGINT ignored) is SIGKILLed
    after the grace. Jobs of earlier runs are not touched (see the test above)."""
    session = await daemon.create()
    sid = session["session_id"]
    old_job = int((await daemon.run(sid, "sleep 300 & echo $!")).stdout)
    await poll(lambda: process_start_tick_passed(old_job), 5, "a clock tick since the old job started")
    stream = await running(daemon, session, "sleep 301 & echo $!; sleep 100; echo AFTER")
    new_job = int(await stream.until_stdout("\n"))
    status, _ = await interrupt(daemon, sid)
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.data["exit_code"] == 130 and "AFTER" not in stream.stdout
    await poll(lambda: not is_live(new_job), GRACE_S + 5, f"the run's own job {new_job} killed after the grace")
    assert is_live(old_job)


@pytest.mark.parametrize(("sig", "exit_code"), [("SIGINT", 130), ("SIGTERM", 143)], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("child", ["bash", "python"])
async def test_child_ignoring_int_and_term_is_killed_after_the_grace(
    daemon: Daemon, sig: str, exit_code: int, child: str
) -> None:
    session = await daemon.create()
    if child == "bash":
        code, name = """bash -c 'trap "" INT TERM; echo ready; sleep 100'; echo AFTER""", "sleep"
    else:
        py = (
            "import signal, time; [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)];"
            " print('ready', flush=True); time.sleep(100)"
        )
        code, name = f'{sys.executable} -c "{py}"; echo AFTER', psutil.Process().name()
    stream = await running(daemon, session, code, name)
    await stream.until_stdout("ready\n")  # the signals are ignored from here on
    victims = run_children(session["pid"], name)
    started = time.monotonic()
    status, _ = await interrupt(daemon, session["session_id"], signal=sig)
    assert status == 202
    terminal = await stream.until_terminal()
    waited = time.monotonic() - started
    assert terminal.type == "execution_complete", stream.events
    assert terminal.data["exit_code"] == exit_code and terminal.data["interrupted"] is True
    assert "AFTER" not in stream.stdout
    assert not any(is_live(v.pid) for v in victims)
    print(f"ignoring child ({child}, {sig}) ended {waited:.3f}s after the interrupt (grace {GRACE_S}s)")
    assert (await daemon.run(session["session_id"], "echo alive")).stdout == "alive\n"


async def test_user_int_trap_runs_on_interrupt_and_stays_set(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "trap 'echo caught' INT")
    stream, done = await interrupted_run(daemon, session, "sleep 100; echo AFTER")
    assert done["exit_code"] == 130 and done["interrupted"] is True
    assert "caught" in stream.stdout and "AFTER" not in stream.stdout
    assert (await daemon.run(sid, "trap -p INT")).stdout == "trap -- 'echo caught' SIGINT\n"
    # And it fires again on the next interrupt.
    stream, done = await interrupted_run(daemon, session, "sleep 100; echo AFTER")
    assert "caught" in stream.stdout and "AFTER" not in stream.stdout


async def test_user_int_trap_set_in_the_interrupted_run_itself_runs(daemon: Daemon) -> None:
    session = await daemon.create()
    stream, done = await interrupted_run(daemon, session, "trap 'echo caught-$$' INT; sleep 100; echo AFTER")
    assert done["exit_code"] == 130
    assert f"caught-{session['pid']}" in stream.stdout and "AFTER" not in stream.stdout
    assert (await daemon.run(session["session_id"], "trap -p INT")).stdout.startswith("trap -- 'echo caught-$$'")


@pytest.mark.parametrize(("sig", "exit_code"), [("SIGTERM", 143), ("SIGKILL", 137)])
async def test_term_and_kill_interrupts_end_the_run_with_128_plus_signal(
    daemon: Daemon, sig: str, exit_code: int
) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "STATE=kept")
    stream, done = await interrupted_run(daemon, session, "sleep 100 | cat; echo AFTER", sig)
    assert done["exit_code"] == exit_code and done["interrupted"] is True and done["shell_exited"] is False
    assert "AFTER" not in stream.stdout
    assert not run_children(session["pid"], "sleep")
    after = await daemon.run(sid, "echo $STATE $$")
    assert after.stdout == f"kept {session['pid']}\n"
    assert "Killed" not in after.stderr and "Terminated" not in after.stderr, after.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGKILL"])
async def test_interrupt_spares_background_jobs_of_earlier_runs(daemon: Daemon, sig: str) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    # Several jobs, each started right before the interrupted run (the tightest timing a client makes).
    jobs = []
    for _ in range(5):
        result = await daemon.run(sid, "sleep 300 & echo $!")
        jobs.append(int(result.stdout))
        await interrupted_run(daemon, session, "sleep 100", sig, child=None)
    assert all(is_live(pid) for pid in jobs), [(pid, is_live(pid)) for pid in jobs]
    await interrupted_run(daemon, session, "sleep 100", sig)
    assert all(is_live(pid) for pid in jobs), [(pid, is_live(pid)) for pid in jobs]
    assert "sleep 300" in session_commands(sid)


async def test_interrupt_spares_an_escapee_started_by_an_earlier_run(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    pid = int((await daemon.run(sid, "setsid sleep 300 >/dev/null 2>&1 & echo $!")).stdout)
    await interrupted_run(daemon, session, "sleep 100", "SIGKILL")
    assert is_live(pid)


@pytest.mark.parametrize(
    "code",
    [
        # The daemon's private signal is ignored and nothing runs in a child: no way back.
        "trap '' USR2; echo ready; while :; do :; done",
        # The shell replaced itself by a program that ignores every signal but SIGKILL.
        "exec {py} -c 'import signal, time; [signal.signal(s, signal.SIG_IGN) for s in "
        '(signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)]; print("ready", flush=True); time.sleep(100)\'',
    ],
    ids=["usr2-ignored-builtin-loop", "exec-ignoring-program"],
)
async def test_shell_that_does_not_come_back_is_killed_and_session_fails(daemon: Daemon, code: str) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    stream = await open_run(daemon.client, sid, code.format(py=sys.executable))
    await stream.until_stdout("ready\n")  # every catchable signal is ignored now (a loaded machine is slow)
    status, _ = await interrupt(daemon, sid)
    assert status == 202
    terminal = await stream.until_terminal()
    assert terminal.type == "error", stream.events
    assert terminal.data["code"] == "SESSION_DIED"
    assert terminal.data["error"] == {"ename": "SESSION_DIED", "evalue": terminal.data["message"], "traceback": []}
    got = await (await daemon.client.get(f"/session/{sid}")).json()
    assert got["state"] == "failed", got
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    assert response.status == 410
    assert (await response.json())["code"] == "SESSION_ENDED"
    await poll(lambda: not session_commands(sid), 5, "every process of the failed session gone")


# ----- timeouts --------------------------------------------------------------------------------


async def test_timeout_interrupts_the_run_and_the_session_lives(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, "X=before; echo start; sleep 100; echo AFTER", timeout_ms=300)
    done = result.complete
    assert done["timed_out"] is True and done["interrupted"] is True and done["exit_code"] == 130
    assert result.stdout == "start\n"
    assert not run_children(session["pid"], "sleep")
    assert (await daemon.run(sid, "echo $X")).stdout == "before\n"
    got = await (await daemon.client.get(f"/session/{sid}")).json()
    assert got["state"] == "idle"


async def test_timeout_alias_works_like_timeout_ms(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "sleep 100; echo AFTER", timeout=300)
    assert result.complete["timed_out"] is True and result.complete["exit_code"] == 130
    assert "AFTER" not in result.stdout


async def test_a_run_that_ends_before_its_timeout_is_not_timed_out(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "echo quick", timeout_ms=60_000)
    assert result.complete["timed_out"] is False and result.complete["interrupted"] is False
    assert result.complete["exit_code"] == 0


async def test_timeout_of_a_child_ignoring_int_escalates_and_completes(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(
        session["session_id"], """bash -c 'trap "" INT TERM; sleep 100'; echo AFTER""", timeout_ms=200
    )
    assert result.complete["timed_out"] is True and result.complete["exit_code"] == 130
    assert "AFTER" not in result.stdout


@pytest.mark.parametrize("timeout_ms", [0, None, 3_600_000])
async def test_timeout_is_capped_by_the_server_maximum(make_daemon: DaemonFactory, timeout_ms: int | None) -> None:
    daemon = await make_daemon(max_run_timeout_ms=300, interrupt_grace_ms=500)
    session = await daemon.create()
    body = {} if timeout_ms is None else {"timeout_ms": timeout_ms}
    result = await daemon.run(session["session_id"], "sleep 100; echo AFTER", **body)
    assert result.complete["timed_out"] is True and result.complete["exit_code"] == 130
    assert "AFTER" not in result.stdout
    assert (await daemon.run(session["session_id"], "echo alive")).stdout == "alive\n"


# ----- measurement (printed, never asserted) ---------------------------------------------------


async def test_measure_interrupt_latency(daemon: Daemon) -> None:
    session = await daemon.create()
    latencies = []
    for _ in range(30):
        stream = await running(daemon, session, "sleep 100")
        started = time.perf_counter()
        status, _ = await interrupt(daemon, session["session_id"])
        terminal = await stream.until_terminal()
        assert stream.terminal_at is not None
        latencies.append((stream.terminal_at - started) * 1000)
        assert status == 202 and terminal.data["exit_code"] == 130
    print(
        f"\ninterrupt latency over {len(latencies)} interrupts of `sleep 100`: "
        f"p50 {percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms, "
        f"max {max(latencies):.2f} ms, min {min(latencies):.2f} ms"
    )


async def test_interrupt_spares_what_an_earlier_job_starts_during_the_run(daemon: Daemon, tmp_path: Any) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    go = tmp_path / "go"
    # The job of run 1 starts its `sleep 301` only while run 2 is on.
    await daemon.run(sid, f"(while [ ! -e {go} ]; do sleep 0.01; done; sleep 301) &")
    stream = await running(daemon, session, "sleep 100")
    go.touch()
    await poll(lambda: "sleep 301" in session_commands(sid), 10, "the earlier job's child started")
    status, _ = await interrupt(daemon, sid, signal="SIGKILL")
    assert status == 202
    assert (await stream.until_terminal()).data["interrupted"] is True
    await asyncio.sleep(0.8)  # past the 500 ms grace: the escalation has run
    assert "sleep 301" in session_commands(sid)


async def test_set_x_interrupt_traces_nothing_of_the_wrapper(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "set -x")
    stream, terminal = await interrupted_run(daemon, session, "sleep 100")
    assert terminal["exit_code"] == 130
    assert "__execd" not in "".join(e.data.get("text", "") for e in stream.events), stream.events
