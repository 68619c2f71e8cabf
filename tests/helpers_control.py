"""Helpers for the control tests (interrupts, cleanup, daemon lifecycle): streaming SSE reads,
process probes by session tag, and a daemon started as a real subprocess.

Every probe works on real processes through /proc and psutil: no mocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from aiohttp import ClientResponse

from execd.cgroups import SessionCgroups
from execd.process import tag_of
from tests.conftest import Event, assert_no_processes, is_zombie

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("execution_complete", "error")


# ----- streaming SSE --------------------------------------------------------------------------


class EventStream:
    """Reads one run's SSE stream event by event, as it arrives (the conftest reader waits for EOF)."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.events: list[Event] = []
        self.terminal_at: float | None = None  # time.perf_counter() when the terminal event was read

    async def next(self, timeout: float = 30.0) -> Event:
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> Event:
        lines: list[str] = []
        while True:
            raw = await self.response.content.readline()
            if not raw:
                raise EOFError(f"stream ended after {[e.type for e in self.events]}")
            line = raw.decode().rstrip("\n")
            if line.startswith(":"):
                continue
            if line:
                lines.append(line)
                continue
            if not lines:
                continue
            assert len(lines) == 3, lines
            data = json.loads(lines[2][len("data: ") :])
            event = Event(type=lines[1][len("event: ") :], id=int(lines[0][len("id: ") :]), data=data)
            assert data["type"] == event.type and data["seq"] == event.id
            self.events.append(event)
            return event

    async def until_terminal(self, timeout: float = 30.0) -> Event:
        """Read until the terminal event; then the stream must end cleanly (no event after it)."""
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            if event.type in TERMINAL:
                self.terminal_at = time.perf_counter()
                rest = await asyncio.wait_for(self.response.content.read(), 10)
                assert not [b for b in rest.split(b"\n\n") if b.strip() and not b.startswith(b":")], rest
                return event

    async def until_stdout(self, needle: str, timeout: float = 30.0) -> str:
        """Read events until the run's stdout so far contains `needle` (chunks may split lines)."""
        deadline = time.monotonic() + timeout
        while needle not in self.stdout:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            assert event.type not in TERMINAL, self.events
        return self.stdout

    def text(self, stream: str) -> str:
        return "".join(e.data["text"] for e in self.events if e.type == stream)

    @property
    def stdout(self) -> str:
        return self.text("stdout")


async def open_run(client: Any, session_id: str, code: str, **body: Any) -> EventStream:
    """POST a run and read its `init` event; the caller reads the rest (or drops the connection)."""
    response = await client.post(f"/session/{session_id}/run", json={"code": code, **body})
    assert response.status == 200, await response.text()
    stream = EventStream(response)
    init = await stream.next()
    assert init.type == "init", init
    return stream


# ----- privileges -----------------------------------------------------------------------------

REQUIRE_ROOT = "EXECD_TEST_REQUIRE_ROOT"  # .ci/run sets it: a skip for want of root is then a failure


def require_root(what: str) -> None:
    """Skip, saying so plainly, where the suite does not run as root; fail in CI, which does."""
    if os.geteuid() == 0:
        return
    if os.environ.get(REQUIRE_ROOT):
        pytest.fail(f"{what} needs root, and {REQUIRE_ROOT} says this run has it")
    pytest.skip(f"{what} needs root: run the suite as root (CI does)")


def require_cgroups() -> None:
    """A writable cgroup v2 tree with cgroup.kill (these machines have one, as root)."""
    require_root("a cgroup per session")
    probe = SessionCgroups.create()
    if probe is None:
        message = "no writable cgroup v2 tree with cgroup.kill here"
        if os.environ.get(REQUIRE_ROOT):
            pytest.fail(message)
        pytest.skip(message)
    probe.remove_all()


# ----- processes ------------------------------------------------------------------------------


