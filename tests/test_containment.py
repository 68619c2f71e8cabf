"""What a session started dies with it, even what left its tree, its group and its tag: the cgroup
per session, the shell that ends by itself, the watchdog, and pid numbers that wrap around."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from execd import process
from execd.client import Client
from tests.conftest import wait_for
from tests.helpers_control import DaemonProcess, is_live, require_cgroups, require_root, served, subprocess_daemons

# Leaves the shell's tree, process group and session, and carries no tag.
UNTAGGED_ESCAPEE = "env -i setsid sleep 1000.25 </dev/null >/dev/null 2>&1 & echo $!"


@pytest.fixture
async def daemon_process() -> AsyncIterator[Callable[..., Any]]:
    async for start in subprocess_daemons():
        yield start


async def escapee_of(daemon: DaemonProcess, session_id: str) -> int:
    stream = await daemon.run(session_id, UNTAGGED_ESCAPEE)
    pid = int(stream.stdout)
    # `env -i` may not have exec'd yet when the run ends.
    await wait_for(lambda: is_live(pid) and process.tag_of(pid) is None, what="the escapee without its tag")
    return pid


def gone(pid: int) -> bool:
    return not is_live(pid)


async def test_cgroup_delete_kills_an_untagged_escapee(daemon_process: Any) -> None:
    require_cgroups()
    daemon: DaemonProcess = await daemon_process()
    assert '"mode": "cgroup"' in daemon.log_text()
    session = await daemon.create()
    cgroup = os.path.join(_cgroup_root(daemon), session["session_id"])
    assert os.path.isdir(cgroup)  # noqa: ASYNC240
    pid = await escapee_of(daemon, session["session_id"])
    assert daemon.http is not None
    async with daemon.http.delete(f"/session/{session['session_id']}") as response:
        assert response.status == 200
    assert gone(pid), "DELETE answered before the escapee was dead"
    await wait_for(lambda: not os.path.exists(cgroup), what="the session's cgroup removed")


def _cgroup_root(daemon: DaemonProcess) -> str:
    for line in daemon.log_text().splitlines():
        if '"kill_mode"' in line:
            root: str = json.loads(line)["cgroup"]
            return root
    raise AssertionError("no kill_mode line in the daemon's log")


async def test_cgroup_shell_that_exits_takes_its_untagged_escapee_along(daemon_process: Any) -> None:
    require_cgroups()
    daemon: DaemonProcess = await daemon_process()
    session = await daemon.create()
    pid = await escapee_of(daemon, session["session_id"])
    await daemon.run(session["session_id"], "exit 3")
    await wait_for(lambda: gone(pid), timeout=10, what="the escapee killed after the shell's exit")


async def test_cgroup_watchdog_kills_untagged_escapees_when_the_daemon_is_killed(daemon_process: Any) -> None:
    require_cgroups()
    daemon: DaemonProcess = await daemon_process()
    session = await daemon.create()
    pid = await escapee_of(daemon, session["session_id"])
    cgroup_root = f"execd-{daemon.proc.pid}"
    daemon.signal(signal.SIGKILL)
    await wait_for(lambda: gone(pid), timeout=10, what="the escapee killed by the watchdog")
    await wait_for(lambda: not _cgroup_dirs(cgroup_root), timeout=10, what="the daemon's cgroups removed")


def _cgroup_dirs(name: str) -> list[str]:
    found = []
    for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        for dirpath, dirnames, _ in os.walk(base):
            found += [os.path.join(dirpath, d) for d in dirnames if d == name]
            if dirpath.count("/") > 6:
                dirnames.clear()
    return found


async def test_without_cgroups_a_shell_that_exits_has_its_untagged_job_killed(daemon_process: Any) -> None:
    daemon: DaemonProcess = await daemon_process(EXECD_SESSION_CGROUPS="0")
    assert '"mode": "tag_sweep"' in daemon.log_text()
    session = await daemon.create()
    stream = await daemon.run(session["session_id"], "env -u EXECD_SESSION_ID sleep 1000.5 & echo $!")
    pid = int(stream.stdout)
    await daemon.run(session["session_id"], "exit")
    await wait_for(lambda: gone(pid), timeout=10, what="the job left in the shell's group killed at its exit")


def test_pid_after_counts_across_the_wrap_around() -> None:
    top = process._pid_max()
    assert process.pid_after(301, top - 1)  # wrapped: handed out after the last one
    assert not process.pid_after(top - 5, 301)  # before the wrap
    assert process.pid_after(1001, 1000) and not process.pid_after(1000, 1000) and not process.pid_after(999, 1000)


def test_pid_wrap_around_does_not_hide_a_runs_processes_from_its_timeout() -> None:
    """In a pid namespace of its own (the last pid it sets is that namespace's, not the host's):
    the shell sets the last pid near pid_max, and the next run's child gets a pid past the wrap."""
    require_root("a pid namespace of the daemon's own")
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    with served(prefix=unshare) as daemon, Client(daemon.url) as client, client.create_session() as session:
        top = int(session.run("cat /proc/sys/kernel/pid_max").stdout)
        for _ in range(5):  # a thread of the daemon may take the pids between the two runs
            session.run(f"echo {top - 1} > /proc/sys/kernel/ns_last_pid")  # the next pid wraps
            # In the foreground, as in the field: bash holds its interrupt trap until the child ends.
            result = session.run("sh -c 'echo $$; exec sleep 30'", timeout_ms=300)
            assert result.timed_out and result.exit_code == 130, result
            if int(result.stdout) < top - 1:
                break  # the run's child got a pid from past the wrap-around
        else:
            pytest.fail("the run's child never got a wrapped pid")
        assert client.get_session(session.id)["state"] == "idle"
