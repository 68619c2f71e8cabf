#!/usr/bin/env python3
"""Benchmark execd against floors measured in the same run, and optionally against SWE-ReX.

Run it as `.venv/bin/python scripts/bench.py` (about a minute), `--quick` (a small version, well
under 30 s, that the test suite runs so this script never rots), `--json PATH` (every figure,
machine-readable) and `--peer swerex` (SWE-ReX installed into a throwaway venv and measured on the
rows that apply). It starts the daemon as a user would (`python -m execd serve`) on a free loopback
port, drives it with a minimal keep-alive HTTP/1.1 client on raw asyncio streams, and prints:

    | figure | value | floor measured beside it | target | ratio | status |

Each floor is measured in the same run, on the same machine, so a busy machine moves both. A row is
OK when it meets its target and SHORT when it does not; the exit status does not depend on timings
(0 = every figure measured and nothing left behind; `--strict` also fails on a SHORT row; 5 = a row
was not measured because the daemon lacks a route it needs, as an older daemon does).

`--daemon-root PATH` runs the daemon from another checkout (PYTHONPATH=PATH, this same venv, this
same client and floors): `scripts/bench-pairs` uses it to measure an old and a new daemon turn
about, as a change on a run's byte path must be measured.

The rows of runs as resources (v2) run on a daemon of their own: RSS growth while 100 background
runs print with nobody reading (bounded by their event-log windows), the drain rate of a background
run with no reader, and reattaching after a cut (`Last-Event-ID`) until the first missed event.

Everything the bench starts carries `EXECD_BENCH_TOKEN=<random>` in its environment and every
session shell carries `EXECD_SESSION_ID`: when the bench ends it checks that none of them is left
(exit status 4 otherwise, after killing them).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import math
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TOKEN_VAR = "EXECD_BENCH_TOKEN"
SESSION_TAG = "EXECD_SESSION_ID"
READ_LIMIT = 1024 * 1024  # client stream buffer: big enough for throughput, still bounded
PIPE_SIZE = 1024 * 1024  # what the daemon asks for its own pipes
F_SETPIPE_SZ = 1031
KB = 1000
MB = 1000 * 1000  # decimal units throughout: the stricter reading of every target
RUN_LOG_BYTES = 1024 * 1024  # the daemon's default EXECD_RUN_LOG_BYTES (a run's event log window)

T = TypeVar("T")


class BenchError(Exception):
    """A figure could not be measured (the daemon answered wrongly, a peer failed, ...)."""


class RouteMissing(BenchError):
    """The daemon lacks a route or field a row needs (an older daemon, `--daemon-root`): the row is
    reported as not measured, and the others go on. `str()` is short (for the table); `detail` adds
    the daemon's message."""

    def __init__(self, short: str, detail: str) -> None:
        super().__init__(short)
        self.detail = detail


# ----- sizes ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How much of everything to do; `--quick` is the same bench, smaller."""

    warmup: int
    run_true_n: int
    bin_true_n: int
    floor_true_n: int
    output_bytes: int
    output_repeats: int
    create_n: int
    interrupt_n: int
    concurrent_sessions: int
    concurrent_runs: int
    idle_sessions: int
    idle_p99_n: int
    stall_bytes: int
    stall_s: float
    delete_budget_s: float
    peer_true_n: int
    peer_bin_true_n: int
    peer_output_bytes: int
    peer_create_n: int
    peer_concurrent_runs: int
    delete_n: int
    reattach_n: int
    drain_bytes: int
    drain_repeats: int
    background_runs: int
    background_bytes: int


FULL = Plan(
    warmup=100,
    run_true_n=2000,
    bin_true_n=1000,
    floor_true_n=1000,
    output_bytes=50 * MB,
    output_repeats=3,
    create_n=50,
    interrupt_n=100,
    concurrent_sessions=20,
    concurrent_runs=50,
    idle_sessions=1000,
    idle_p99_n=1000,
    stall_bytes=1000 * MB,
    stall_s=3.0,
    delete_budget_s=30.0,
    peer_true_n=30,
    peer_bin_true_n=20,
    peer_output_bytes=5 * MB,
    peer_create_n=8,
    peer_concurrent_runs=10,
    delete_n=100,
    reattach_n=200,
    drain_bytes=200 * MB,
    drain_repeats=3,
    background_runs=100,
    background_bytes=50 * MB,
)
QUICK = Plan(
    warmup=20,
    run_true_n=200,
    bin_true_n=100,
    floor_true_n=100,
    output_bytes=5 * MB,
    output_repeats=1,
    create_n=10,
    interrupt_n=10,
    concurrent_sessions=20,
    concurrent_runs=10,
    idle_sessions=50,
    idle_p99_n=100,
    stall_bytes=64 * MB,
    stall_s=1.0,
    delete_budget_s=15.0,
    peer_true_n=5,
    peer_bin_true_n=3,
    peer_output_bytes=5 * MB,
    peer_create_n=2,
    peer_concurrent_runs=3,
    delete_n=20,
    reattach_n=30,
    drain_bytes=20 * MB,
    drain_repeats=1,
    background_runs=100,
    background_bytes=2 * MB,
)


# ----- figures -------------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    label: str
    value: float
    unit: str
    n: int
    floor: float | None = None
    floor_unit: str | None = None
    floor_label: str | None = None
    target: str | None = None  # human text, e.g. "<= 2.5 x floor"
    target_value: float | None = None  # the threshold the value is compared with
    op: str | None = None  # "<=" or ">="
    ratio: float | None = None
    ratio_of: str | None = None  # "floor" or "target"
    ok: bool | None = None
    note: str | None = None


def figure(
    name: str,
    label: str,
    value: float,
    unit: str,
    n: int,
    *,
    floor: float | None = None,
    floor_unit: str | None = None,
    floor_label: str | None = None,
    op: str | None = None,
    factor: float | None = None,
    plus: float | None = None,
    absolute: float | None = None,
    note: str | None = None,
) -> Figure:
    """A figure with its target: `factor` x floor, floor + `plus`, or an `absolute` threshold."""
    fig = Figure(name, label, value, unit, n, floor, floor_unit or (unit if floor is not None else None), floor_label)
    fig.note = note
    if op is not None:
        fig.op = op
        if factor is not None and floor is not None:
            fig.target, fig.target_value = f"{op} {factor:g} x floor", factor * floor
        elif plus is not None and floor is not None:
            fig.target, fig.target_value = f"{op} floor + {plus:g} {unit}", floor + plus
        elif absolute is not None:
            fig.target, fig.target_value = f"{op} {absolute:g} {unit}", absolute
        if fig.target_value is not None:
            fig.ok = value <= fig.target_value if op == "<=" else value >= fig.target_value
    if floor and fig.floor_unit == unit:
        fig.ratio, fig.ratio_of = value / floor, "floor"
    elif fig.target_value:
        fig.ratio, fig.ratio_of = value / fig.target_value, "target"
    return fig


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000.0 for s in seconds]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- a minimal HTTP/1.1 client -------------------------------------------------------------------


class Http:
    """One keep-alive HTTP/1.1 connection on asyncio streams: as little client overhead as possible."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self.reader = reader
        self.writer = writer
        self.host_header = f"{HOST}:{port}".encode()

    @classmethod
    async def open(cls, port: int) -> Http:
        reader, writer = await asyncio.open_connection(HOST, port, limit=READ_LIMIT)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer, port)

    async def close(self) -> None:
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()

    def send(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> None:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method.encode(), path.encode(), self.host_header)
        for key, value in (headers or {}).items():
            head += b"%s: %s\r\n" % (key.encode(), value.encode())
        if body:
            head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            self.writer.write(head + body)
        else:
            self.writer.write(head + b"Content-Length: 0\r\n\r\n")

    async def head(self) -> tuple[int, dict[bytes, bytes]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(b":")
                headers[key.strip().lower()] = value.strip()
        return status, headers

    async def chunks(self, headers: dict[bytes, bytes]) -> AsyncGenerator[bytes, None]:
        """The body's pieces: chunked transfer coding or Content-Length (the only two aiohttp uses)."""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers from aiohttp
                    return
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        else:
            length = int(headers.get(b"content-length", b"0"))
            if length:
                yield await self.reader.readexactly(length)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        self.send(method, path, body)
        status, headers = await self.head()
        parts = [chunk async for chunk in self.chunks(headers)]
        return status, b"".join(parts)

    async def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, data = await self.request(method, path, None if body is None else json.dumps(body).encode())
        if status != expect:
            raise BenchError(f"{method} {path} -> {status} (expected {expect}): {data[:300]!r}")
        return json.loads(data)

    async def run(self, session_id: str, body: bytes) -> bytes:
        """One run; the whole SSE body, checked to end with execution_complete."""
        status, data = await self.request("POST", f"/session/{session_id}/run", body)
        if status != 200 or b"\nevent: execution_complete\n" not in data[-600:]:
            raise BenchError(f"run in {session_id} -> {status}: {data[-400:]!r}")
        return data