def is_live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_processes(session_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries this session's tag (shell, jobs, escapees)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid != os.getpid() and tag_of(proc.pid) == session_id and is_live(proc.pid):
            found.append(proc)
    return found


def cmdlines(procs: list[psutil.Process]) -> list[str]:
    out = []
    for proc in procs:
        try:
            out.append(" ".join(proc.cmdline()))
        except psutil.Error:
            pass
    return out


def session_commands(session_id: str) -> list[str]:
    return cmdlines(session_processes(session_id))


def run_children(shell_pid: int, name: str) -> list[psutil.Process]:
    """Live descendants of the shell named `name` (e.g. the `sleep` a run started)."""
    try:
        children = psutil.Process(shell_pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for child in children:
        try:
            if child.name() == name and child.status() != psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            pass
    return out


def reap_zombie_children() -> None:
    """Reap zombies re-parented to the test process (it may be a subreaper after an in-process daemon)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError):
            pass


def kill_tagged(session_ids: set[str]) -> list[str]:
    """Last-resort teardown sweep: SIGKILL whatever still carries these tags; say what it found."""
    left = []
    for proc in psutil.process_iter():
        if proc.pid != os.getpid() and tag_of(proc.pid) in session_ids and is_live(proc.pid):
            left.extend(cmdlines([proc]))
            try:
                proc.kill()
            except psutil.Error:
                pass
    return left


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


# ----- a daemon as a real subprocess ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(
    *args: str, env: dict[str, str] | None = None, output: Any = subprocess.DEVNULL, prefix: Sequence[str] = ()
) -> Iterator[ServedDaemon]:
    """`python -m execd serve` on a free loopback port, from a blocking test, once /healthz answers;
    SIGTERM at the end, after which it must exit 0. `env` adds to the environment minus EXECD_*;
    `prefix` runs the daemon under another command (`unshare …`)."""
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "execd", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO,
        env={**base, **(env or {})},
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=bool(prefix),  # the signal goes to the group: the prefix may not pass it on
    )
    try:
        deadline = time.monotonic() + 15
        while not healthy(port):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not come up"
            time.sleep(0.05)
        yield ServedDaemon(proc, port)
    finally:
        _stop(proc, signal.SIGTERM, group=bool(prefix))
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGKILL, group=bool(prefix))  # never left running past the test
            proc.wait()
            raise
    assert proc.returncode == 0


def _stop(proc: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


@dataclasses.dataclass(frozen=True)
class ServedDaemon:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def healthy(port: int, timeout: float = 1.0) -> bool:
    """Whether GET /healthz answers 200 on this port now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False


class DaemonProcess:
    """`python -m execd serve` on a free port, with an aiohttp client session pointed at it."""

    def __init__(self, env: dict[str, str], new_session: bool = False) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="execd-control-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
        full_env.update({"EXECD_LOG_FORMAT": "json", "EXECD_INTERRUPT_GRACE_MS": "500", **env})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "execd", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        self.http: aiohttp.ClientSession | None = None
        self.session_ids: set[str] = set()
        self.watchdog: psutil.Process | None = None  # the daemon's, which outlives a killed daemon

    async def started(self, timeout: float = 15.0) -> DaemonProcess:
        self.http = aiohttp.ClientSession(self.base)
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the daemon exited at start: {self.log_text()}"
            try:
                async with self.http.get("/healthz") as response:
                    if response.status == 200:
                        self.watchdog = _watchdog_of(self.proc.pid)
                        return self
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the daemon did not answer within {timeout}s: {self.log_text()}")
            await asyncio.sleep(0.05)

    def log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    async def create(self, **body: Any) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.post("/session", json=body) as response:
            assert response.status == 200, await response.text()
            session: dict[str, Any] = await response.json()
        self.session_ids.add(session["session_id"])
        return session

    async def run(self, session_id: str, code: str, **body: Any) -> EventStream:
        assert self.http is not None
        stream = await open_run(self.http, session_id, code, **body)
        await stream.until_terminal()
        return stream

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int | None:
        """The daemon's exit status, or None if it is still running after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)
        return self.proc.returncode

    async def stop(self) -> list[str]:
        """Teardown: kill the daemon if it still runs, sweep its sessions, reap; return leftovers."""
        if self.http is not None:
            await self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        # Give the watchdog its chance first; whatever it missed is a finding, then killed.
        deadline = time.monotonic() + 5
        while session_ids_alive(self.session_ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = kill_tagged(self.session_ids)
        # Generous: on a loaded machine the watchdog's sweep and exit can take seconds.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reap_zombie_children()
            # The killed daemon's watchdog re-parents to us (a subreaper since the first in-process
            # daemon) and exits after its sweep: wait for it too, or its zombie outlives the test.
            settled = _gone(self.watchdog) and not any(is_zombie(c) for c in psutil.Process().children())
            if settled and not session_ids_alive(self.session_ids):
                break
            await asyncio.sleep(0.02)
        self.log.close()
        os.unlink(self.log.name)
        return left


def _watchdog_of(daemon_pid: int) -> psutil.Process | None:
    try:
        children = psutil.Process(daemon_pid).children()
    except psutil.Error:
        return None
    for child in children:
        with contextlib.suppress(psutil.Error):
            if "execd.watchdog" in " ".join(child.cmdline()):
                return child
    return None


def _gone(proc: psutil.Process | None) -> bool:
    """Exited and reaped (by us, when it re-parented to us, or by whoever is its parent)."""
    if proc is None:
        return True
    try:
        if proc.status() != psutil.STATUS_ZOMBIE:
            return False
    except psutil.NoSuchProcess:
        return True
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)
    return not proc.is_running()


def session_ids_alive(session_ids: set[str]) -> list[int]:
    return [
        p.pid for p in psutil.process_iter() if p.pid != os.getpid() and tag_of(p.pid) in session_ids and is_live(p.pid)
    ]


async def subprocess_daemons() -> AsyncIterator[Callable[..., Any]]:
    """Body of the `daemon_process` fixture (test_control_daemon.py): start `execd serve`
    subprocesses; teardown kills them and proves nothing of theirs is left.

    Never use together with the in-process `daemon` fixture in one test: that daemon reaps zombie
    children of the test process, and would take the subprocess's exit status.
    """
    daemons: list[DaemonProcess] = []

    async def start(new_session: bool = False, **env: str) -> DaemonProcess:
        daemon = DaemonProcess({k: str(v) for k, v in env.items()}, new_session)
        daemons.append(daemon)
        return await daemon.started()

    yield start
    leftovers: list[str] = []
    ids: set[str] = set()
    for daemon in daemons:
        leftovers.extend(await daemon.stop())
        ids |= daemon.session_ids
    assert_no_processes(ids)
    assert not leftovers, f"processes of the subprocess daemon's sessions outlived it: {leftovers}"
