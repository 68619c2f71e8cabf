"""Shells as another user (`--run-as`, a session's `user`): what the code a session runs can no
longer reach, tried as an attacker would. These need root (CI runs as root)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.helpers_control import DaemonProcess, require_root, subprocess_daemons

TOKEN = "s3cret-token-for-run-as-tests"
UID_A, UID_B = "42001", "42002"  # no passwd entry needed: numeric users are taken as they are


@pytest.fixture
async def daemon_process() -> AsyncIterator[Callable[..., Any]]:
    require_root("running shells as another user")
    async for start in subprocess_daemons():
        yield start


@pytest.fixture
def token_file() -> Iterator[str]:
    with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
        f.write(TOKEN)
    yield f.name
    os.unlink(f.name)


async def started(daemon_process: Any, **env: str) -> DaemonProcess:
    daemon: DaemonProcess = await daemon_process(**env)
    return daemon


async def run(daemon: DaemonProcess, session_id: str, code: str, **body: Any) -> tuple[str, str, int]:
    stream = await daemon.run(session_id, code, **body)
    terminal = stream.events[-1]
    assert terminal.type == "execution_complete", terminal
    return stream.stdout, stream.text("stderr"), terminal.data["exit_code"]


def headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def test_run_as_shell_has_the_users_ids_login_env_and_no_privileges(daemon_process: Any) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS="nobody")
    session = await daemon.create()
    assert session["user"] == "nobody"
    out, _, _ = await run(
        daemon,
        session["session_id"],
        'id -u; id -g; echo "$HOME $USER $LOGNAME"; grep -E "^(NoNewPrivs|CapBnd|CapEff)" /proc/self/status',
    )
    lines = out.split("\n")
    assert lines[:2] == ["65534", "65534"]
    assert lines[2] == "/nonexistent nobody nobody"
    assert "NoNewPrivs:\t1" in lines
    assert "CapBnd:\t0000000000000000" in lines and "CapEff:\t0000000000000000" in lines


async def test_run_as_code_cannot_read_the_daemons_or_watchdogs_secrets(daemon_process: Any, token_file: str) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS="nobody", EXECD_ACCESS_TOKEN_FILE=token_file)
    assert daemon.watchdog is not None and daemon.http is not None
    async with daemon.http.post("/session", json={}, headers=headers()) as response:
        session = await response.json()
    daemon.session_ids.add(session["session_id"])
    code = (
        f"for p in $PPID {daemon.watchdog.pid}; do cat /proc/$p/environ; head -c 4096 /proc/$p/mem; ls /proc/$p/fd;"
        " cat /proc/$p/cmdline; echo; done; grep -rl s3cret /proc/$PPID/ 2>/dev/null | head -3"
    )
    async with daemon.http.post(
        f"/session/{session['session_id']}/run", json={"code": code}, headers=headers()
    ) as response:
        body = (await response.read()).decode()
    assert "execution_complete" in body
    assert TOKEN not in body
    assert body.count("Permission denied") >= 6  # environ, mem and fd of both


async def test_run_as_code_cannot_signal_the_daemon_or_the_watchdog(daemon_process: Any) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS="nobody")
    assert daemon.watchdog is not None and daemon.http is not None
    session = await daemon.create()
    _, err, _ = await run(
        daemon,
        session["session_id"],
        f"kill -STOP $PPID; kill -9 $PPID; kill -9 {daemon.watchdog.pid}",
    )
    assert err.count("Operation not permitted") == 3, err
    async with daemon.http.get("/healthz") as response:
        health = await response.json()
    assert health["watchdog"] == "ok"
    assert daemon.watchdog.is_running() and daemon.proc.poll() is None


async def test_run_as_users_cannot_reach_each_others_session_dirs(daemon_process: Any) -> None:
    daemon = await started(daemon_process)
    victim, attacker = await daemon.create(user=UID_A), await daemon.create(user=UID_B)
    assert (victim["user"], attacker["user"]) == (UID_A, UID_B)
    victim_dir, _, _ = await run(daemon, victim["session_id"], "printf %s $__execd_dir")
    code = (
        f'd={victim_dir}; ls "$(dirname "$d")"; ls "$d"; echo "echo PWNED" > "$d/code"; '
        '(printf "\\0x\\0\\0\\0" > "$d/status") 2>&1 | sed "s/^/status: /" >&2; cat "$d/code"; ln -s /etc "$d/evil"'
    )
    _, err, _ = await run(daemon, attacker["session_id"], code)
    assert err.count("Permission denied") == 6, err
    for i in range(20):
        out, _, code_ = await run(daemon, victim["session_id"], f"echo run-{i}")
        assert (out, code_) == (f"run-{i}\n", 0)


async def test_run_as_root_owned_private_dir_holds_files_owned_by_the_shells_user(daemon_process: Any) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS=UID_A)
    session = await daemon.create()
    private, _, _ = await run(daemon, session["session_id"], "printf %s $__execd_dir", env={"X": "1"})
    info = os.stat(private)
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (0, 0o711)
    base = os.stat(os.path.dirname(private))
    assert (base.st_uid, stat.S_IMODE(base.st_mode)) == (0, 0o711)
    for name in ("code", "status", "scratch", "prelude"):
        owned = os.stat(os.path.join(private, name))
        assert (owned.st_uid, stat.S_IMODE(owned.st_mode)) == (int(UID_A), 0o600), name


async def test_run_as_cwd_is_checked_as_the_shells_user(daemon_process: Any) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS="nobody")
    assert daemon.http is not None
    private = tempfile.mkdtemp(prefix="execd-private-")  # 0700, root's
    try:
        async with daemon.http.post("/session", json={"cwd": private}) as response:
            assert response.status == 400
            assert "may not enter" in (await response.json())["message"]
        session = await daemon.create(cwd="/tmp")
        async with daemon.http.post(
            f"/session/{session['session_id']}/run", json={"code": "pwd", "cwd": private}
        ) as response:
            assert response.status == 400
        root_session = await daemon.create(user="root", cwd=private)
        assert root_session["user"] == "root" and root_session["cwd"] == private
    finally:
        shutil.rmtree(private)


async def test_run_as_unknown_user_is_a_400(daemon_process: Any) -> None:
    daemon = await started(daemon_process)
    assert daemon.http is not None
    for user in ("no-such-user-here", "", 4294967295, True, ["root"]):
        async with daemon.http.post("/session", json={"user": user}) as response:
            assert response.status == 400, user
            assert (await response.json())["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize("allowed", [False, True], ids=["default", "allow-privilege-escalation"])
async def test_run_as_setuid_binaries_do_not_elevate(daemon_process: Any, allowed: bool) -> None:
    extra = {"EXECD_ALLOW_PRIVILEGE_ESCALATION": "1"} if allowed else {}
    daemon = await started(daemon_process, EXECD_RUN_AS="nobody", **extra)
    if os.statvfs("/var/tmp").f_flag & os.ST_NOSUID:
        pytest.skip("/var/tmp is mounted nosuid: the setuid bit means nothing there")
    where = tempfile.mkdtemp(prefix="execd-setuid-", dir="/var/tmp")
    try:
        os.chmod(where, 0o755)
        binary = os.path.join(where, "id")
        shutil.copy(shutil.which("id") or "/usr/bin/id", binary)
        os.chmod(binary, 0o4755)  # setuid root
        session = await daemon.create()
        out, _, _ = await run(daemon, session["session_id"], f"{binary} -ru; {binary} -un")
    finally:
        shutil.rmtree(where)
    # `id -ru` prints the real uid, `id -un` the effective user: only the latter can be elevated.
    assert out.split("\n")[:2] == ["65534", "root" if allowed else "nobody"]


async def test_run_as_max_processes_caps_a_fork_bomb(daemon_process: Any) -> None:
    daemon = await started(daemon_process, EXECD_RUN_AS=UID_A, EXECD_MAX_PROCESSES="30")
    assert daemon.http is not None
    session = await daemon.create()
    # bash retries a refused fork for ~15 s: `timeout` ends the bomb (only it), its sleeps stay.
    out, _, _ = await run(
        daemon,
        session["session_id"],
        "ulimit -u; timeout --foreground 3 bash -c 'for i in $(seq 100); do sleep 60 & done' 2>/dev/null;"
        " pgrep -c -u 42001",
        timeout_ms=60_000,
    )
    limit, live = (int(x) for x in out.split())
    assert limit == 30
    assert 20 <= live <= 30  # the bomb got as far as the cap, and no further
    async with daemon.http.get("/healthz") as response:
        assert response.status == 200
    async with daemon.http.get(f"/session/{session['session_id']}") as response:
        assert (await response.json())["resources"]["num_processes"] <= 30
