"""Sessions: create, list, get (with resources), delete; health; what a shell's environment holds."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

import execd
from execd.api.errors import from_exception
from execd.api.keys import REGISTRY
from execd.registry import SessionOptions, SessionStartFailed
from tests.conftest import Daemon, DaemonFactory, read_run
from tests.helpers_core import SESSION_FIELDS, expect_error, get_session


def _rfc3339_utc(value: str) -> datetime:
    assert value.endswith("Z"), value
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() == UTC.utcoffset(None)
    return parsed


async def test_create_returns_200_and_the_session_object_with_exactly_the_contract_fields(daemon: Daemon) -> None:
    response = await daemon.client.post("/session", json={})
    assert response.status == 200
    session = await response.json()
    assert set(session) == SESSION_FIELDS
    assert isinstance(session["session_id"], str) and session["session_id"]
    assert session["state"] == "idle"
    assert isinstance(session["pid"], int) and session["pid"] > 0
    assert session["cwd"] == os.getcwd()
    assert session["labels"] == {}
    assert _rfc3339_utc(session["created_at"]) <= _rfc3339_utc(session["last_active_at"])
    assert session["idle_timeout_s"] == 0
    assert session["run_count"] == 0
    for empty in ("current_run_id", "reason", "exit_code", "signal"):
        assert session[empty] is None, empty


@pytest.mark.parametrize("content_type", [None, "application/json"])
async def test_zero_length_body_creates_a_session(daemon: Daemon, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await daemon.client.post("/session", data=b"", headers=headers)
    assert response.status == 200, await response.text()
    assert (await response.json())["state"] == "idle"


async def test_create_with_options_applies_them(daemon: Daemon, tmp_path: Path) -> None:
    labels = {"owner": "agent-7", "tier": "ünïcode ok"}
    session = await daemon.create(cwd=str(tmp_path), idle_timeout_s=600, labels=labels, env={"T_OPT": "x"})
    assert session["cwd"] == str(tmp_path)
    assert session["idle_timeout_s"] == 600
    assert session["labels"] == labels
    result = await daemon.run(session["session_id"], 'echo "$PWD $T_OPT"')
    assert result.stdout == f"{tmp_path} x\n"


async def test_labels_round_trip_through_get_and_list(daemon: Daemon) -> None:
    labels = {"owner": "agent-7", "empty": "", "spaces and = signs": "a=b c"}
    session = await daemon.create(labels=labels)
    sid = session["session_id"]
    assert (await get_session(daemon, sid))["labels"] == labels
    listed = await (await daemon.client.get("/session")).json()
    assert next(s for s in listed["sessions"] if s["session_id"] == sid)["labels"] == labels


async def test_list_sessions_shows_every_session_with_the_contract_fields(daemon: Daemon) -> None:
    response = await daemon.client.get("/session")
    assert response.status == 200
    assert await response.json() == {"sessions": []}
    created = [await daemon.create(labels={"n": str(n)}) for n in range(3)]
    await daemon.run(created[2]["session_id"], "exit 1")  # an ended session is still listed
    listed = (await (await daemon.client.get("/session")).json())["sessions"]
    assert {s["session_id"] for s in listed} == {s["session_id"] for s in created}
    for entry in listed:
        assert set(entry) == SESSION_FIELDS
    states = {s["session_id"]: s["state"] for s in listed}
    assert states[created[2]["session_id"]] == "exited"
    assert states[created[0]["session_id"]] == "idle"


async def test_get_session_has_resources_of_the_process_tree(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, "sleep 30 & sleep 30 &")
    got = await get_session(daemon, sid)
    assert set(got) == SESSION_FIELDS | {"resources"}
    resources = got["resources"]
    assert set(resources) == {"num_processes", "rss_bytes", "cpu_seconds"}
    assert resources["num_processes"] == 3  # the shell and its two sleeps
    assert isinstance(resources["rss_bytes"], int) and resources["rss_bytes"] > 0
    assert isinstance(resources["cpu_seconds"], float) and resources["cpu_seconds"] >= 0


async def test_session_object_follows_runs(daemon: Daemon, tmp_path: Path) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    await daemon.run(sid, f"cd {tmp_path}")
    await daemon.run(sid, "true")
    got = await get_session(daemon, sid)
    assert got["run_count"] == 2
    assert got["cwd"] == str(tmp_path)
    assert _rfc3339_utc(got["last_active_at"]) >= _rfc3339_utc(session["last_active_at"])
    assert got["pid"] == session["pid"]


async def test_delete_returns_the_final_object_and_forgets_the_session(daemon: Daemon) -> None:
    session = await daemon.create(labels={"k": "v"})
    sid = session["session_id"]
    await daemon.run(sid, "sleep 30 &")
    final = await daemon.delete(sid)
    assert set(final) == SESSION_FIELDS
    assert final["session_id"] == sid
    assert final["state"] == "closed"
    assert final["reason"] == "deleted"
    assert final["labels"] == {"k": "v"}
    await expect_error(await daemon.client.get(f"/session/{sid}"), 404, "SESSION_NOT_FOUND")
    await expect_error(await daemon.client.post(f"/session/{sid}/run", json={"code": "true"}), 404, "SESSION_NOT_FOUND")
    await expect_error(await daemon.client.delete(f"/session/{sid}"), 404, "SESSION_NOT_FOUND")
    listed = (await (await daemon.client.get("/session")).json())["sessions"]
    assert sid not in {s["session_id"] for s in listed}


async def test_healthz_reports_status_version_live_sessions_and_uptime(daemon: Daemon) -> None:
    response = await daemon.client.get("/healthz")
    assert response.status == 200
    body = await response.json()
    assert set(body) == {"status", "version", "sessions", "uptime_s", "watchdog"}  # watchdog: v2
    assert body["status"] == "ok" and body["watchdog"] == "ok"
    assert body["version"] == execd.__version__
    assert body["sessions"] == 0
    assert isinstance(body["uptime_s"], (int, float)) and body["uptime_s"] >= 0
    first = await daemon.create()
    await daemon.create()
    assert (await (await daemon.client.get("/healthz")).json())["sessions"] == 2
    await daemon.run(first["session_id"], "exit 0")  # only live sessions count
    assert (await (await daemon.client.get("/healthz")).json())["sessions"] == 1


async def test_ping_answers_200(daemon: Daemon) -> None:
    response = await daemon.client.get("/ping")
    assert response.status == 200


async def test_shell_environment_has_session_id_but_no_token_or_settings(
    make_daemon: DaemonFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemon was configured through its environment, as in production.
    monkeypatch.setenv("EXECD_ACCESS_TOKEN", "s3cret-token-value")
    monkeypatch.setenv("EXECD_MAX_SESSIONS", "7")
    daemon = await make_daemon(access_token="s3cret-token-value")
    headers = {"X-EXECD-ACCESS-TOKEN": "s3cret-token-value"}
    response = await daemon.client.post("/session", json={}, headers=headers)
    assert response.status == 200
    sid = (await response.json())["session_id"]
    code = "env; echo ---; tr '\\0' '\\n' </proc/$$/environ"
    async with daemon.client.post(f"/session/{sid}/run", json={"code": code}, headers=headers) as response:
        result = await read_run(response)
    exported, initial = result.stdout.split("---\n")
    for listing in (exported, initial):
        lines = listing.splitlines()
        assert f"EXECD_SESSION_ID={sid}" in lines
        assert [line for line in lines if line.startswith("EXECD_")] == [f"EXECD_SESSION_ID={sid}"]
        assert "s3cret-token-value" not in listing


async def test_shell_reads_its_own_session_id(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], 'echo "$EXECD_SESSION_ID"; bash -c \'echo "$EXECD_SESSION_ID"\'')
    assert result.stdout == f"{session['session_id']}\n" * 2


async def test_a_shell_that_cannot_start_makes_a_failed_session(daemon: Daemon, tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    # The directory passes validation, then vanishes before the shell can `cd` into it.
    registry = daemon.app[REGISTRY]
    session_task = asyncio.ensure_future(registry.create(SessionOptions(cwd=str(gone))))
    gone.rmdir()
    session = await session_task
    assert session.state == "failed", (session.state, session.reason)
    assert session.reason and "could not start" in session.reason
    await daemon.delete(session.id)


async def test_a_shell_that_cannot_start_is_a_503_session_start_failed_and_is_not_kept(
    daemon: Daemon, tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    registry = daemon.app[REGISTRY]
    # As above, through the route's own entry point and the one map from errors to the contract.
    attempt = asyncio.ensure_future(registry.open(SessionOptions(cwd=str(gone))))
    gone.rmdir()
    with pytest.raises(SessionStartFailed) as failed:
        await attempt
    answer = from_exception(failed.value)
    assert answer is not None and (answer.status, answer.code) == (503, "SESSION_START_FAILED")
    assert "could not start" in answer.message
    assert registry.sessions == {}
