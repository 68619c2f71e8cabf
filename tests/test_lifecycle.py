"""Session lifecycle: one enum of snake_case states, only the contract's transitions, and how a shell ends."""

from __future__ import annotations

import itertools
import os
import re
import signal
from typing import Any

import pytest

from execd.registry import ALLOWED_TRANSITIONS, InvalidTransition, Session, SessionState
from execd.shell import Shell, ShellConfig
from tests.conftest import Daemon
from tests.conftest import wait_for as poll
from tests.helpers_core import expect_error, get_session, open_run

LIVE = {SessionState.STARTING, SessionState.IDLE, SessionState.RUNNING}
TERMINAL = {SessionState.CLOSED, SessionState.EXITED, SessionState.FAILED}
# The contract's diagram: starting → idle ⇄ running; any live state → closing → closed; a live
# state → exited (the shell exited by itself) or failed (killed by a signal, or could not start).
CONTRACT_TRANSITIONS = {
    (SessionState.STARTING, SessionState.IDLE),
    (SessionState.IDLE, SessionState.RUNNING),
    (SessionState.RUNNING, SessionState.IDLE),
    (SessionState.CLOSING, SessionState.CLOSED),
    *((live, end) for live in LIVE for end in (SessionState.CLOSING, SessionState.EXITED, SessionState.FAILED)),
}


def _session(state: SessionState) -> Session:
    shell = Shell(ShellConfig(session_id="lifecycle-unit", cwd="/", env={}))  # never started
    session = Session("lifecycle-unit", shell, 0.0, {})
    session.state = state
    return session


# ----- the enum and its transition table ------------------------------------------------------


def test_session_states_are_one_enum_with_snake_case_values() -> None:
    values = [state.value for state in SessionState]
    assert values == ["starting", "idle", "running", "closing", "closed", "exited", "failed"]
    for state in SessionState:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", state.value)
        assert str(state) == state.value  # what the JSON carries


def test_transition_table_covers_every_state_and_matches_the_contract() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(SessionState)
    table = {(old, new) for old, targets in ALLOWED_TRANSITIONS.items() for new in targets}
    assert table == CONTRACT_TRANSITIONS


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_no_transition_out_of_a_terminal_state(state: SessionState) -> None:
    assert state.terminal and not state.live
    assert ALLOWED_TRANSITIONS[state] == frozenset()


async def test_session_transition_raises_invalid_transition_for_every_disallowed_pair() -> None:
    for old, new in itertools.product(SessionState, SessionState):
        session = _session(old)
        if old == new:
            session.transition(new)  # staying put is a no-op
            assert session.state == old
        elif (old, new) in CONTRACT_TRANSITIONS:
            session.transition(new, reason="why")
            assert session.state == new
        else:
            with pytest.raises(InvalidTransition):
                session.transition(new, reason="why")
            assert session.state == old, (old, new)
            assert session.reason is None


async def test_ending_transition_records_reason_and_end_time() -> None:
    session = _session(SessionState.IDLE)
    assert session.ended_at is None
    session.transition(SessionState.EXITED, "the shell exited with status 3")
    assert session.reason == "the shell exited with status 3"
    assert session.ended_at is not None
    with pytest.raises(InvalidTransition):
        session.transition(SessionState.IDLE)
    assert session.state == SessionState.EXITED


# ----- the states a client sees ---------------------------------------------------------------