def run_body(code: str) -> bytes:
    return json.dumps({"code": code}).encode()


TRUE = run_body("true")
BIN_TRUE = run_body("/bin/true")
ECHO_HI = run_body("echo hi")


def output_code(n_bytes: int) -> str:
    return f"head -c {n_bytes} /dev/zero | tr '\\0' a"


# ----- the daemon ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def ping_once(port: int) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{HOST}:{port}/ping", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def daemon_env(env: dict[str, str], root: Path) -> dict[str, str]:
    """The environment that makes `python -m execd` run the code of the checkout at `root` with this
    same interpreter and venv: `root` first on PYTHONPATH (the venv's editable install of this
    checkout is found after every sys.path entry, so it does not shadow it)."""
    if root == ROOT:
        return env
    path = env.get("PYTHONPATH")
    return {**env, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else str(root)}


def daemon_source(env: dict[str, str], root: Path) -> dict[str, str]:
    """Which package `python -m execd` imports with that environment (checked, not assumed), and the
    checkout's commit."""
    probe = [sys.executable, "-c", "import execd; print(execd.__file__)"]
    done = subprocess.run(probe, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise BenchError(f"daemon root {root}: `import execd` failed: {done.stderr.strip()[-600:]}")
    package = Path(done.stdout.strip()).resolve().parent
    if not package.is_relative_to(root.resolve()):
        raise BenchError(f"daemon root {root}: python -m execd would run {package}, not that checkout's code")
    rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    return {"root": str(root), "package": str(package), "commit": rev.stdout.strip() if rev.returncode == 0 else "?"}


class Daemon:
    """`python -m execd serve` on a free loopback port, logging JSON to a file; the code of the
    checkout at `root` (see `daemon_env`)."""

    def __init__(self, name: str, workdir: Path, env: dict[str, str], root: Path = ROOT) -> None:
        self.name = name
        self.root = root
        self.log_path = workdir / f"daemon-{name}.log"
        self.env = env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.session_ids: set[str] = set()  # every session it created for us
        self.live: set[str] = set()  # those not deleted yet
        self.problems: list[str] = []
        self.finished = False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        for _ in range(3):
            self.port = free_port()
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "execd", "serve", "--host", HOST, "--port", str(self.port)],
                    cwd=self.root,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.proc.poll() is None:
                if ping_once(self.port):
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.stop()
                raise BenchError(f"daemon {self.name} did not answer /ping within 20 s; log: {self.log_tail()}")
            # Exited at once: most likely the port was taken between our probe and its bind. Try another.
        raise BenchError(f"daemon {self.name} would not start; log: {self.log_tail()}")

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, wait; SIGKILL only if it hangs (and say so). Then check its children are gone."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        dirs = self.session_dirs()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.problems.append(f"daemon {self.name} still running 20 s after SIGTERM: killed")
            proc.kill()
            proc.wait(timeout=10)
        if proc.returncode != 0:
            self.problems.append(f"daemon {self.name} exited with status {proc.returncode} after SIGTERM")
        deadline = time.monotonic() + 5
        left = children
        while left and time.monotonic() < deadline:
            left = [c for c in left if _alive(c)]
            time.sleep(0.02)
        for child in left:
            self.problems.append(f"daemon {self.name} left its child {child.pid} ({_describe(child)}) running: killed")
            with suppress(psutil.Error):
                child.kill()
        stale = [d for d in dirs if d.exists()]
        if stale:
            self.problems.append(f"daemon {self.name} left {len(stale)} session temp dirs (e.g. {stale[0]}): removed")
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)

    def session_dirs(self) -> set[Path]:
        """The private temp dirs of the daemon's sessions (each holds a file the daemon keeps open)."""
        try:
            files = psutil.Process(self.pid).open_files()
        except psutil.Error:
            return set()
        tmp = Path(tempfile.gettempdir())
        dirs = {Path(f.path).parent for f in files}
        return {d for d in dirs if d.parent == tmp and d.name.startswith("execd-") and d != self.log_path.parent}


def _alive(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())[:120]
    except psutil.Error:
        return "?"


async def create_session(conn: Http, daemon: Daemon) -> dict[str, Any]:
    session: dict[str, Any] = await conn.json("POST", "/session")
    daemon.session_ids.add(session["session_id"])
    daemon.live.add(session["session_id"])
    return session


async def delete_session(conn: Http, daemon: Daemon, session_id: str) -> None:
    await conn.json("DELETE", f"/session/{session_id}")
    daemon.live.discard(session_id)


