"""The access token: read from a file, gone from the environment the daemon hands on, never in
the watchdog's or a shell's environment."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers_control import DaemonProcess, subprocess_daemons
from tests.test_startup import serve

TOKEN = "t0ken-from-a-file-4f9c"


@pytest.fixture
async def daemon_process() -> AsyncIterator[Callable[..., Any]]:
    async for start in subprocess_daemons():
        yield start


def environ_of(pid: int) -> dict[str, str]:
    return psutil.Process(pid).environ()


@pytest.mark.parametrize("source", ["file", "environment"])
async def test_the_token_reaches_neither_the_watchdog_nor_the_shells(
    daemon_process: Callable[..., Any], tmp_path: Path, source: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"EXECD_ACCESS_TOKEN_FILE": str(token_file)} if source == "file" else {"EXECD_ACCESS_TOKEN": TOKEN}
    daemon: DaemonProcess = await daemon_process(**env)
    assert daemon.http is not None and daemon.watchdog is not None
    async with daemon.http.post("/session") as response:
        assert response.status == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with daemon.http.post("/session", headers=auth) as response:
        assert response.status == 200, await response.text()
        session = await response.json()
    daemon.session_ids.add(session["session_id"])
    for pid in (daemon.watchdog.pid, session["pid"]):
        assert TOKEN not in str(environ_of(pid)), pid
        assert "EXECD_ACCESS_TOKEN" not in environ_of(pid)
    async with daemon.http.delete(f"/session/{session['session_id']}", headers=auth) as response:
        assert response.status == 200


def test_a_token_file_that_cannot_be_read_or_is_empty_or_comes_with_a_token_is_exit_2(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args in (
        ["--access-token-file", str(tmp_path / "missing")],
        ["--access-token-file", str(empty)],
        ["--access-token-file", str(empty), "--access-token", "x"],
    ):
        done = serve(*args)
        assert done.returncode == 2, done
        assert len(done.stderr.strip().splitlines()) == 1 and "--access-token-file" in done.stderr, done.stderr