async def test_session_is_running_during_a_run_and_idle_after(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    assert session["state"] == "idle"
    assert session["current_run_id"] is None
    async with open_run(daemon, sid, "sleep 30") as live:
        init = await live.next_event()
        during = await get_session(daemon, sid)
        assert during["state"] == "running"
        assert during["current_run_id"] == init.data["run_id"]
        response = await daemon.client.post(f"/session/{sid}/interrupt", json={})
        assert response.status == 202
        await live.until_terminal()
    after = await get_session(daemon, sid)
    assert after["state"] == "idle"
    assert after["current_run_id"] is None
    assert after["run_count"] == 1


async def test_exit_in_code_ends_the_session_as_exited(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, "echo bye; exit 3; echo not-reached")
    assert result.stdout == "bye\n"
    complete = result.complete
    assert complete["exit_code"] == 3
    assert complete["shell_exited"] is True
    assert complete["interrupted"] is False
    ended = await get_session(daemon, sid)
    assert ended["state"] == "exited"
    assert ended["exit_code"] == 3
    assert ended["signal"] is None
    assert ended["reason"]
    assert ended["current_run_id"] is None
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "echo again"})
    body = await expect_error(response, 410, "SESSION_ENDED")
    assert body["state"] == "exited"
    assert body["reason"] == ended["reason"]


@pytest.mark.parametrize(
    ("code", "stderr_part"),
    [("set -e; false; echo not-reached", ""), ("set -u; echo $nope_execd_unset; echo not-reached", "nope_execd_unset")],
    ids=["set_e_false", "set_u_unset_variable"],
)
async def test_shell_option_that_exits_the_shell_ends_the_session_as_exited(
    daemon: Daemon, code: str, stderr_part: str
) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, code)
    assert "not-reached" not in result.stdout
    assert stderr_part in result.stderr
    complete = result.complete
    assert complete["shell_exited"] is True
    assert complete["exit_code"] != 0
    ended = await get_session(daemon, sid)
    assert ended["state"] == "exited"
    assert ended["exit_code"] == complete["exit_code"]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    await expect_error(response, 410, "SESSION_ENDED")


async def test_shell_killed_by_a_signal_fails_the_run_with_session_died(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    result = await daemon.run(sid, "echo before; kill -9 $$; echo not-reached")
    assert result.stdout == "before\n"
    terminal = result.terminal
    assert terminal.type == "error"
    assert terminal.data["code"] == "SESSION_DIED"
    assert terminal.data["message"]
    assert terminal.data["error"] == {"ename": "SESSION_DIED", "evalue": terminal.data["message"], "traceback": []}
    assert [e.type for e in result.events].count("error") == 1
    ended = await get_session(daemon, sid)
    assert ended["state"] == "failed"
    assert ended["signal"] == "SIGKILL"
    assert ended["exit_code"] is None
    assert ended["reason"]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    body = await expect_error(response, 410, "SESSION_ENDED")
    assert body["state"] == "failed"


async def test_shell_killed_between_runs_fails_the_session(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "true")
    # The shell is killed from outside while no run is on (the OOM killer, an admin).
    os.kill(session["pid"], signal.SIGKILL)

    async def failed() -> dict[str, Any] | None:
        current = await get_session(daemon, sid)
        return current if current["state"] == "failed" else None

    ended = await poll(failed)
    assert ended["signal"] == "SIGKILL"
    assert ended["reason"]
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    body = await expect_error(response, 410, "SESSION_ENDED")
    assert body["state"] == "failed"


async def test_delete_closes_a_live_session_and_its_running_run_ends_with_session_closed(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    async with open_run(daemon, sid, "sleep 30") as live:
        await live.next_event()
        final = await daemon.delete(sid)
        assert final["state"] == "closed"
        assert final["reason"] == "deleted"
        rest = await live.rest()
    terminal = rest[-1]
    assert terminal.type == "error"
    assert terminal.data["code"] == "SESSION_CLOSED"
    assert terminal.data["error"] == {"ename": "SESSION_CLOSED", "evalue": terminal.data["message"], "traceback": []}
    response = await daemon.client.get(f"/session/{sid}")
    await expect_error(response, 404, "SESSION_NOT_FOUND")


async def test_delete_of_an_ended_session_keeps_its_state_and_reason(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "exit 4")
    ended = await get_session(daemon, sid)
    final = await daemon.delete(sid)
    assert final["state"] == "exited"
    assert final["exit_code"] == 4
    assert final["reason"] == ended["reason"]
    response = await daemon.client.delete(f"/session/{sid}")
    await expect_error(response, 404, "SESSION_NOT_FOUND")