async def delete_all(daemon: Daemon, parallel: int = 8, budget_s: float = 120.0) -> list[float]:
    """Delete what is left over a few connections, for at most `budget_s` (the daemon's shutdown
    closes whatever is left after that); returns each DELETE's latency."""
    ids = sorted(daemon.live)
    if not ids:
        return []
    conns = [await Http.open(daemon.port) for _ in range(min(parallel, len(ids)))]
    deadline = time.monotonic() + budget_s
    samples: list[float] = []

    async def worker(conn: Http, mine: list[str]) -> None:
        for session_id in mine:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            await delete_session(conn, daemon, session_id)
            samples.append(time.perf_counter() - start)

    try:
        await asyncio.gather(*(worker(c, ids[i :: len(conns)]) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    return samples


# ----- floors: bash and pipes driven from Python, no HTTP ------------------------------------------


class PipeBash:
    """A bash over pipes with a private completion FIFO, as the daemon drives one, minus everything else."""

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="execd-bench-floor-")
        fifo = os.path.join(self.dir, "status")
        os.mkfifo(fifo, 0o600)
        self.status = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
        stdin_r, self.stdin = os.pipe2(os.O_CLOEXEC)
        self.stdout, stdout_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.stderr, stderr_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.pid = os.posix_spawn(
                shutil.which("bash") or "/bin/bash",
                ["bash", "--noprofile", "--norc"],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                    (os.POSIX_SPAWN_DUP2, stderr_w, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGINT, signal.SIGTERM),
            )
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        self.suffix = f"; builtin printf '%s\\0' $? >|{fifo}\n".encode()

    def round_trip(self, code: bytes) -> int:
        os.write(self.stdin, code + self.suffix)
        record = b""
        while not record.endswith(b"\0"):
            ready, _, _ = select.select([self.status], [], [], 10)
            if not ready:
                raise BenchError("floor bash did not answer within 10 s")
            record += os.read(self.status, 64)
        return int(record[:-1])

    def kill(self) -> None:
        """End it as a DELETE must: SIGKILL to its process group, reap it, close its fds, remove its dir."""
        os.killpg(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        for fd in (self.stdin, self.status, self.stdout, self.stderr):
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def close(self) -> None:
        os.close(self.stdin)  # EOF: bash exits
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            status = 0
        for fd in (self.status, self.stdout, self.stderr):
            os.close(fd)
        shutil.rmtree(self.dir, ignore_errors=True)
        if status:
            raise BenchError(f"floor bash exited with status {status}")


def spawn_round_trip(env: dict[str, str]) -> float:
    """Seconds from nothing (FIFO, pipes, spawn) until a first `true` has come back; bash torn down after."""
    start = time.perf_counter()
    shell = PipeBash(env)
    try:
        shell.round_trip(b"true")
        return time.perf_counter() - start
    finally:
        shell.close()


def floor_pipe_drain(env: dict[str, str], n_bytes: int) -> float:
    """MB/s of Python reading the command's stdout pipe directly, from spawn to EOF."""
    start = time.perf_counter()
    proc = subprocess.Popen(["bash", "-c", output_code(n_bytes)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    with suppress(OSError):
        fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    total = 0
    for _ in range(n_bytes // 4096 + 1000):  # bounded: a read returns at least a page or EOF
        data = os.read(fd, 256 * 1024)
        if not data:
            break
        total += len(data)
    proc.stdout.close()
    proc.wait(timeout=30)
    elapsed = time.perf_counter() - start
    if total != n_bytes:
        raise BenchError(f"pipe floor read {total} bytes, expected {n_bytes}")
    return n_bytes / MB / elapsed


# ----- execd measurements --------------------------------------------------------------------------


async def run_latency(conn: Http, session_id: str, body: bytes, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await conn.run(session_id, body)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await conn.run(session_id, body)
        samples.append(time.perf_counter() - start)
    return samples


async def stream_throughput(conn: Http, session_id: str, n_bytes: int) -> tuple[float, int]:
    """MB/s of payload with the client draining the raw SSE stream (bytes counted, nothing parsed)."""
    start = time.perf_counter()
    conn.send("POST", f"/session/{session_id}/run", run_body(output_code(n_bytes)))
    status, headers = await conn.head()
    raw = 0
    last = b""
    async for chunk in conn.chunks(headers):
        raw += len(chunk)
        last = chunk
    elapsed = time.perf_counter() - start
    if status != 200 or b"\nevent: execution_complete\n" not in last:
        raise BenchError(f"output run -> {status}, last chunk {last[-300:]!r}")
    if raw < n_bytes or b'"output_truncated":false' not in last:
        raise BenchError(f"output run sent {raw} raw bytes for {n_bytes} of output: {last[-300:]!r}")
    return n_bytes / MB / elapsed, raw


async def create_and_run(conn: Http, daemon: Daemon) -> float:
    """Seconds from POST /session until a first `true` has completed; the session is deleted after."""
    start = time.perf_counter()
    session = await create_session(conn, daemon)
    await conn.run(session["session_id"], TRUE)
    elapsed = time.perf_counter() - start
    await delete_session(conn, daemon, session["session_id"])
    return elapsed


async def wait_for_child(shell_pid: int, name: str, timeout: float = 5.0) -> None:
    """Until the shell has started `name` (bounded): then the run is really running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(psutil.Error):
            if any(child.name() == name for child in psutil.Process(shell_pid).children()):
                return
        await asyncio.sleep(0.001)
    raise BenchError(f"the shell {shell_pid} did not start {name} within {timeout} s")


async def read_until_terminal(conn: Http, headers: dict[bytes, bytes]) -> tuple[float, bytes]:
    """When the terminal event arrived, and its chunk; then the rest of the stream."""
    when, terminal = 0.0, b""
    async for chunk in conn.chunks(headers):
        if not terminal and (b"\nevent: execution_complete\n" in chunk or b"\nevent: error\n" in chunk):
            when, terminal = time.perf_counter(), chunk
    return when, terminal


async def interrupt_latencies(daemon: Daemon, n: int) -> list[float]:
    stream, control = await Http.open(daemon.port), await Http.open(daemon.port)
    samples = []
    try:
        session = await create_session(control, daemon)
        session_id, shell_pid = session["session_id"], session["pid"]
        await stream.run(session_id, TRUE)
        for _ in range(n):
            stream.send("POST", f"/session/{session_id}/run", run_body("sleep 100"))
            status, headers = await stream.head()
            if status != 200:
                raise BenchError(f"run sleep 100 -> {status}")
            reader = asyncio.ensure_future(read_until_terminal(stream, headers))
            await wait_for_child(shell_pid, "sleep")
            start = time.perf_counter()
            status, body = await control.request("POST", f"/session/{session_id}/interrupt")
            if status != 202:
                reader.cancel()
                raise BenchError(f"interrupt -> {status}: {body!r}")
            when, terminal = await asyncio.wait_for(reader, 30)
            if b"\nevent: execution_complete\n" not in terminal or b'"interrupted":true' not in terminal:
                raise BenchError(f"interrupted run ended with {terminal[-300:]!r}")
            samples.append(when - start)
        await delete_session(control, daemon, session_id)
    finally:
        await stream.close()
        await control.close()
    return samples


async def concurrent_rate(daemon: Daemon, sessions: int, runs: int) -> float:
    conns = [await Http.open(daemon.port) for _ in range(sessions)]
    try:
        ids = [(await create_session(conn, daemon))["session_id"] for conn in conns]
        for conn, session_id in zip(conns, ids, strict=True):
            await conn.run(session_id, ECHO_HI)

        async def worker(conn: Http, session_id: str) -> None:
            for _ in range(runs):
                data = await conn.run(session_id, ECHO_HI)
                if b'"text":"hi\\n"' not in data:
                    raise BenchError(f"echo hi gave {data[-400:]!r}")

        start = time.perf_counter()
        await asyncio.gather(*(worker(c, s) for c, s in zip(conns, ids, strict=True)))
        elapsed = time.perf_counter() - start
        for conn, session_id in zip(conns, ids, strict=True):
            await delete_session(conn, daemon, session_id)
    finally:
        for conn in conns:
            await conn.close()
    return sessions * runs / elapsed


async def stalled_stream_growth(daemon: Daemon, n_bytes: int, stall_s: float) -> tuple[int, int, int]:
    """Daemon RSS growth while the client has stopped reading a big stream: (baseline, peak, bytes read)."""
    stream, control = await Http.open(daemon.port), await Http.open(daemon.port)
    try:
        session_id = (await create_session(control, daemon))["session_id"]
        await stream.run(session_id, TRUE)
        await asyncio.sleep(0.2)
        baseline = peak = daemon.rss()
        stream.send("POST", f"/session/{session_id}/run", run_body(output_code(n_bytes)))
        status, headers = await stream.head()
        if status != 200:
            raise BenchError(f"stall run -> {status}")
        chunks = stream.chunks(headers)
        read = 0
        async for chunk in chunks:  # read a little ...
            read += len(chunk)
            if read >= MB:
                break
        deadline = time.monotonic() + stall_s  # ... then stop reading
        while time.monotonic() < deadline:
            peak = max(peak, daemon.rss())
            await asyncio.sleep(0.05)
        status, body = await control.request("POST", f"/session/{session_id}/interrupt")
        if status != 202:
            raise BenchError(f"interrupt of the stalled run -> {status}: {body!r} (did it finish already?)")
        terminal = b""

        async def drain() -> None:
            nonlocal read, terminal
            async for chunk in chunks:
                read += len(chunk)
                terminal = chunk

        await asyncio.wait_for(drain(), 60)
        peak = max(peak, daemon.rss())
        if b"\nevent: execution_complete\n" not in terminal:
            raise BenchError(f"stalled run ended with {terminal[-300:]!r}")
        await delete_session(control, daemon, session_id)
        return baseline, peak, read
    finally:
        await stream.close()
        await control.close()


async def idle_sessions(daemon: Daemon, plan: Plan) -> dict[str, float]:
    """RSS per idle session and `true` p99 among them, against 0 sessions and 1 session."""
    conn = await Http.open(daemon.port)
    try:
        first = (await create_session(conn, daemon))["session_id"]
        p99_one = p99(ms(await run_latency(conn, first, TRUE, plan.idle_p99_n, plan.warmup)))
        await delete_session(conn, daemon, first)
        await asyncio.sleep(0.3)
        rss_zero = daemon.rss()
        log(f"creating {plan.idle_sessions} idle sessions")
        parallel = 8
        conns = [await Http.open(daemon.port) for _ in range(parallel)]
        ids: list[str] = []

        async def creator(c: Http, count: int) -> None:
            for _ in range(count):
                ids.append((await create_session(c, daemon))["session_id"])

        start = time.perf_counter()
        shares = [plan.idle_sessions // parallel + (i < plan.idle_sessions % parallel) for i in range(parallel)]
        await asyncio.gather(*(creator(c, k) for c, k in zip(conns, shares, strict=True)))
        create_s = time.perf_counter() - start
        await asyncio.sleep(0.3)
        rss_many = daemon.rss()
        p99_many = p99(ms(await run_latency(conn, ids[0], TRUE, plan.idle_p99_n, plan.warmup)))
        log(f"deleting {len(ids)} sessions (for at most {plan.delete_budget_s:g} s; shutdown closes the rest)")
        start = time.perf_counter()
        for c in conns:
            await c.close()
        deletes = await delete_all(daemon, budget_s=plan.delete_budget_s)
        delete_s = time.perf_counter() - start
        return {
            "p99_one": p99_one,
            "p99_many": p99_many,
            "rss_zero": rss_zero,
            "rss_many": rss_many,
            "create_s": create_s,
            "delete_s": delete_s,
            "deleted": len(deletes),
            "delete_p50_ms": p50(ms(deletes)) if deletes else math.nan,
        }
    finally:
        await conn.close()


# ----- DELETE and runs as resources (v2) -----------------------------------------------------------


async def delete_once(conn: Http, daemon: Daemon) -> float:
    """Seconds a DELETE of an idle session takes (the session created and run once beforehand)."""
    session_id = (await create_session(conn, daemon))["session_id"]
    await conn.run(session_id, TRUE)
    start = time.perf_counter()
    await delete_session(conn, daemon, session_id)
    return time.perf_counter() - start


def kill_floor(env: dict[str, str]) -> float:
    """Seconds to end a bash over pipes as a DELETE must (its floor): SIGKILL to its process group,
    reap it, close its fds, remove its FIFO's dir; spawned and run once beforehand, untimed."""
    shell = PipeBash(env)
    shell.round_trip(b"true")
    start = time.perf_counter()
    shell.kill()
    return time.perf_counter() - start


def route_missing(status: int, data: bytes) -> tuple[str, str] | None:
    """Whether an answer says the daemon lacks a route or field a v2 row needs (so the row is not
    measured): a 404/405 that names no session or run, or a 400 refusing a v2 field; then its status
    and code, and its message."""
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    code = body.get("code") if isinstance(body, dict) else None
    message = str(body.get("message")) if isinstance(body, dict) else data[:200].decode(errors="replace")
    if (status in (404, 405) and code not in ("SESSION_NOT_FOUND", "RUN_NOT_FOUND")) or (
        status == 400 and "background" in message
    ):
        return f"{status} {code}", message
    return None


def check_answer(what: str, status: int, data: bytes, expect: int) -> None:
    if status == expect:
        return
    missing = route_missing(status, data)
    if missing is not None:
        short = f"route missing ({what} -> {missing[0]})"
        raise RouteMissing(short, f"{short}: {missing[1]}")
    raise BenchError(f"{what} -> {status} (expected {expect}): {data[:300]!r}")


async def start_background(conn: Http, session_id: str, code: str) -> dict[str, Any]:
    """POST a background run; its run object (202)."""
    status, data = await conn.request(
        "POST", f"/session/{session_id}/run", json.dumps({"code": code, "background": True}).encode()
    )
    check_answer("POST /session/{id}/run with background", status, data, 202)
    run: dict[str, Any] = json.loads(data)
    return run


async def run_object(conn: Http, session_id: str, run_id: str) -> dict[str, Any]:
    status, data = await conn.request("GET", f"/session/{session_id}/runs/{run_id}")
    check_answer("GET /session/{id}/runs/{run_id}", status, data, 200)
    run: dict[str, Any] = json.loads(data)
    return run


@dataclass
class Event:
    seq: int | None  # None for a `gap`, which has no id
    type: str
    data: bytes


class Sse:
    """The events of one SSE response, parsed just enough (`id:`, `event:`, `data:`); comments skipped."""

    def __init__(self, conn: Http, headers: dict[bytes, bytes]) -> None:
        self.conn = conn
        self.chunks = conn.chunks(headers)
        self.buffer = b""

    async def next(self) -> Event | None:
        while True:
            end = self.buffer.find(b"\n\n")
            if end >= 0:
                frame, self.buffer = self.buffer[:end], self.buffer[end + 2 :]
                seq, kind, data = None, "message", b""
                for line in frame.split(b"\n"):
                    key, _, value = line.partition(b":")
                    value = value.removeprefix(b" ")
                    if key == b"id":
                        seq = int(value)
                    elif key == b"event":
                        kind = value.decode()
                    elif key == b"data":
                        data = value
                if kind != "message" or data:
                    return Event(seq, kind, data)
                continue  # a comment (`: ping`)
            chunk = await anext(self.chunks, None)
            if chunk is None:
                return None
            self.buffer += chunk

    async def cut(self) -> None:
        """Drop the connection at once (RST), as a network cut would, whatever is still unread."""
        await self.chunks.aclose()
        self.conn.writer.transport.abort()


async def open_events(port: int, session_id: str, run_id: str, after: int | None) -> Sse:
    conn = await Http.open(port)
    path = f"/session/{session_id}/runs/{run_id}/events"
    conn.send("GET", path, headers={"Last-Event-ID": str(after)} if after is not None else None)
    status, headers = await conn.head()
    if status != 200:
        data = b"".join([chunk async for chunk in conn.chunks(headers)])
        await conn.close()
        what = "GET /session/{id}/runs/{run_id}/events" + (" with Last-Event-ID" if after is not None else "")
        check_answer(what, status, data, 200)
    return Sse(conn, headers)


async def fresh_healthz(port: int) -> float:
    """Seconds for a fresh connection and a GET /healthz on it (the reattach row's floor)."""
    start = time.perf_counter()
    conn = await Http.open(port)
    status, data = await conn.request("GET", "/healthz")
    elapsed = time.perf_counter() - start
    await conn.close()
    if status != 200:
        raise BenchError(f"GET /healthz -> {status}: {data[:200]!r}")
    return elapsed


TICKER = "for i in $(seq 1 30000); do echo tick $i; sleep 0.02; done"  # a line every ~20 ms, 10 min at most


async def reattach_latencies(daemon: Daemon, n: int, warmup: int) -> tuple[list[float], list[float]]:
    """Seconds from cutting a reader of a background run to the first event it missed, read on a new
    connection that resumes with Last-Event-ID; turn about with a fresh connection's GET /healthz.
    Each cut comes once the run's log holds an event the reader has not read, so what is timed is
    the resume itself, not the wait for the command's next line."""
    control = await Http.open(daemon.port)
    sse: Sse | None = None
    values, floors = [], []
    try:
        session_id = (await create_session(control, daemon))["session_id"]
        await control.run(session_id, TRUE)
        run_id = (await start_background(control, session_id, TICKER))["run_id"]
        sse = await open_events(daemon.port, session_id, run_id, None)
        last = -1
        while True:  # init, then up to the first line of output
            event = await sse.next()
            if event is None or event.seq != last + 1:
                raise BenchError(f"events of {run_id} from the start: {event!r} after seq {last}")
            last = event.seq
            if event.type == "stdout":
                break
        for i in range(warmup + n):
            deadline = time.monotonic() + 10
            while (await run_object(control, session_id, run_id))["last_seq"] <= last:
                if time.monotonic() > deadline:
                    raise BenchError(f"run {run_id} logged nothing after seq {last} in 10 s")
                await asyncio.sleep(0.003)
            await sse.cut()
            start = time.perf_counter()
            sse = await open_events(daemon.port, session_id, run_id, last)
            event = await asyncio.wait_for(sse.next(), 10)
            elapsed = time.perf_counter() - start
            if event is None or event.seq != last + 1 or event.type != "stdout":
                raise BenchError(f"resumed after seq {last}, the first event was {event!r}")
            last = event.seq
            floor = await fresh_healthz(daemon.port)
            if i >= warmup:
                values.append(elapsed)
                floors.append(floor)
        await sse.cut()
        sse = None
        await delete_session(control, daemon, session_id)
    finally:
        if sse is not None:
            await sse.cut()
        await control.close()
    return values, floors


async def wait_finished(conn: Http, session_id: str, run_id: str, poll_s: float, timeout_s: float) -> dict[str, Any]:
    """The run object once it has left `running`, polled every `poll_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = await run_object(conn, session_id, run_id)
        if run["state"] != "running":
            return run
        if time.monotonic() > deadline:
            raise BenchError(f"run {run_id} still running after {timeout_s:g} s: {run}")
        await asyncio.sleep(poll_s)


async def background_drain(conn: Http, daemon: Daemon, n_bytes: int) -> tuple[float, dict[str, Any]]:
    """MB/s of a background run with no reader, from its 202 until its run object reads a terminal
    state (polled every 10 ms); and that run object."""
    session_id = (await create_session(conn, daemon))["session_id"]
    try:
        await conn.run(session_id, TRUE)
        run = await start_background(conn, session_id, output_code(n_bytes))
        start = time.perf_counter()
        run = await wait_finished(conn, session_id, run["run_id"], 0.01, 300)
        elapsed = time.perf_counter() - start
    finally:
        await delete_session(conn, daemon, session_id)
    if run["state"] != "completed" or run["exit_code"] != 0 or run["output_bytes"] != n_bytes:
        raise BenchError(f"background output run of {n_bytes} bytes ended as {run}")
    return n_bytes / MB / elapsed, run


async def background_rss(daemon: Daemon, count: int, n_bytes: int) -> dict[str, Any]:
    """Daemon RSS growth while `count` background runs (one per session) each print `n_bytes` with no
    reader attached: baseline with the sessions idle, peak sampled every 20 ms until every run object
    reads a terminal state, and after."""
    parallel = 8
    conns = [await Http.open(daemon.port) for _ in range(parallel)]
    ids: list[str] = []
    try:

        async def creator(conn: Http, k: int) -> None:
            for _ in range(k):
                session_id = (await create_session(conn, daemon))["session_id"]
                await conn.run(session_id, TRUE)
                ids.append(session_id)

        await asyncio.gather(*(creator(c, count // parallel + (i < count % parallel)) for i, c in enumerate(conns)))
        await asyncio.sleep(0.3)
        baseline = peak = daemon.rss()
        runs: dict[str, str] = {}
        done = False

        async def sampler() -> None:
            nonlocal peak
            while not done:
                peak = max(peak, daemon.rss())
                await asyncio.sleep(0.02)

        sampling = asyncio.ensure_future(sampler())
        try:
            start = time.perf_counter()

            async def starter(conn: Http, mine: list[str]) -> None:
                for session_id in mine:
                    runs[session_id] = (await start_background(conn, session_id, output_code(n_bytes)))["run_id"]

            await asyncio.gather(*(starter(c, ids[i::parallel]) for i, c in enumerate(conns)))
            deadline = time.monotonic() + 600
            while True:
                listing = await conns[0].json("GET", "/session")
                if not any(s["state"] == "running" for s in listing["sessions"] if s["session_id"] in runs):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{count} background runs of {n_bytes} bytes not done in 600 s")
                await asyncio.sleep(0.1)
            finished = [await wait_finished(conns[0], s, r, 0.01, 30) for s, r in runs.items()]
            elapsed = time.perf_counter() - start
        finally:
            done = True
            await sampling
        peak = max(peak, daemon.rss())
        after = daemon.rss()
        bad = [r for r in finished if r["state"] != "completed" or r["exit_code"] != 0 or r["output_bytes"] != n_bytes]
        if bad:
            raise BenchError(f"{len(bad)} of {count} background runs ended wrongly, e.g. {bad[0]}")
        return {
            "baseline": baseline,
            "peak": peak,
            "after": after,
            "elapsed_s": elapsed,
            "output_bytes": sum(r["output_bytes"] for r in finished),
            "dropped_bytes": sum(r["dropped_bytes"] for r in finished),
        }
    finally:
        for conn in conns:
            await conn.close()
        await delete_all(daemon, budget_s=60)


# ----- SWE-ReX -------------------------------------------------------------------------------------

PEER_DRIVER = r"""
import asyncio, json, sys, threading, time
from swerex.runtime.abstract import BashAction, CloseBashSessionRequest, CreateBashSessionRequest
from swerex.runtime.local import LocalRuntime

p = json.loads(sys.argv[1])

async def run(rt, session, command, timeout=120.0):
    obs = await rt.run_in_session(BashAction(command=command, session=session, timeout=timeout, check="silent"))
    if obs.exit_code != 0:
        raise SystemExit(f"swerex: {command[:60]!r} exited {obs.exit_code}: {obs.output[-200:]!r}")
    return obs

async def timed(rt, session, command, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await run(rt, session, command)
        out.append(time.perf_counter() - t)
    return out

async def main():
    rt = LocalRuntime()
    res = {}
    await rt.create_session(CreateBashSessionRequest(session="s", startup_timeout=30))
    await timed(rt, "s", "true", 2)
    res["run_true"] = await timed(rt, "s", "true", p["true_n"])
    res["run_bin_true"] = await timed(rt, "s", "/bin/true", p["bin_true_n"])
    t = time.perf_counter()
    obs = await run(rt, "s", p["output_code"], timeout=p["output_timeout"])
    res["output_s"] = time.perf_counter() - t
    res["output_chars"] = obs.output.count("a")
    await rt.close_session(CloseBashSessionRequest(session="s"))
    res["create"] = []
    for i in range(p["create_n"]):
        t = time.perf_counter()
        await rt.create_session(CreateBashSessionRequest(session=f"c{i}", startup_timeout=30))
        await run(rt, f"c{i}", "true")
        res["create"].append(time.perf_counter() - t)
        await rt.close_session(CloseBashSessionRequest(session=f"c{i}"))
    await rt.close()
    # Concurrency: LocalRuntime blocks its event loop (pexpect), so one thread and runtime per session.
    k, runs = p["sessions"], p["runs"]
    barrier, errors = threading.Barrier(k + 1), []
    def worker(i):
        async def go():
            rt = LocalRuntime()
            await rt.create_session(CreateBashSessionRequest(session="w", startup_timeout=30))
            await run(rt, "w", "echo hi")
            barrier.wait(60)
            for _ in range(runs):
                obs = await run(rt, "w", "echo hi")
                if "hi" not in obs.output:
                    errors.append(obs.output)
            await rt.close()
        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(repr(exc))
            barrier.abort()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(k)]
    for th in threads:
        th.start()
    barrier.wait(120)
    t = time.perf_counter()
    for th in threads:
        th.join(600)
    res["concurrent_s"] = time.perf_counter() - t
    if errors:
        raise SystemExit(f"swerex concurrency: {errors[:3]}")
    print(json.dumps(res))

asyncio.run(main())
"""


def install_swerex(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import swerex.runtime.local"]
    if python.exists() and subprocess.run(probe, capture_output=True, timeout=120).returncode == 0:
        log(f"SWE-ReX already installed in {venv}")
        return python
    log(f"installing swe-rex into {venv} (throwaway venv)")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "swe-rex"],
        probe,
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BenchError(f"--peer swerex: `{' '.join(step)}` took more than 600 s") from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
            raise BenchError(f"--peer swerex: could not install SWE-ReX (`{' '.join(step)}` failed):\n{tail}")
    return python


def measure_swerex(python: Path, plan: Plan, env: dict[str, str]) -> dict[str, Any]:
    params = {
        "true_n": plan.peer_true_n,
        "bin_true_n": plan.peer_bin_true_n,
        "output_code": output_code(plan.peer_output_bytes),
        "output_timeout": 300,
        "create_n": plan.peer_create_n,
        "sessions": plan.concurrent_sessions,
        "runs": plan.peer_concurrent_runs,
    }
    try:
        done = subprocess.run(
            [str(python), "-c", PEER_DRIVER, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
            cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired:
        raise BenchError("--peer swerex: the SWE-ReX driver took more than 900 s") from None
    if done.returncode != 0:
        raise BenchError(f"--peer swerex: the SWE-ReX driver failed: {done.stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# ----- leftovers -----------------------------------------------------------------------------------


def leftovers(token: str, session_ids: set[str]) -> list[psutil.Process]:
    """Every process that carries our token or one of our sessions' tags."""
    marks = {f"{TOKEN_VAR}={token}".encode()} | {f"{SESSION_TAG}={s}".encode() for s in session_ids}
    found = []
    own = os.getpid()
    for pid in psutil.pids():
        if pid == own:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if any(entry in marks for entry in environ.split(b"\0")):
            with suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
    return found


def check_nothing_left(token: str, session_ids: set[str]) -> list[str]:
    deadline = time.monotonic() + 5
    left = leftovers(token, session_ids)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = leftovers(token, session_ids)
    problems = []
    for proc in left:
        problems.append(f"left behind: pid {proc.pid} ({_describe(proc)}): killed")
        with suppress(psutil.Error):
            proc.kill()
    return problems


# ----- the bench -----------------------------------------------------------------------------------


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)
    peer: dict[str, Any] | None = None
    extra: dict[str, float] = field(default_factory=dict)
    not_measured: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> label, reason
    daemons: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> root, package, commit

    def add(self, fig: Figure) -> None:
        self.figures.append(fig)
        mark = "-" if fig.ok is None else ("OK" if fig.ok else "SHORT")
        log(f"{fig.name} = {fig.value:.4g} {fig.unit}  [{mark}]")

    def skip(self, rows: dict[str, str], missing: RouteMissing) -> None:
        """Rows (name -> label) the daemon could not be measured on: it lacks what they need."""
        for name, label in rows.items():
            self.not_measured[name] = {"label": label, "reason": str(missing), "detail": missing.detail}
        log(f"not measured: {', '.join(rows)}: {missing.detail}")


def in_loop(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def interleaved(
    measure: Callable[[], Awaitable[float]], floor: Callable[[], float], n: int, warmup: int
) -> tuple[list[float], list[float]]:
    """`n` samples of a figure and of its floor, taken turn about so both see the same machine load."""
    for _ in range(warmup):
        await measure()
        floor()
    values, floors = [], []
    for _ in range(n):
        values.append(await measure())
        floors.append(floor())
    return values, floors


async def turn_about(
    first: Callable[[], Awaitable[float]], second: Callable[[], Awaitable[float]], n: int, warmup: int
) -> tuple[list[float], list[float]]:
    """`n` timings of two async actions, taken turn about so both see the same machine load."""
    for _ in range(warmup):
        await first()
        await second()
    firsts, seconds = [], []
    for _ in range(n):
        firsts.append(await first())
        seconds.append(await second())
    return firsts, seconds


def timer(action: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    return timed


def atimer(action: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[float]]:
    async def timed() -> float:
        start = time.perf_counter()
        await action()
        return time.perf_counter() - start

    return timed


async def client_row(daemon: Daemon, conn: Http, session_id: str, plan: Plan, results: Results) -> None:
    """run `true` through execd.client (async, one session), turn about with the raw client."""
    from execd.client import AsyncClient  # the checkout's own client (it is not the daemon's code)

    log("run `true` through execd.client, turn about with the raw client")
    async with AsyncClient(f"http://{HOST}:{daemon.port}") as client:
        session = client.session(session_id)
        by_client, raw = await turn_about(
            atimer(lambda: session.run("true")),
            atimer(lambda: conn.run(session_id, TRUE)),
            max(plan.run_true_n // 2, 1),
            plan.warmup,
        )
    results.add(
        figure(
            "client_run_true_p50",
            "run `true` p50 through execd.client (AsyncClient)",
            p50(ms(by_client)),
            "ms",
            len(by_client),
            floor=p50(ms(raw)),
            floor_label="run `true` p50, raw HTTP client",
            op="<=",
            factor=2.0,
        )
    )


async def opensandbox_row(daemon: Daemon, conn: Http, session_id: str, plan: Plan, results: Results) -> None:
    """The unmodified opensandbox SDK's `commands.run("true")` through the adapter at /opensandbox (a
    fresh session per command, closed after it), turn about with a native run of `true`."""
    from datetime import timedelta

    from opensandbox.adapters.command_adapter import CommandsAdapter
    from opensandbox.config import ConnectionConfig
    from opensandbox.models.sandboxes import SandboxEndpoint

    status, _ = await conn.request("GET", "/opensandbox/ping")
    if status != 200:  # a daemon from before the adapter (the old side of a pair): no such row
        log(f"no OpenSandbox adapter on this daemon (GET /opensandbox/ping -> {status}): row left out")
        return
    log("commands.run(`true`) through the opensandbox SDK, turn about with a native run of `true`")
    endpoint = SandboxEndpoint(endpoint=f"{HOST}:{daemon.port}/opensandbox")
    commands = CommandsAdapter(ConnectionConfig(request_timeout=timedelta(seconds=30)), endpoint)
    by_sdk, raw = await turn_about(
        atimer(lambda: commands.run("true")),
        atimer(lambda: conn.run(session_id, TRUE)),
        max(plan.run_true_n // 2, 1),
        plan.warmup,
    )
    # Each command's session is closed after it, in the background: let those closes end before
    # the next rows measure this daemon.
    deadline = time.monotonic() + 30
    while (await conn.json("GET", "/healthz"))["sessions"] > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    results.add(
        figure(
            "opensandbox_run_true_p50",
            "opensandbox SDK commands.run(`true`) p50 through /opensandbox (OpenSandbox's own execd: ~1 s)",
            p50(ms(by_sdk)),
            "ms",
            len(by_sdk),
            floor=p50(ms(raw)),
            floor_label="run `true` p50, raw HTTP client, native route",
            op="<=",
            factor=20.0,
        )
    )


async def http_rows(daemon: Daemon, plan: Plan, results: Results, env: dict[str, str], peer: bool) -> None:
    """The rows measured on the main daemon, each floor measured turn about with its figure."""
    conn = await Http.open(daemon.port)
    try:
        session_id = (await create_session(conn, daemon))["session_id"]
        log("run `true` and GET /ping, turn about, over one keep-alive connection")
        run_true: list[float] = []
        ping: list[float] = []
        for _ in range(plan.warmup):
            await conn.run(session_id, TRUE)
            await conn.request("GET", "/ping")
        for _ in range(plan.run_true_n):
            start = time.perf_counter()
            await conn.run(session_id, TRUE)
            run_true.append(time.perf_counter() - start)
            start = time.perf_counter()
            status, _ = await conn.request("GET", "/ping")
            ping.append(time.perf_counter() - start)
            if status != 200:
                raise BenchError(f"GET /ping -> {status}")
        run_true, ping = ms(run_true), ms(ping)
        results.add(
            figure(
                "run_true_p50",
                "run `true` p50 (one keep-alive connection)",
                p50(run_true),
                "ms",
                len(run_true),
                floor=p50(ping),
                floor_label="GET /ping p50, same kind of connection",
                op="<=",
                factor=2.5,
            )
        )
        results.add(
            figure(
                "run_true_p99",
                "run `true` p99 (one keep-alive connection)",
                p99(run_true),
                "ms",
                len(run_true),
                floor=p99(ping),
                floor_label="GET /ping p99, same kind of connection",
            )
        )
        await client_row(daemon, conn, session_id, plan, results)
        log("run `/bin/true`, turn about with a bash over pipes driven directly")
        shell = PipeBash(env)
        try:
            bin_true, floor_bin_true = await interleaved(
                atimer(lambda: conn.run(session_id, BIN_TRUE)),
                timer(lambda: shell.round_trip(b"/bin/true")),
                plan.bin_true_n,
                plan.warmup,
            )
            floor_true = [timer(lambda: shell.round_trip(b"true"))() for _ in range(plan.floor_true_n)]
        finally:
            shell.close()
        results.extra["floor_bash_true_p50"] = p50(ms(floor_true))
        results.add(
            figure(
                "run_bin_true_p50",
                "run `/bin/true` p50",
                p50(ms(bin_true)),
                "ms",
                len(bin_true),
                floor=p50(ms(floor_bin_true)),
                floor_label="bash over pipes + private FIFO from Python, no HTTP",
                op="<=",
                plus=1.0,
            )
        )
        log(f"{plan.output_bytes / MB:g} MB of stdout drained raw, turn about with a direct pipe drain")
        rates, drains, raw = [], [], 0
        for _ in range(plan.output_repeats):
            rate, raw = await stream_throughput(conn, session_id, plan.output_bytes)
            rates.append(rate)
            drains.append(floor_pipe_drain(env, plan.output_bytes))
        results.add(
            figure(
                "stdout_throughput",
                f"{plan.output_bytes / MB:g} MB of stdout, client draining the raw stream",
                statistics.median(rates),
                "MB/s",
                plan.output_repeats,
                floor=statistics.median(drains),
                floor_label="Python draining the same command's pipe (os.read loop)",
                op=">=",
                factor=0.5,
                note=f"{raw / MB:.1f} MB of SSE on the wire per run",
            )
        )
        if peer:
            rate, _ = await stream_throughput(conn, session_id, plan.peer_output_bytes)
            results.extra["stdout_peer_size_mb_s"] = rate
        await delete_session(conn, daemon, session_id)

        log("create session until a first run completes, turn about with spawning bash directly")
        create, floor_spawn = await interleaved(
            lambda: create_and_run(conn, daemon),
            lambda: spawn_round_trip(env),
            plan.create_n,
            min(plan.warmup, 3),
        )
        results.add(
            figure(
                "create_first_run_p50",
                "create session until a first run completes, p50",
                p50(ms(create)),
                "ms",
                len(create),
                floor=p50(ms(floor_spawn)),
                floor_label="spawn bash + one round trip, no HTTP",
                op="<=",
                factor=4,
            )
        )
        await delete_all(daemon, budget_s=30)
    finally:
        await conn.close()
    log("interrupt `sleep 100`")
    interrupts = ms(await interrupt_latencies(daemon, plan.interrupt_n))
    results.add(figure("interrupt_p50", "interrupt -> terminal event p50 (`sleep 100`)", p50(interrupts), "ms",
                       len(interrupts), op="<=", absolute=20))  # fmt: skip
    results.add(figure("interrupt_p99", "interrupt -> terminal event p99 (`sleep 100`)", p99(interrupts), "ms",
                       len(interrupts), op="<=", absolute=50))  # fmt: skip
    log("DELETE of an idle session (run once), turn about with killing a bash over pipes directly")
    conn = await Http.open(daemon.port)
    try:
        deletes, kills = await interleaved(
            lambda: delete_once(conn, daemon), lambda: kill_floor(env), plan.delete_n, min(plan.warmup, 5)
        )
    finally:
        await conn.close()
    deletes, kills = ms(deletes), ms(kills)
    kill_label = "SIGKILL bash's process group, reap, close its pipes, no HTTP"
    results.add(figure("delete_idle_p50", "DELETE of an idle session p50", p50(deletes), "ms", len(deletes),
                       floor=p50(kills), floor_label=f"{kill_label}, p50", op="<=", absolute=5))  # fmt: skip
    results.add(figure("delete_idle_p99", "DELETE of an idle session p99", p99(deletes), "ms", len(deletes),
                       floor=p99(kills), floor_label=f"{kill_label}, p99", op="<=", absolute=15))  # fmt: skip
    log(f"{plan.concurrent_sessions} sessions x {plan.concurrent_runs} `echo hi`, concurrent")
    rate = await concurrent_rate(daemon, plan.concurrent_sessions, plan.concurrent_runs)
    results.add(
        figure(
            "concurrent_runs_per_s",
            f"{plan.concurrent_sessions} sessions x {plan.concurrent_runs} `echo hi`, concurrent",
            rate,
            "runs/s",
            plan.concurrent_sessions * plan.concurrent_runs,
            op=">=",
            absolute=1500,
        )
    )
    # Last on this daemon: the adapter's per-command sessions are closed in the background, and
    # no other row should run beside those closes.
    conn = await Http.open(daemon.port)
    try:
        await opensandbox_row(daemon, conn, (await create_session(conn, daemon))["session_id"], plan, results)
        await delete_all(daemon, budget_s=30)
    finally:
        await conn.close()


async def run_rows(daemon: Daemon, plan: Plan, results: Results, env: dict[str, str], log_bytes: int) -> None:
    """The rows of runs as resources (v2), on a daemon of their own: RSS first (fresh), then the
    background drain, then reattaching. A daemon without the v2 routes gets them as not measured."""
    count, size = plan.background_runs, plan.background_bytes
    rss_label = f"daemon RSS growth, {count} background runs x {size / MB:g} MB, no reader"
    drain_label = f"{plan.drain_bytes / MB:g} MB background run, no reader: 202 -> run object `completed`"
    reattach_labels = {
        "reattach_p50": "reattach: cut -> first missed event on a new connection (Last-Event-ID), p50",
        "reattach_p99": "reattach: cut -> first missed event on a new connection (Last-Event-ID), p99",
    }
    conn = await Http.open(daemon.port)
    try:
        probe = (await create_session(conn, daemon))["session_id"]
        try:
            run = await start_background(conn, probe, "true")
            await wait_finished(conn, probe, run["run_id"], 0.005, 30)
        except RouteMissing as exc:
            results.skip({"rss_100_background_runs": rss_label, "background_drain_mbps": drain_label,
                          **reattach_labels}, exc)  # fmt: skip
            return
        finally:
            await delete_session(conn, daemon, probe)

        log(f"{count} background runs x {size / MB:g} MB, nobody reading: daemon RSS")
        try:
            rss = await background_rss(daemon, count, size)
        except RouteMissing as exc:
            results.skip({"rss_100_background_runs": rss_label}, exc)
        else:
            window = count * log_bytes / MB
            results.extra["background_rss_after_mb"] = (rss["after"] - rss["baseline"]) / MB
            results.add(
                figure(
                    "rss_100_background_runs",
                    rss_label,
                    (rss["peak"] - rss["baseline"]) / MB,
                    "MB",
                    count,
                    op="<=",
                    absolute=round(window + 32, 1),
                    note=(
                        f"target {count} x EXECD_RUN_LOG_BYTES ({log_bytes}) + 32 MB; baseline "
                        f"{rss['baseline'] / MB:.1f} MB with {count} idle sessions, peak {rss['peak'] / MB:.1f} MB, "
                        f"{(rss['after'] - rss['baseline']) / MB:.1f} MB above baseline once all ended; "
                        f"{rss['output_bytes'] / MB:.0f} MB written in {rss['elapsed_s']:.1f} s, "
                        f"{rss['dropped_bytes'] / MB:.0f} MB dropped from the logs"
                    ),
                )
            )

        log(f"{plan.drain_bytes / MB:g} MB background run with no reader, turn about with a direct pipe drain")
        try:
            rates: list[float] = []
            drains: list[float] = []
            last_run: dict[str, Any] = {}
            for _ in range(plan.drain_repeats):
                rate, last_run = await background_drain(conn, daemon, plan.drain_bytes)
                rates.append(rate)
                drains.append(floor_pipe_drain(env, plan.drain_bytes))
        except RouteMissing as exc:
            results.skip({"background_drain_mbps": drain_label}, exc)
        else:
            results.extra["background_output_bytes"] = last_run["output_bytes"]
            results.extra["background_dropped_bytes"] = last_run["dropped_bytes"]
            results.add(
                figure(
                    "background_drain_mbps",
                    drain_label,
                    statistics.median(rates),
                    "MB/s",
                    plan.drain_repeats,
                    floor=statistics.median(drains),
                    floor_label="Python draining the same command's pipe (os.read loop)",
                    op=">=",
                    factor=0.5,
                    note=(
                        f"run object: output_bytes {last_run['output_bytes']}, "
                        f"dropped_bytes {last_run['dropped_bytes']} (log window {log_bytes})"
                    ),
                )
            )

        log("reattach to a background run after a cut, turn about with a fresh connection's GET /healthz")
        try:
            reattach, healthz = await reattach_latencies(daemon, plan.reattach_n, min(plan.warmup, 5))
        except RouteMissing as exc:
            results.skip(reattach_labels, exc)
        else:
            reattach, healthz = ms(reattach), ms(healthz)
            floor_label = "fresh connection + GET /healthz"
            results.add(figure("reattach_p50", reattach_labels["reattach_p50"], p50(reattach), "ms", len(reattach),
                               floor=p50(healthz), floor_label=f"{floor_label}, p50", op="<=", factor=3))  # fmt: skip
            results.add(figure("reattach_p99", reattach_labels["reattach_p99"], p99(reattach), "ms", len(reattach),
                               floor=p99(healthz), floor_label=f"{floor_label}, p99", op="<=", factor=3))  # fmt: skip
    finally:
        await conn.close()


def bench(
    plan: Plan,
    peer: str | None,
    peer_venv: Path | None,
    workdir: Path,
    token: str,
    problems: list[str],
    daemon_root: Path = ROOT,
) -> Results:
    """Every row; `problems` collects what went wrong around the figures (leftovers, a hung daemon).
    The daemons run the code of the checkout at `daemon_root`; the floors and the client are this one."""
    results = Results()
    child_env = {**os.environ, TOKEN_VAR: token}
    child_env.pop("EXECD_ACCESS_TOKEN", None)
    log_bytes = int(child_env.get("EXECD_RUN_LOG_BYTES", str(RUN_LOG_BYTES)))
    execd_env = daemon_env(child_env, daemon_root)
    results.daemons["execd"] = daemon_source(execd_env, daemon_root)
    log(f"daemon code: {results.daemons['execd']['package']} (commit {results.daemons['execd']['commit'][:12]})")
    session_ids: set[str] = set()
    daemons: list[Daemon] = []
    swerex_python: Path | None = None
    if peer == "swerex":
        swerex_python = install_swerex(peer_venv or workdir / "swerex-venv")

    def start(name: str, **settings: str) -> Daemon:
        daemon = Daemon(name, workdir, {**execd_env, **settings}, daemon_root)
        daemons.append(daemon)
        daemon.start()
        log(f"daemon {name}: pid {daemon.pid}, port {daemon.port}")
        return daemon

    def finish(daemon: Daemon) -> None:
        if daemon.finished:
            return
        daemon.finished = True
        if daemon.proc is not None and daemon.proc.poll() is None:
            try:
                in_loop(delete_all(daemon, budget_s=10.0))
            except (OSError, BenchError, asyncio.IncompleteReadError) as exc:
                problems.append(f"daemon {daemon.name}: deleting the sessions left failed: {exc!r}")
        daemon.stop()
        session_ids.update(daemon.session_ids)
        problems.extend(daemon.problems)

    try:
        # Daemon A: idle RSS and the stalled stream first (fresh), then every latency row.
        main = start("main")
        time.sleep(0.5)
        ping_once(main.port)
        rss_idle = main.rss()
        results.add(figure("rss_idle", "daemon RSS idle (fresh, 0 sessions)", rss_idle / MB, "MB", 1,
                           op="<=", absolute=45))  # fmt: skip
        log(f"stalled client on a {plan.stall_bytes / MB:g} MB stream for {plan.stall_s:g} s")
        base, peak, read = in_loop(stalled_stream_growth(main, plan.stall_bytes, plan.stall_s))
        results.add(
            figure(
                "rss_growth_stalled_stream",
                f"daemon RSS growth, client stalled {plan.stall_s:g} s on a {plan.stall_bytes / MB:g} MB stream",
                (peak - base) / MB,
                "MB",
                1,
                op="<=",
                absolute=16,
                note=f"baseline {base / MB:.1f} MB, peak {peak / MB:.1f} MB, client read {read / MB:.1f} MB in all",
            )
        )
        in_loop(http_rows(main, plan, results, child_env, peer is not None))
        finish(main)

        # Daemon B: many idle sessions.
        many = start("idle", EXECD_MAX_SESSIONS=str(plan.idle_sessions + 64))
        idle = in_loop(idle_sessions(many, plan))
        finish(many)
        results.extra["idle_create_s"] = idle["create_s"]
        results.extra["idle_delete_s"] = idle["delete_s"]
        results.extra["idle_deleted"] = idle["deleted"]
        results.extra["idle_delete_p50_ms"] = idle["delete_p50_ms"]
        results.add(
            figure(
                "rss_per_session",
                f"daemon RSS per idle session ({plan.idle_sessions} sessions)",
                (idle["rss_many"] - idle["rss_zero"]) / plan.idle_sessions / KB,
                "KB",
                plan.idle_sessions,
                floor=idle["rss_zero"] / MB,
                floor_unit="MB",
                floor_label="daemon RSS with 0 sessions",
                op="<=",
                absolute=64,
                note=(
                    f"created in {idle['create_s']:.1f} s; {idle['deleted']:.0f} deleted in {idle['delete_s']:.1f} s "
                    f"(DELETE p50 {idle['delete_p50_ms']:.0f} ms)"
                ),
            )
        )
        results.add(
            figure(
                "true_p99_idle_sessions",
                f"run `true` p99 with {plan.idle_sessions} idle sessions",
                idle["p99_many"],
                "ms",
                plan.idle_p99_n,
                floor=idle["p99_one"],
                floor_label="run `true` p99 with 1 session",
                op="<=",
                factor=3,
            )
        )

        # Daemon C: runs as resources (v2).
        runs = start("runs")
        in_loop(run_rows(runs, plan, results, child_env, log_bytes))
        finish(runs)

        if swerex_python is not None:
            log("SWE-ReX (LocalRuntime, in-process: no HTTP)")
            results.peer = measure_swerex(swerex_python, plan, child_env)
    finally:
        for daemon in daemons:
            finish(daemon)
        problems.extend(check_nothing_left(token, session_ids))
    order = {name: i for i, name in enumerate(FIGURE_NAMES)}
    results.figures.sort(key=lambda f: order.get(f.name, len(order)))
    return results


FIGURE_NAMES = [
    "run_true_p50",
    "run_true_p99",
    "client_run_true_p50",
    "opensandbox_run_true_p50",
    "run_bin_true_p50",
    "stdout_throughput",
    "create_first_run_p50",
    "interrupt_p50",
    "interrupt_p99",
    "delete_idle_p50",
    "delete_idle_p99",
    "concurrent_runs_per_s",
    "reattach_p50",
    "reattach_p99",
    "background_drain_mbps",
    "rss_per_session",
    "true_p99_idle_sessions",
    "rss_idle",
    "rss_growth_stalled_stream",
    "rss_100_background_runs",
]


# ----- output --------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}" if unit else text


def table(results: Results) -> str:
    lines = [
        "| figure | value | floor measured beside it | target | ratio | status |",
        "|---|---|---|---|---|---|",
    ]
    rows: list[tuple[str, str]] = []
    for f in results.figures:
        floor = f"{fmt(f.floor, f.floor_unit)} ({f.floor_label})" if f.floor is not None else "-"
        target = f"{f.target} (= {fmt(f.target_value, f.unit)})" if f.target and "floor" in f.target else f.target
        ratio = f"{f.ratio:.2f} x {f.ratio_of}" if f.ratio is not None else "-"
        status = "-" if f.ok is None else ("OK" if f.ok else "SHORT")
        line = f"| {f.label} | {fmt(f.value, f.unit)} | {floor} | {target or '-'} | {ratio} | {status} |"
        rows.append((f.name, line))
    for name, skipped in results.not_measured.items():
        reason = skipped["reason"].replace("|", "/")
        rows.append((name, f"| {skipped['label']} | not measured: {reason} | - | - | - | NOT MEASURED |"))
    order = {name: i for i, name in enumerate(FIGURE_NAMES)}
    rows.sort(key=lambda row: order.get(row[0], len(order)))
    return "\n".join(lines + [line for _, line in rows])


def peer_figures(results: Results, plan: Plan) -> list[dict[str, Any]]:
    peer = results.peer
    if peer is None:
        return []
    by_name = {f.name: f for f in results.figures}
    size = plan.peer_output_bytes
    execd_output = results.extra.get("stdout_peer_size_mb_s", by_name["stdout_throughput"].value)
    rows = [
        ("run_true_p50", "run `true` p50", "ms", by_name["run_true_p50"].value, p50(ms(peer["run_true"]))),
        ("run_bin_true_p50", "run `/bin/true` p50", "ms", by_name["run_bin_true_p50"].value,
         p50(ms(peer["run_bin_true"]))),
        ("stdout_throughput", f"{size / MB:g} MB of stdout", "MB/s", execd_output, size / MB / peer["output_s"]),
        ("create_first_run_p50", "create session until a first run completes, p50", "ms",
         by_name["create_first_run_p50"].value, p50(ms(peer["create"]))),
        ("concurrent_runs_per_s", f"{plan.concurrent_sessions} sessions, `echo hi` concurrent", "runs/s",
         by_name["concurrent_runs_per_s"].value, plan.concurrent_sessions * plan.peer_concurrent_runs
         / peer["concurrent_s"]),
    ]  # fmt: skip
    out = []
    for name, label, unit, execd, swerex in rows:
        better = swerex / execd if unit == "ms" else execd / swerex
        out.append({"name": name, "label": label, "unit": unit, "execd": execd, "swerex": swerex, "execd_x": better})
    return out


def peer_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| figure | execd | SWE-ReX (LocalRuntime) | execd advantage |", "|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['label']} | {fmt(row['execd'], row['unit'])} | {fmt(row['swerex'], row['unit'])} "
            f"| {row['execd_x']:.0f}x |"
        )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
    }


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="execd-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small version (well under 30 s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every figure to PATH as JSON")
    parser.add_argument("--peer", choices=["swerex"], help="also measure SWE-ReX on the rows that apply")
    parser.add_argument("--peer-venv", type=Path, metavar="DIR", help="venv for the peer (reused if it has it)")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a row is SHORT")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemons' logs (path printed)")
    parser.add_argument(
        "--daemon-root",
        type=Path,
        default=ROOT,
        metavar="PATH",
        help="run the daemon from the checkout at PATH (PYTHONPATH=PATH, this same venv); default this one",
    )
    args = parser.parse_args(argv)
    daemon_root = args.daemon_root.resolve()
    if not (daemon_root / "execd" / "__main__.py").is_file():
        parser.error(f"--daemon-root {args.daemon_root}: no execd/__main__.py there")
    plan = QUICK if args.quick else FULL
    token = secrets.token_hex(8)
    started = time.perf_counter()
    problems: list[str] = []
    with workspace(args.keep_logs) as workdir:
        try:
            results = bench(plan, args.peer, args.peer_venv, workdir, token, problems, daemon_root)
        except (BenchError, OSError, asyncio.IncompleteReadError, psutil.Error) as exc:
            print(f"bench failed: {exc if isinstance(exc, BenchError) else repr(exc)}", file=sys.stderr)
            for problem in problems:
                print(f"PROBLEM: {problem}", file=sys.stderr)
            for log_file in sorted(workdir.glob("daemon-*.log")):
                tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-10:])
                print(f"--- {log_file.name} (last lines)\n{tail}", file=sys.stderr)
            return 2
        if args.keep_logs:
            log(f"daemon logs kept in {workdir}")
    elapsed = time.perf_counter() - started
    source = results.daemons["execd"]
    where = "" if daemon_root == ROOT else f", daemon from {source['root']} at {source['commit'][:12]}"
    kind = "quick" if args.quick else "full"
    print(f"\nexecd bench ({kind}, {elapsed:.0f} s, load {os.getloadavg()[0]:.2f}{where})\n")
    print(table(results))
    rows = peer_figures(results, plan)
    if rows:
        print("\nSide by side with SWE-ReX (its LocalRuntime in-process, no HTTP; execd over HTTP)\n")
        print(peer_table(rows))
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if args.json:
        document = {
            "quick": args.quick,
            "elapsed_s": elapsed,
            "plan": asdict(plan),
            "machine": machine(),
            "figures": [asdict(f) for f in results.figures],
            "extra": results.extra,
            "not_measured": results.not_measured,
            "daemon": results.daemons["execd"],
            "peer": {"name": args.peer, "figures": rows, "raw": results.peer} if rows else None,
            "problems": problems,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    if problems:
        return 4
    if results.not_measured:
        return 5
    if args.strict and any(f.ok is False for f in results.figures):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
