"""Injection mode: `execd serve -- COMMAND` runs a container's entrypoint beside the daemon. Its
exit ends the daemon with its status; the daemon's stop signals reach it; what ignores them is
killed with its process group at the end of the grace; as PID 1 the daemon reaps its orphans."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

from execd.client import Client
from tests.conftest import assert_no_processes
from tests.helpers_control import REPO, free_port, healthy, require_root


@contextmanager
def supervising(
    command: Sequence[str],
    *flags: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    wait: bool = True,
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "execd", "serve", "--host", "127.0.0.1", "--port", str(port), *flags,
         "--", *command],
        cwd=REPO, env={**base, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while wait and not healthy(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.05)
        yield proc, port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=15)


def test_the_commands_exit_ends_the_daemon_with_its_status(tmp_path: Path) -> None:
    flag = tmp_path / "go"
    command = ["sh", "-c", f"while [ ! -e {flag} ]; do sleep 0.05; done; exit 7"]
    with supervising(command) as (proc, port), Client(f"http://127.0.0.1:{port}") as client:
        session = client.create_session()
        session.run("sleep 1000 &")  # the daemon's own work, going on while the command runs
        assert session.run("echo $((6*7))").stdout == "42\n"
        flag.touch()
        assert proc.wait(timeout=15) == 7
    assert_no_processes({session.id})


def test_the_daemons_stop_signal_reaches_the_command(tmp_path: Path) -> None:
    said, pids = tmp_path / "said", tmp_path / "pids"
    command = ["sh", "-c", f"trap 'echo TERM > {said}; exit 0' TERM; sleep 1000 & echo $! > {pids}; wait"]
    with supervising(command) as (proc, _):
        while not pids.exists() or not pids.read_text().strip():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert said.read_text() == "TERM\n"
    left = int(pids.read_text())  # what the command left in its group when it exited is ended too
    assert not psutil.pid_exists(left) or psutil.Process(left).status() == psutil.STATUS_ZOMBIE


def test_a_command_that_ignores_the_stop_is_killed_with_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = ["sh", "-c", f"trap '' TERM; sleep 1000 & echo $$ $! > {pids}; wait"]
    with supervising(command, "--shutdown-grace-s", "1") as (proc, _):
        while not pids.exists() or not pids.read_text().strip():
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGKILL
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_command_that_cannot_start_is_one_line_and_127() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "execd", "serve", "--port", "0", "--", "/no/such/entrypoint"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 127
    assert done.stderr.strip() == "execd: cannot run '/no/such/entrypoint': No such file or directory"


def test_the_command_gets_the_environment_but_not_the_token(tmp_path: Path) -> None:
    out = tmp_path / "env"
    command = ["sh", "-c", f"env > {out}; exit 0"]
    env = {"EXECD_ACCESS_TOKEN": "secret-token-123", "APP_SETTING": "kept"}
    with supervising(command, env=env, wait=False) as (proc, _):
        assert proc.wait(timeout=15) == 0
    seen = out.read_text()
    assert "APP_SETTING=kept" in seen and "secret-token-123" not in seen


def test_as_pid_1_the_daemon_reaps_the_commands_orphans() -> None:
    require_root("a pid namespace of its own (the daemon as PID 1)")
    command = ["sh", "-c", "for i in 1 2 3 4 5; do (sleep 0.1 &); done; sleep 1000"]
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    with supervising(command, prefix=prefix) as (proc, port):
        daemon = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "execd" in " ".join(p.cmdline()))
        time.sleep(0.5)  # the orphans have exited and re-parented to PID 1: the daemon
        zombies = [c for c in daemon.children() if c.status() == psutil.STATUS_ZOMBIE]
        assert zombies == []
        sleeps = [c for c in daemon.children() if c.name() == "sh"]
        assert len(sleeps) == 1  # the command itself, still running
        assert healthy(port)


def test_with_run_as_the_command_runs_as_that_user_too() -> None:
    require_root("running the command as another user")
    with tempfile.TemporaryDirectory() as where:  # not under pytest's 0700 tmp: nobody must write here
        os.chmod(where, 0o777)
        out = Path(where) / "who"
        command = ["sh", "-c", f"id -u > {out}; echo $HOME >> {out}; exit 0"]
        with supervising(command, "--run-as", "nobody", wait=False) as (proc, _):
            assert proc.wait(timeout=15) == 0
        uid, home = out.read_text().split()
    assert (int(uid), home) == (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_dir)
