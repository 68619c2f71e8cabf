#!/usr/bin/env python3
"""Soak execd: 1,000 hostile session lifecycles, or minutes of mixed normal work; count what leaks.

Not a CI test (issue 11's acceptance: 0 leaked processes or fds, RSS and fd count flat within 5 %
after the first minute). Two modes:

    .venv/bin/python scripts/soak.py hostile --count 1000 --workers 20
    .venv/bin/python scripts/soak.py soak --minutes 10 --workers 50 [--sessions-per-worker 2]

`hostile`: each lifecycle creates a session, does one hostile thing chosen in rotation (background
jobs then `exit`, escapees without the session tag, `exec`, `kill -9 $$`, `kill -STOP $$`, closed
fds 0-2, `trap '' INT` past a timeout, `set -e; false`, junk in the status FIFO, a bounded fork bomb,
a client that goes away mid-stream, interrupt storms, stdin left open, DELETE mid-run, concurrent
runs...) and deletes it. `soak`: every worker keeps its sessions (about 50-100 live) and does mixed
normal operations (small and 1-10 MB runs, background runs read back with Last-Event-ID, interrupts,
timeouts, stdin streams, deletes, listings, resources).

Every `--interval-s` (10 s) the workers pause between operations (a hostile lifecycle ends with its
DELETE, so then no session is live), the client drops its pooled connections, and a sample is taken:
the daemon's RSS and anonymous RSS (/proc/PID/status), its open fds (/proc/PID/fd, by kind), the
processes under it other than its watchdog, and the processes that carry the EXECD_SESSION_ID of a
session this run already deleted or that run one of this run's marked `sleep`s. At the end every
session is deleted, the client closed, and the same figures are compared with the start.

By default the script starts its own daemon (`python -m execd serve` on a free loopback port, a
random access token in a file, limits big enough); `--url URL --token-file PATH` targets a running
one (its pid from `--daemon-pid`, else found by its listening port). The JSON summary goes to
stdout, progress to stderr. Exit status: 0 clean; 1 a leaked process or fd, a 5xx, or an `error`
event INTERNAL; 2 the soak could not run; 3 anomalies only (an unexpected 4xx, a client timeout, a
stream without its terminal event) or, in `soak` mode, RSS or fds not flat within 5 %.

The flatness verdict compares every sample after the first minute with the first of them (the
band), and also gives the least-squares trend over that window: a leak shows as a trend, allocator
noise (RSS that swings with the 1 MiB run-log windows the sessions keep, see `retained_logs_kb`)
as a band without one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import psutil
from bench import HOST, SESSION_TAG, Daemon, _describe  # scripts/ is on sys.path when this file is run

from execd.process import tag_of

ROOT = Path(__file__).resolve().parents[1]
MB = 1000 * 1000
RUN_LOG_BYTES = 1024 * 1024  # the daemon's default EXECD_RUN_LOG_BYTES: what a run's log keeps at most
RUN_ROUTE = "POST /session/{id}/run"
FLAT_PCT = 5.0
FIRST_MINUTE_S = 60.0
DEFAULT_RUN_TIMEOUT_MS = 20_000  # every hostile run is bounded: a hang is an anomaly, not a stuck soak
LIFECYCLE_TIMEOUT_S = 90.0
TERMINAL = frozenset({"execution_complete", "error"})


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- what the daemon holds -----------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of `pid`, in kB."""
    found: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


def fd_kinds(pid: int) -> dict[str, int]:
    """The open fds of `pid` by kind: socket, pipe, pidfd, eventpoll, fifo/file..."""
    kinds: Counter[str] = Counter()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            kinds["socket"] += 1
        elif target.startswith("pipe:"):
            kinds["pipe"] += 1
        elif target.startswith("anon_inode:"):
            kinds[target[len("anon_inode:") :].strip("[]")] += 1
        elif target.startswith("/dev/"):
            kinds["dev"] += 1
        elif target.endswith("/status") or target.endswith("/code") or "/stdin-" in target:
            kinds["session_file"] += 1
        else:
            kinds["file"] += 1
    return dict(sorted(kinds.items()))


@dataclass
class Leftover:
    pid: int
    ppid: int
    state: str
    why: str  # "tagged" (a deleted session's tag), "marked" (our sleep), "daemon_tree", "zombie"
    session_id: str | None
    cmdline: str


def describe(pid: int) -> tuple[int, str, str]:
    """(ppid, state, cmdline) of `pid`, best effort."""
    try:
        proc = psutil.Process(pid)
        return proc.ppid(), proc.status(), _describe(proc)
    except psutil.Error:
        return 0, "gone", "?"


def cgroup_root(daemon_pid: int) -> str | None:
    """Where the daemon keeps its sessions' cgroups (`<its cgroup>/execd-<pid>`, see
    execd/cgroups.py), if it makes them: the cgroup v2 mount plus its own cgroup."""
    mount = own = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    mount = left.split(" ")[4]
                    break
        with open(f"/proc/{daemon_pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    own = line[3:].strip().rstrip("/")
    except OSError:
        return None
    if mount is None or own is None:
        return None
    return os.path.join(mount + own, f"execd-{daemon_pid}")


def count_cgroups(root: str | None) -> int | None:
    """Session cgroups left under the daemon's (None: it makes none)."""
    if root is None or not os.path.isdir(root):
        return None
    with contextlib.suppress(OSError):
        return sum(1 for entry in os.scandir(root) if entry.is_dir())
    return None


class Probe:
    """Samples one daemon (its pid may be unknown: then only the machine-wide scans run)."""

    def __init__(self, daemon_pid: int | None, mark: str) -> None:
        self.daemon_pid = daemon_pid
        self.mark = mark  # every hostile `sleep` is `sleep <mark>`: findable even without its tag
        self._watchdogs: set[int] = set()
        self.cgroup_root = cgroup_root(daemon_pid) if daemon_pid else None

    def watchdogs(self) -> set[int]:
        if self.daemon_pid is None:
            return set()
        try:
            children = psutil.Process(self.daemon_pid).children()
        except psutil.Error:
            return set()
        found = set()
        for child in children:
            with contextlib.suppress(psutil.Error):
                if "execd.watchdog" in " ".join(child.cmdline()):
                    found.add(child.pid)
        self._watchdogs = found or self._watchdogs
        return self._watchdogs

    def tree(self) -> list[psutil.Process]:
        """Every process under the daemon except its watchdog (and what the watchdog may start)."""
        if self.daemon_pid is None:
            return []
        watchdogs = self.watchdogs()
        found: list[psutil.Process] = []
        try:
            stack = psutil.Process(self.daemon_pid).children()
        except psutil.Error:
            return []
        while stack:
            proc = stack.pop()
            if proc.pid in watchdogs:
                continue
            found.append(proc)
            with contextlib.suppress(psutil.Error):
                stack.extend(proc.children())
        return found

    def leftovers(self, dead_ids: set[str], tree_expected: int | None) -> list[Leftover]:
        """Processes of sessions already deleted (by tag), our marked sleeps whose sessions are all
        gone (`tree_expected` is not None only when no session of ours is live), and, in that case,
        anything at all under the daemon but its watchdog."""
        found: dict[int, Leftover] = {}
        own = os.getpid()
        mark = self.mark.encode()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == own:
                continue
            pid = int(entry)
            tag = tag_of(pid)
            why = ""
            if tag is not None and tag in dead_ids:
                why = "tagged"
            elif tree_expected is not None:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if mark in f.read():
                            why = "marked"
                except OSError:
                    continue
            if why:
                ppid, state, cmdline = describe(pid)
                if state not in ("gone",):
                    found[pid] = Leftover(pid, ppid, state, why, tag, cmdline)
        if tree_expected is not None:
            for proc in self.tree():
                if proc.pid in found:
                    continue
                ppid, state, cmdline = describe(proc.pid)
                if state == "gone":
                    continue
                why = "zombie" if state == psutil.STATUS_ZOMBIE else "daemon_tree"
                found[proc.pid] = Leftover(proc.pid, ppid, state, why, tag_of(proc.pid), cmdline)
        return sorted(found.values(), key=lambda item: item.pid)

    def figures(self) -> dict[str, Any]:
        if self.daemon_pid is None:
            return {"rss_kb": None, "rss_anon_kb": None, "fds": None, "fd_kinds": {}, "tree": None, "cgroups": None}
        status = proc_status(self.daemon_pid)
        kinds = fd_kinds(self.daemon_pid)
        return {
            "rss_kb": status.get("VmRSS"),
            "rss_anon_kb": status.get("RssAnon"),
            "fds": sum(kinds.values()),
            "fd_kinds": kinds,
            "tree": len(self.tree()),
            "cgroups": count_cgroups(self.cgroup_root),
        }


def kill_leftovers(items: list[Leftover]) -> None:
    for item in items:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(item.pid, signal.SIGKILL)


# ----- the client ----------------------------------------------------------------------------------


@dataclass
class Stats:
    ok: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)  # e.g. 409 SESSION_BUSY where a 409 may come
    server_errors: Counter[str] = field(default_factory=Counter)  # every 5xx
    unexpected: Counter[str] = field(default_factory=Counter)  # another 4xx, or a client failure
    terminals: Counter[str] = field(default_factory=Counter)  # terminal events of runs, by type/code
    anomalies: list[str] = field(default_factory=list)
    anomaly_count: int = 0
    requests: int = 0

    def anomaly(self, text: str) -> None:
        self.anomaly_count += 1
        if len(self.anomalies) < 60:
            self.anomalies.append(text)
        log(f"ANOMALY: {text}")

    def record(self, route: str, status: int, code: str | None, expect: frozenset[int], detail: str = "") -> None:
        self.requests += 1
        key = f"{route} -> {status}" + (f" {code}" if code else "")
        if 200 <= status < 300:
            self.ok[key] += 1
        elif status >= 500:
            self.server_errors[key] += 1
            self.anomaly(f"{key}: {detail[:300]}")
        elif status in expect:
            self.expected[key] += 1
        else:
            self.unexpected[key] += 1
            self.anomaly(f"unexpected {key}: {detail[:300]}")

    def client_failure(self, route: str, exc: BaseException) -> None:
        self.requests += 1
        key = f"{route} -> client {type(exc).__name__}"
        self.unexpected[key] += 1
        self.anomaly(f"{key}: {exc!r}"[:300])


@dataclass
class RunResult:
    status: int
    code: str | None = None  # of a non-2xx answer
    body: Any = None  # a non-stream answer's JSON
    run_id: str | None = None
    terminal: dict[str, Any] | None = None
    events: int = 0
    last_seq: int = -1
    output_bytes: int = 0  # bytes of the data lines of stdout/stderr events (JSON-escaped text)
    output_text: str = ""  # decoded text, only when asked for
    cut: bool = False  # we closed the stream on purpose
    gaps: int = 0
    seqs_ok: bool = True  # no seq repeated or skipped without a gap

    @property
    def label(self) -> str:
        if self.status not in (200, 204):
            return f"{self.status} {self.code or ''}".strip()
        if self.cut:
            return "cut by client"
        if self.terminal is None:
            return "no terminal event" if self.status == 200 else "204"
        if self.terminal.get("type") == "error":
            return f"error {self.terminal.get('code')}"
        flags = [name for name in ("interrupted", "timed_out", "shell_exited") if self.terminal.get(name)]
        return " ".join([f"complete exit={self.terminal.get('exit_code')}", *flags])


class Api:
    """aiohttp against the contract's routes; every answer is counted in `stats`."""

    def __init__(self, url: str, token: str | None, stats: Stats) -> None:
        self.url = url.rstrip("/")
        self.headers = {"X-EXECD-ACCESS-TOKEN": token} if token else {}
        self.stats = stats
        self.http: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.http = aiohttp.ClientSession(
            headers=self.headers,
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120),
            read_bufsize=1 << 20,
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None

    async def reset(self) -> None:
        """Drop every pooled connection (before a sample: no client socket counts among its fds)."""
        await self.close()
        await self.open()

    def _session(self) -> aiohttp.ClientSession:
        assert self.http is not None
        return self.http

    async def call(
        self,
        method: str,
        path: str,
        route: str,
        body: Any = None,
        expect: frozenset[int] = frozenset(),
        timeout_s: float = 60.0,
    ) -> tuple[int, Any]:
        """(status, JSON body or None); (0, None) when the request itself failed."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session().request(method, self.url + path, json=body) as resp:
                    raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.client_failure(route, exc)
            return 0, None
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
        code = data.get("code") if isinstance(data, dict) and resp.status >= 300 else None
        self.stats.record(route, resp.status, code, expect, raw[:300].decode(errors="replace"))
        return resp.status, data

    async def stream(
        self,
        method: str,
        path: str,
        route: str,
        body: Any = None,
        expect: frozenset[int] = frozenset(),
        headers: dict[str, str] | None = None,
        cut_after_bytes: int | None = None,
        cut_after_events: int | None = None,
        keep_text: bool = False,
        timeout_s: float = 120.0,
        on_init: Callable[[str], None] | None = None,
    ) -> RunResult:
        """A run's SSE stream (POST run or GET events), read to its terminal event unless cut."""
        result = RunResult(status=0)
        try:
            async with asyncio.timeout(timeout_s):
                async with self._session().request(method, self.url + path, json=body, headers=headers) as resp:
                    result.status = resp.status
                    if resp.status != 200:
                        raw = await resp.read()
                        data: Any = None
                        with contextlib.suppress(ValueError):
                            data = json.loads(raw) if raw else None
                        result.body = data
                        result.code = data.get("code") if isinstance(data, dict) and resp.status >= 300 else None
                        self.stats.record(route, resp.status, result.code, expect, raw[:300].decode(errors="replace"))
                        return result
                    await self._read_events(resp, result, cut_after_bytes, cut_after_events, keep_text, on_init)
                    if result.cut:
                        resp.close()  # the connection goes, as a client that goes away
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.client_failure(route, exc)
            result.status = 0
            return result
        self.stats.record(route, 200, None, expect)
        if result.terminal is not None:
            kind = result.terminal.get("type")
            code = result.terminal.get("code")
            self.stats.terminals[f"{kind} {code}" if kind == "error" else str(kind)] += 1
            if kind == "error" and code not in ("SESSION_CLOSED", "SESSION_DIED", "SHUTTING_DOWN"):
                self.stats.server_errors[f"{route} -> error event {code}"] += 1
                self.stats.anomaly(f"{route}: error event {result.terminal}")
        elif not result.cut:
            self.stats.unexpected[f"{route} -> stream without terminal event"] += 1
            self.stats.anomaly(f"{route} {path}: the stream ended without a terminal event ({result.events} events)")
        if not result.seqs_ok:
            self.stats.unexpected[f"{route} -> seq repeated or skipped"] += 1
            self.stats.anomaly(f"{route} {path}: seqs repeated or skipped without a gap")
        return result

    @staticmethod
    async def _read_events(
        resp: aiohttp.ClientResponse,
        result: RunResult,
        cut_after_bytes: int | None,
        cut_after_events: int | None,
        keep_text: bool,
        on_init: Callable[[str], None] | None,
    ) -> None:
        buffer = bytearray()
        texts: list[str] = []
        async for chunk in resp.content.iter_any():
            buffer += chunk
            start = 0
            while True:
                end = buffer.find(b"\n\n", start)
                if end < 0:
                    break
                frame = bytes(buffer[start:end])
                start = end + 2
                if frame.startswith(b":"):
                    continue  # a ping
                kind, seq, data = parse_frame(frame)
                result.events += 1
                if kind == "gap":
                    result.gaps += 1
                    gap = json.loads(data)
                    result.last_seq = int(gap["next_seq"]) - 1
                    continue
                if seq is not None:
                    if result.last_seq >= 0 and seq != result.last_seq + 1:
                        result.seqs_ok = False
                    result.last_seq = seq
                if kind in ("stdout", "stderr"):
                    result.output_bytes += len(data)
                    if keep_text:
                        texts.append(json.loads(data).get("text", ""))
                elif kind == "init":
                    result.run_id = json.loads(data).get("run_id")
                    if on_init is not None and result.run_id:
                        on_init(result.run_id)
                elif kind in TERMINAL:
                    result.terminal = json.loads(data)
            del buffer[:start]
            if result.terminal is not None:
                break
            if (cut_after_bytes is not None and result.output_bytes >= cut_after_bytes) or (
                cut_after_events is not None and result.events >= cut_after_events
            ):
                result.cut = True
                break
        result.output_text = "".join(texts)


def parse_frame(frame: bytes) -> tuple[str, int | None, bytes]:
    kind, seq, data = "message", None, b""
    for line in frame.split(b"\n"):
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"id: "):
            seq = int(line[4:])
        elif line.startswith(b"data: "):
            data = line[6:]
    return kind, seq, data


# ----- shared by both modes ------------------------------------------------------------------------


class Pauser:
    """A barrier between operations: `hold` waits until every active worker is parked."""

    def __init__(self, workers: int) -> None:
        self.active = workers
        self.parked = 0
        self._go = asyncio.Event()
        self._go.set()
        self._all = asyncio.Event()

    async def park(self) -> None:
        if self._go.is_set():
            return
        self.parked += 1
        self._check()
        await self._go.wait()
        self.parked -= 1

    def retire(self) -> None:
        self.active -= 1
        self._check()

    def _check(self) -> None:
        if self.parked >= self.active:
            self._all.set()

    async def hold(self, timeout_s: float) -> bool:
        self._go.clear()
        self._all.clear()
        self._check()
        try:
            async with asyncio.timeout(timeout_s):
                await self._all.wait()
            return True
        except TimeoutError:
            return False

    def release(self) -> None:
        self._go.set()


@dataclass
class Ctx:
    api: Api
    probe: Probe
    mark: str  # `sleep {mark}`: 1000 s, with digits that are this soak's own
    pauser: Pauser
    created: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    live: set[str] = field(default_factory=set)
    ops: Counter[str] = field(default_factory=Counter)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    durations: dict[str, list[float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    leaked_during: dict[int, Leftover] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def sleep(self) -> str:
        return f"sleep {self.mark}"

    def outcome(self, kind: str, label: str, seconds: float) -> None:
        self.ops[kind] += 1
        self.outcomes.setdefault(kind, Counter())[label] += 1
        self.durations.setdefault(kind, []).append(seconds)

    async def create(self, labels: dict[str, str] | None = None) -> str | None:
        for attempt in range(20):
            status, body = await self.api.call(
                "POST", "/session", "POST /session", {"labels": labels or {"soak": "1"}}, expect=frozenset({429})
            )
            if status == 200 and isinstance(body, dict):
                session_id = str(body["session_id"])
                self.created.add(session_id)
                self.live.add(session_id)
                return session_id
            if status != 429:
                return None
            await asyncio.sleep(0.2 * (attempt + 1))
        return None

    async def delete(self, session_id: str, expect: frozenset[int] = frozenset()) -> tuple[int, Any]:
        status, body = await self.api.call("DELETE", f"/session/{session_id}", "DELETE /session/{id}", expect=expect)
        if status in (200, 404):
            self.live.discard(session_id)
            self.deleted.add(session_id)
        return status, body

    async def run(
        self, session_id: str, code: str, expect: frozenset[int] = frozenset({409, 410}), **fields: Any
    ) -> RunResult:
        cut_bytes = fields.pop("cut_after_bytes", None)
        keep_text = bool(fields.pop("keep_text", False))
        body = {"code": code, "timeout_ms": DEFAULT_RUN_TIMEOUT_MS, **fields}
        return await self.api.stream(
            "POST",
            f"/session/{session_id}/run",
            RUN_ROUTE,
            body,
            expect=expect,
            cut_after_bytes=cut_bytes,
            keep_text=keep_text,
        )

    async def background(self, session_id: str, code: str, **fields: Any) -> str | None:
        body = {"code": code, "background": True, "timeout_ms": DEFAULT_RUN_TIMEOUT_MS, **fields}
        status, data = await self.api.call(
            "POST", f"/session/{session_id}/run", RUN_ROUTE + " (background)", body, expect=frozenset({409, 410})
        )
        return str(data["run_id"]) if status == 202 and isinstance(data, dict) else None

    async def events(self, session_id: str, run_id: str, after: int | None = None, **options: Any) -> RunResult:
        headers = {"Last-Event-ID": str(after)} if after is not None else None
        return await self.api.stream(
            "GET",
            f"/session/{session_id}/runs/{run_id}/events",
            "GET /session/{id}/runs/{run_id}/events",
            expect=frozenset({404}),
            headers=headers,
            **options,
        )

    async def interrupt(self, session_id: str, body: dict[str, str] | None = None) -> int:
        status, _ = await self.api.call(
            "POST",
            f"/session/{session_id}/interrupt",
            "POST /session/{id}/interrupt",
            body,
            expect=frozenset({409, 410}),
        )
        return status

    async def stdin(self, session_id: str, run_id: str, data: str, eof: bool = False) -> int:
        status, _ = await self.api.call(
            "POST",
            f"/session/{session_id}/runs/{run_id}/stdin",
            "POST /session/{id}/runs/{run_id}/stdin",
            {"data": data, "eof": eof},
            expect=frozenset({409}),
        )
        return status

    async def run_when_free(self, session_id: str, code: str, within_s: float = 15.0) -> RunResult:
        """A run, retried while the session is still busy with an interrupted one."""
        deadline = time.monotonic() + within_s
        while True:
            result = await self.run(session_id, code)
            if result.code != "SESSION_BUSY" or time.monotonic() > deadline:
                return result
            await asyncio.sleep(0.1)


async def sampler(ctx: Ctx, interval_s: float, stop: asyncio.Event, extra: Callable[[], dict[str, Any]]) -> None:
    """Every `interval_s`: park the workers, drop the client's connections, take a sample."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval_s):
                await stop.wait()
        if stop.is_set():
            return
        await take_sample(ctx, extra)


async def take_sample(ctx: Ctx, extra: Callable[[], dict[str, Any]], label: str = "") -> dict[str, Any]:
    quiesced = await ctx.pauser.hold(60.0)
    try:
        retained = await retained_logs(ctx) if quiesced else None
        if quiesced:
            await ctx.api.reset()
            await asyncio.sleep(0.3)  # the daemon sees the connections close
        sample = await asyncio.to_thread(sample_now, ctx, quiesced, extra())
        sample["retained_logs_kb"] = retained // 1024 if retained is not None else None
        if retained is not None and sample["rss_kb"] is not None:
            sample["rss_minus_logs_kb"] = sample["rss_kb"] - retained // 1024
        if label:
            sample["label"] = label
        ctx.samples.append(sample)
        log(
            f"t={sample['t_s']:.0f}s ops={sample['ops']} live={sample['live_sessions']} rss={sample['rss_kb']} kB "
            f"anon={sample['rss_anon_kb']} kB logs~{sample['retained_logs_kb']} kB fds={sample['fds']} "
            f"tree={sample['tree']} "
            f"leaked={sample['leaked']}{'' if quiesced else ' (NOT quiesced)'}"
        )
        return sample
    finally:
        ctx.pauser.release()


async def retained_logs(ctx: Ctx) -> int:
    """What the live sessions' newest runs may keep in their logs (each at most a window, 1 MiB by
    default): the output of the newest run of each, capped. RSS moves with it, a leak does not."""
    gate = asyncio.Semaphore(10)

    async def newest(session_id: str) -> int:
        async with gate:
            _, body = await ctx.api.call("GET", f"/session/{session_id}/runs", "GET /session/{id}/runs (sample)")
        runs = body.get("runs") if isinstance(body, dict) else None
        return min(int(runs[0].get("output_bytes", 0)), RUN_LOG_BYTES) if runs else 0

    return sum(await asyncio.gather(*(newest(sid) for sid in sorted(ctx.live))))


def sample_now(ctx: Ctx, quiesced: bool, extra: dict[str, Any]) -> dict[str, Any]:
    figures = ctx.probe.figures()
    no_live = quiesced and not ctx.live
    leftovers = ctx.probe.leftovers(set(ctx.deleted), 0 if no_live else None)
    for item in leftovers:
        ctx.leaked_during.setdefault(item.pid, item)
    return {
        "t_s": round(time.monotonic() - ctx.started, 1),
        "quiesced": quiesced,
        "ops": sum(ctx.ops.values()),
        "live_sessions": len(ctx.live),
        **figures,
        "leaked": len(leftovers),
        **extra,
    }


def minute_sample(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first quiesced sample taken after the first minute (else the last one)."""
    usable = [s for s in samples if s.get("quiesced") and s.get("label") is None]
    after = [s for s in usable if s["t_s"] >= FIRST_MINUTE_S]
    return after[0] if after else (usable[-1] if usable else None)


def flatness(samples: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Whether every quiesced sample after the first minute is within FLAT_PCT of the first of them
    (a leak grows: the trend, per minute, is given too)."""
    usable = [s for s in samples if s.get("quiesced") and s.get("label") is None and s.get(key) is not None]
    after = [s for s in usable if s["t_s"] >= FIRST_MINUTE_S]
    if len(after) < 2:
        return {"verdict": "not enough samples after the first minute", "flat": None}
    ref = after[0][key]
    values = [s[key] for s in after]
    worst = max(values, key=lambda v: abs(v - ref))
    deviation = 100.0 * (worst - ref) / ref if ref else 0.0
    times = [s["t_s"] for s in after]
    slope = statistics.linear_regression(times, values).slope * 60 if len(set(times)) > 1 else 0.0
    flat = abs(deviation) <= FLAT_PCT
    # A leak grows; a busy daemon's RSS also swings with what its allocator keeps. The trend over
    # the window (least squares) tells the two apart where the band alone cannot.
    trend_pct = 100.0 * slope * (times[-1] - times[0]) / 60 / ref if ref else 0.0
    return {
        "flat": flat,
        "verdict": f"{'flat' if flat else 'NOT flat'} within {FLAT_PCT:g}% after the first minute",
        "trend_over_window_pct": round(trend_pct, 2),
        "trend_within_5pct": abs(trend_pct) <= FLAT_PCT,
        "reference_t_s": after[0]["t_s"],
        "reference": ref,
        "min": min(values),
        "max": max(values),
        "last": values[-1],
        "worst_deviation_pct": round(deviation, 2),
        "end_vs_reference_pct": round(100.0 * (values[-1] - ref) / ref, 2) if ref else 0.0,
        "trend_per_min": round(slope, 2),
        "samples": len(values),
    }


def daemon_log_errors(path: Path | None) -> dict[str, Any]:
    if path is None or not path.exists():
        return {"errors": None}
    count = 0
    events: Counter[str] = Counter()
    examples: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        level = ""
        event = ""
        try:
            record = json.loads(line)
            level = str(record.get("level", ""))
            event = str(record.get("event", ""))
        except ValueError:
            if "Traceback" in line or " error" in line.lower():
                level, event = "error", line[:80]
        if level in ("error", "critical", "exception"):
            count += 1
            events[event] += 1
            if len(examples) < 5:
                examples.append(line[:600])
    return {"errors": count, "by_event": dict(events), "examples": examples}


# ----- hostile lifecycles --------------------------------------------------------------------------

HostileAction = Callable[[Ctx, str, int, int], Awaitable[tuple[str, bool]]]  # -> (label, deleted itself)


async def h_background_jobs_exit(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    s = ctx.sleep
    code = f"{s} & {s} & ({s} &); yes >/dev/null & disown -a; exit 3" if variant else f"{s} & yes & exit 0"
    return (await ctx.run(sid, code)).label, False


async def h_untagged_setsid_then_delete(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    s = ctx.sleep
    if variant:
        code = f"(env -u {SESSION_TAG} setsid {s} >/dev/null 2>&1 &); echo escaped"
    else:
        code = f"env -u {SESSION_TAG} setsid {s} >/dev/null 2>&1 & echo escaped"
    return (await ctx.run(sid, code)).label, False


async def h_env_i_setsid(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    s = ctx.sleep
    code = f"(env -i setsid {s} >/dev/null 2>&1 &); true" if variant else f"env -i setsid {s} & true"
    first = await ctx.run(sid, code)
    second = await ctx.run(sid, "true")
    return f"{first.label} / {second.label}", False


async def h_fork_bomb(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    # Bounded: a binary tree of depth 6 (127 processes, 64 leaves asleep), under `timeout -s KILL 8`
    # and the run's own 1.5 s timeout. Half the leaves leave the process group (setsid).
    leaf = f"if [ $((RANDOM % 2)) = 0 ]; then setsid {ctx.sleep}; else {ctx.sleep}; fi"
    bomb = f"b() {{ if [ $1 -le 0 ]; then {leaf}; return; fi; b $(($1 - 1)) & b $(($1 - 1)) & wait; }}; b 6"
    code = f"timeout -s KILL 8 bash -c '{bomb}'" if variant else bomb
    result = await ctx.run(sid, code, timeout_ms=1500)
    return result.label, False


async def h_exec_other(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    if variant == 0:
        return (await ctx.run(sid, f"exec {ctx.sleep}", timeout_ms=500)).label, False
    if variant == 1:
        return (await ctx.run(sid, "exec true")).label, False
    run_id = await ctx.background(sid, f"exec {ctx.sleep}")
    await asyncio.sleep(0.3)
    status, body = await ctx.delete(sid)
    return f"background {'started' if run_id else 'refused'}; DELETE {status} {state_of(body)}", True


async def h_kill9_self(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = f"{ctx.sleep} & kill -9 $$" if variant else "kill -9 $$"
    first = await ctx.run(sid, code)
    second = await ctx.run(sid, "true")
    return f"{first.label} / then {second.label}", False


async def h_stop_self(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    if variant == 0:
        return (await ctx.run(sid, "kill -STOP $$", timeout_ms=500)).label, False
    run_id = await ctx.background(sid, "kill -STOP $$")
    await asyncio.sleep(0.3)
    status, body = await ctx.delete(sid)
    return f"background {'started' if run_id else 'refused'}; DELETE {status} {state_of(body)}", True


async def h_close_std_fds(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = "exec 0<&- 1>&- 2>&-" if variant == 0 else "exec 1>&- 2>&-; echo lost; ls /nonexistent; true"
    first = await ctx.run(sid, code)
    second = await ctx.run(sid, "echo back")
    return f"{first.label} / then {second.label}", False


async def h_trap_int_timeout(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = f"trap '' INT; {ctx.sleep}" if variant == 0 else f"trap 'echo no' INT TERM; {ctx.sleep} & wait"
    first = await ctx.run(sid, code, timeout_ms=300)
    second = await ctx.run_when_free(sid, "trap - INT TERM; echo ok")
    return f"{first.label} / then {second.label}", False


async def h_set_e_false(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = "set -e; false" if variant == 0 else f"set -e; {ctx.sleep} & (exit 4)"
    first = await ctx.run(sid, code)
    second = await ctx.run(sid, "true")
    return f"{first.label} / then {second.label}", False


async def h_junk_status(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    codes = [
        'head -c 300000 /dev/urandom >"$__execd_dir/status"; echo after',  # garbled records
        "head -c 300000 /dev/zero | tr '\\0' x >\"$__execd_dir/status\"; echo after",  # a flood
        "printf 'a\\0b\\0c\\0d\\0e\\0f\\0g\\0' >\"$__execd_dir/status\"; echo after",  # forged, misaligned
        'rm -f "$__execd_dir/status"; echo after',  # no more FIFO
    ]
    first = await ctx.run(sid, codes[variant], timeout_ms=1500)
    second = await ctx.run_when_free(sid, "echo next")
    return f"{first.label} / then {second.label}", False


async def h_huge_output_disconnect(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = "yes hostile-output-line" if variant == 0 else "head -c 200000000 /dev/urandom | base64"
    first = await ctx.run(sid, code, cut_after_bytes=256 * 1024)
    second = await ctx.run_when_free(sid, "echo ok")
    return f"{first.label} / then {second.label}", False


async def h_interrupt_storm(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    run_id = await ctx.background(sid, f"trap 'echo int' INT; {ctx.sleep}; {ctx.sleep}" if variant else ctx.sleep)
    if run_id is None:
        return "background refused", False
    signals = ["SIGINT", "SIGTERM", "SIGKILL"]
    bodies: list[dict[str, str] | None] = []
    for k in range(30):
        body: dict[str, str] = {"signal": signals[k % 3]}
        if k % 4 == 1:
            body["run_id"] = run_id
        elif k % 4 == 2:
            body["run_id"] = "not-this-run"
        bodies.append(body if k % 5 else None)
    statuses = await asyncio.gather(*(ctx.interrupt(sid, body) for body in bodies))
    result = await ctx.events(sid, run_id)
    accepted = sum(1 for status in statuses if status == 202)
    return f"{accepted}/30 accepted; {result.label}", False


async def h_stdin_left_open(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    run_id = f"stdin-{i}"
    if variant == 0:
        started = await ctx.background(sid, "cat; echo done", stdin="stream", run_id=run_id)
        if started is not None:
            await ctx.stdin(sid, run_id, "hello\n")
        status, body = await ctx.delete(sid)
        return f"DELETE with stdin open: {status} {state_of(body)}", True
    task = asyncio.create_task(
        ctx.api.stream(
            "POST",
            f"/session/{sid}/run",
            RUN_ROUTE,
            {"code": "read x; read y; echo got $x", "stdin": "stream", "run_id": run_id, "timeout_ms": 500},
            expect=frozenset({409, 410}),
        )
    )
    await asyncio.sleep(0.1)
    await ctx.stdin(sid, run_id, "one\n")  # 404 RUN_NOT_FOUND if the POST is not in yet: expected
    result = await task
    return result.label, False


async def h_delete_mid_run(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = "yes | head -c 50000000; sleep 5" if variant == 0 else f"{ctx.sleep} & {ctx.sleep}"
    task = asyncio.create_task(ctx.run(sid, code))
    await asyncio.sleep(0.2)
    status, body = await ctx.delete(sid)
    result = await task
    return f"{result.label}; DELETE {status} {state_of(body)}", True


async def h_concurrent_runs(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    results = await asyncio.gather(*(ctx.run(sid, "sleep 0.3; echo x") for _ in range(6)))
    labels = Counter(result.label for result in results)
    return ", ".join(f"{n}x {label}" for label, n in sorted(labels.items())), False


async def h_double_delete(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    if variant:
        await ctx.run(sid, f"{ctx.sleep} &")
    first, _ = await ctx.delete(sid)
    gone = frozenset({404})
    second, _ = await ctx.delete(sid, expect=gone)
    run = await ctx.run(sid, "true", expect=gone)
    interrupt, _ = await ctx.api.call("POST", f"/session/{sid}/interrupt", "POST /session/{id}/interrupt", None, gone)
    get, _ = await ctx.api.call("GET", f"/session/{sid}", "GET /session/{id}", None, gone)
    return f"DELETE {first}, again {second}, run {run.status}, interrupt {interrupt}, GET {get}", True


async def h_unset_tag_nohup(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = f"unset {SESSION_TAG}; nohup {ctx.sleep} >/dev/null 2>&1 & disown; echo ok"
    if variant:
        code = f"export -n {SESSION_TAG}; ( {ctx.sleep} & ) ; echo ok"
    return (await ctx.run(sid, code)).label, False


async def h_kill_group(ctx: Ctx, sid: str, variant: int, i: int) -> tuple[str, bool]:
    code = f"{ctx.sleep} & kill -9 0" if variant == 0 else "kill -TERM $$"
    first = await ctx.run(sid, code)
    return first.label, False


HOSTILE: list[tuple[str, HostileAction, int]] = [  # name, action, number of variants
    ("background_jobs_exit", h_background_jobs_exit, 2),
    ("untagged_setsid_then_delete", h_untagged_setsid_then_delete, 2),
    ("env_i_setsid", h_env_i_setsid, 2),
    ("fork_bomb_bounded", h_fork_bomb, 2),
    ("exec_other", h_exec_other, 3),
    ("kill9_self", h_kill9_self, 2),
    ("stop_self", h_stop_self, 2),
    ("close_std_fds", h_close_std_fds, 2),
    ("trap_int_timeout", h_trap_int_timeout, 2),
    ("set_e_false", h_set_e_false, 2),
    ("junk_status_fifo", h_junk_status, 4),
    ("huge_output_disconnect", h_huge_output_disconnect, 2),
    ("interrupt_storm", h_interrupt_storm, 2),
    ("stdin_left_open", h_stdin_left_open, 2),
    ("delete_mid_run", h_delete_mid_run, 2),
    ("concurrent_runs", h_concurrent_runs, 1),
    ("double_delete", h_double_delete, 2),
    ("unset_tag_nohup", h_unset_tag_nohup, 2),
    ("kill_process_group", h_kill_group, 2),
]


def state_of(body: Any) -> str:
    return str(body.get("state")) if isinstance(body, dict) else "-"


async def hostile_lifecycle(ctx: Ctx, i: int) -> None:
    name, action, variants = HOSTILE[i % len(HOSTILE)]
    variant = (i // len(HOSTILE)) % variants
    kind = f"{name}#{variant}"
    start = time.monotonic()
    sid = await ctx.create({"soak": "hostile", "kind": kind})
    if sid is None:
        ctx.outcome(kind, "create failed", time.monotonic() - start)
        return
    deleted = False
    try:
        async with asyncio.timeout(LIFECYCLE_TIMEOUT_S):
            label, deleted = await action(ctx, sid, variant, i)
    except TimeoutError:
        label = "lifecycle timed out"
        ctx.api.stats.anomaly(f"{kind} in session {sid}: no end within {LIFECYCLE_TIMEOUT_S:g} s")
    if not deleted:
        status, body = await ctx.delete(sid)
        label += f"; DELETE {status} {state_of(body)}"
    ctx.outcome(kind, label, time.monotonic() - start)


async def hostile(ctx: Ctx, count: int, workers: int) -> None:
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        try:
            while next_index < count:
                await ctx.pauser.park()
                if next_index >= count:
                    return
                i = next_index
                next_index += 1
                await hostile_lifecycle(ctx, i)
                if (i + 1) % 100 == 0:
                    log(f"{i + 1} lifecycles started")
        finally:
            ctx.pauser.retire()

    await asyncio.gather(*(worker() for _ in range(workers)))


# ----- normal soak ---------------------------------------------------------------------------------

SoakOp = Callable[[Ctx, list[str], int], Awaitable[str]]


def pick(pool: list[str]) -> str:
    return random.choice(pool)


async def op_small(ctx: Ctx, pool: list[str], n: int) -> str:
    return (await ctx.run(pick(pool), f"echo hello {n}; pwd", expect=frozenset())).label


async def op_env_cwd(ctx: Ctx, pool: list[str], n: int) -> str:
    result = await ctx.run(
        pick(pool), 'echo "$SOAK_X" "$PWD"', expect=frozenset(), env={"SOAK_X": str(n)}, cwd="/tmp", keep_text=True
    )
    if result.terminal is not None and f"{n} /tmp" not in result.output_text:
        ctx.api.stats.anomaly(f"env/cwd run printed {result.output_text!r}")
    return result.label


async def op_big(ctx: Ctx, pool: list[str], n: int) -> str:
    size = random.randint(1, 10) * MB
    result = await ctx.run(pick(pool), f"head -c {size} /dev/zero | tr '\\0' a", expect=frozenset())
    if result.terminal is not None and (result.output_bytes < size or result.terminal.get("output_truncated")):
        ctx.api.stats.anomaly(f"a {size}-byte run sent {result.output_bytes} bytes: {result.terminal}")
    return result.label


async def op_background_reattach(ctx: Ctx, pool: list[str], n: int) -> str:
    sid = pick(pool)
    run_id = await ctx.background(sid, "for i in $(seq 1 40); do echo line $i; sleep 0.02; done")
    if run_id is None:
        return "background refused"
    first = await ctx.events(sid, run_id, cut_after_events=6)
    await asyncio.sleep(0.1)
    rest = await ctx.events(sid, run_id, after=first.last_seq if first.last_seq >= 0 else None)
    if rest.status == 200 and first.last_seq >= 0 and rest.events and not rest.gaps and not rest.seqs_ok:
        ctx.api.stats.anomaly(f"reattach after {first.last_seq} repeated or skipped events")
    _, run = await ctx.api.call("GET", f"/session/{sid}/runs/{run_id}", "GET /session/{id}/runs/{run_id}")
    return f"{rest.label}; run {state_of(run)}"


async def op_interrupt(ctx: Ctx, pool: list[str], n: int) -> str:
    sid = pick(pool)
    run_id = f"int-{n}"
    task = asyncio.create_task(ctx.run(sid, "sleep 30", expect=frozenset(), run_id=run_id))
    status = 0
    for _ in range(20):
        await asyncio.sleep(0.1)
        status = await ctx.interrupt(sid, {"run_id": run_id})
        if status == 202 or task.done():
            break
    result = await task
    return f"interrupt {status}; {result.label}"


async def op_timeout(ctx: Ctx, pool: list[str], n: int) -> str:
    return (await ctx.run(pick(pool), "sleep 30", expect=frozenset(), timeout_ms=300)).label


async def op_stdin(ctx: Ctx, pool: list[str], n: int) -> str:
    sid = pick(pool)
    run_id = f"in-{n}"
    if await ctx.background(sid, "cat; echo end", stdin="stream", run_id=run_id) is None:
        return "background refused"
    for k in range(3):
        await ctx.stdin(sid, run_id, f"chunk {k} of {n}\n", eof=k == 2)
    result = await ctx.events(sid, run_id, keep_text=True)
    if result.terminal is not None and f"chunk 2 of {n}\nend" not in result.output_text:
        ctx.api.stats.anomaly(f"stdin run read back {result.output_text[-200:]!r}")
    return result.label


async def op_churn(ctx: Ctx, pool: list[str], n: int) -> str:
    index = random.randrange(len(pool))
    status, _ = await ctx.delete(pool[index])
    fresh = await ctx.create()
    if fresh is None:
        pool.pop(index)
        return f"DELETE {status}; create failed"
    pool[index] = fresh
    return f"DELETE {status}; created"


async def op_list(ctx: Ctx, pool: list[str], n: int) -> str:
    status, body = await ctx.api.call("GET", "/session", "GET /session")
    return f"{status}" if isinstance(body, dict) and "sessions" in body else f"{status} no list"


async def op_resources(ctx: Ctx, pool: list[str], n: int) -> str:
    status, body = await ctx.api.call("GET", f"/session/{pick(pool)}", "GET /session/{id}")
    ok = isinstance(body, dict) and isinstance(body.get("resources"), dict)
    return f"{status} {'with' if ok else 'WITHOUT'} resources"


async def op_runs_list(ctx: Ctx, pool: list[str], n: int) -> str:
    sid = pick(pool)
    status, body = await ctx.api.call("GET", f"/session/{sid}/runs", "GET /session/{id}/runs")
    runs = body.get("runs", []) if isinstance(body, dict) else []
    if runs:
        await ctx.api.call("GET", f"/session/{sid}/runs/{runs[0]['run_id']}", "GET /session/{id}/runs/{run_id}")
    return f"{status}"


async def op_between_runs(ctx: Ctx, pool: list[str], n: int) -> str:
    sid = pick(pool)
    first = await ctx.run(sid, "(sleep 0.05; echo late) &", expect=frozenset())
    await asyncio.sleep(0.15)
    second = await ctx.run(sid, "true", expect=frozenset())
    return f"{first.label} / {second.label}"


SOAK_OPS: list[tuple[str, SoakOp, int]] = [  # name, op, weight
    ("small_run", op_small, 25),
    ("env_cwd_run", op_env_cwd, 5),
    ("big_output_1_10MB", op_big, 8),
    ("background_reattach", op_background_reattach, 10),
    ("interrupt", op_interrupt, 6),
    ("timeout", op_timeout, 6),
    ("stdin_stream", op_stdin, 8),
    ("delete_and_create", op_churn, 10),
    ("list_sessions", op_list, 5),
    ("session_resources", op_resources, 8),
    ("runs_list_and_get", op_runs_list, 5),
    ("between_runs_output", op_between_runs, 4),
]


async def soak(ctx: Ctx, minutes: float, workers: int, per_worker: int) -> None:
    deadline = time.monotonic() + minutes * 60
    names = [name for name, _, _ in SOAK_OPS]
    ops = {name: op for name, op, _ in SOAK_OPS}
    weights = [weight for _, _, weight in SOAK_OPS]
    counter = 0

    async def worker(w: int) -> None:
        nonlocal counter
        pool: list[str] = []
        try:
            for _ in range(per_worker):
                sid = await ctx.create({"soak": "normal", "worker": str(w)})
                if sid is not None:
                    pool.append(sid)
            while time.monotonic() < deadline:
                await ctx.pauser.park()
                if not pool:
                    sid = await ctx.create({"soak": "normal", "worker": str(w)})
                    if sid is None:
                        await asyncio.sleep(1)
                        continue
                    pool.append(sid)
                name = random.choices(names, weights)[0]
                counter += 1
                start = time.monotonic()
                try:
                    async with asyncio.timeout(LIFECYCLE_TIMEOUT_S):
                        label = await ops[name](ctx, pool, counter)
                except TimeoutError:
                    label = "timed out"
                    ctx.api.stats.anomaly(f"soak op {name} took more than {LIFECYCLE_TIMEOUT_S:g} s")
                ctx.outcome(name, label, time.monotonic() - start)
        finally:
            for sid in pool:
                await ctx.delete(sid)
            ctx.pauser.retire()  # after its DELETEs: a sample never sees them half done

    await asyncio.gather(*(worker(w) for w in range(workers)))


# ----- driver --------------------------------------------------------------------------------------


async def warm_up(ctx: Ctx) -> None:
    """One session through the paths that open something once (the pid counter's fd, threads...)."""
    sid = await ctx.create({"soak": "warm-up"})
    if sid is None:
        raise RuntimeError("the warm-up could not create a session")
    await ctx.run(sid, "echo warm; true", expect=frozenset())
    await ctx.run(sid, "sleep 5", expect=frozenset(), timeout_ms=200)
    run_id = await ctx.background(sid, "cat", stdin="stream", run_id="warm-stdin")
    if run_id:
        await ctx.stdin(sid, run_id, "x\n", eof=True)
        await ctx.events(sid, run_id)
    await ctx.api.call("GET", f"/session/{sid}", "GET /session/{id}")
    await ctx.delete(sid)
    ctx.ops.clear()


def find_daemon_pid(url: str) -> int | None:
    port = urlsplit(url).port or 44772
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


async def drive(args: argparse.Namespace, url: str, token: str | None, daemon_pid: int | None) -> dict[str, Any]:
    stats = Stats()
    mark = f"1000.{secrets.randbelow(10**9):09d}"
    workers = args.workers
    ctx = Ctx(api=Api(url, token, stats), probe=Probe(daemon_pid, mark), mark=mark, pauser=Pauser(workers))
    await ctx.api.open()
    fresh = await asyncio.to_thread(ctx.probe.figures)
    try:
        await warm_up(ctx)
        await ctx.api.reset()
        await asyncio.sleep(0.5)
        ctx.started = time.monotonic()
        start = await asyncio.to_thread(ctx.probe.figures)
        log(f"start: rss {start['rss_kb']} kB, anon {start['rss_anon_kb']} kB, fds {start['fds']} {start['fd_kinds']}")
        stop = asyncio.Event()

        def extra() -> dict[str, Any]:
            return {"requests": stats.requests, "server_errors": sum(stats.server_errors.values())}

        sampling = asyncio.create_task(sampler(ctx, args.interval_s, stop, extra))
        try:
            if args.mode == "hostile":
                await hostile(ctx, args.count, workers)
            else:
                await soak(ctx, args.minutes, workers, args.sessions_per_worker)
        finally:
            stop.set()
            await sampling
        elapsed = time.monotonic() - ctx.started
        # The end: nothing of ours is live; the client lets go of its connections.
        for sid in list(ctx.live):
            await ctx.delete(sid)
        await ctx.api.close()
        await asyncio.sleep(1.0)
        end = await asyncio.to_thread(ctx.probe.figures)
        leftovers = await asyncio.to_thread(ctx.probe.leftovers, set(ctx.created), 0)
    finally:
        await ctx.api.close()
    minute = minute_sample(ctx.samples)
    leaked_fds = end["fds"] - start["fds"] if end["fds"] is not None and start["fds"] is not None else None
    summary: dict[str, Any] = {
        "mode": args.mode,
        "parameters": {
            "count": args.count if args.mode == "hostile" else None,
            "minutes": args.minutes if args.mode == "soak" else None,
            "workers": workers,
            "sessions_per_worker": args.sessions_per_worker if args.mode == "soak" else None,
            "interval_s": args.interval_s,
        },
        "elapsed_s": round(elapsed, 1),
        "daemon_pid": daemon_pid,
        "daemon_code": daemon_code(),
        "operations": {
            "total": sum(ctx.ops.values()),
            "sessions_created": len(ctx.created),
            "requests": stats.requests,
            "by_kind": {
                kind: {
                    "n": ctx.ops[kind],
                    "p50_s": round(statistics.median(ctx.durations[kind]), 2),
                    "max_s": round(max(ctx.durations[kind]), 2),
                    "outcomes": dict(ctx.outcomes[kind].most_common()),
                }
                for kind in sorted(ctx.ops)
            },
        },
        "responses": {
            "ok": dict(sorted(stats.ok.items())),
            "expected_errors": dict(sorted(stats.expected.items())),
            "server_errors_5xx": dict(sorted(stats.server_errors.items())),
            "unexpected": dict(sorted(stats.unexpected.items())),
        },
        "terminal_events": dict(stats.terminals.most_common()),
        "anomaly_count": stats.anomaly_count,
        "anomalies": stats.anomalies,
        "figures": {
            key: {
                "fresh": fresh[key],
                "start": start[key],
                "one_minute": minute[key] if minute else None,
                "end": end[key],
            }
            for key in ("rss_kb", "rss_anon_kb", "fds", "tree", "cgroups")
        },
        "fd_kinds": {"start": start["fd_kinds"], "end": end["fd_kinds"]},
        "leaked_fds": leaked_fds,
        "leaked_processes": {
            "end": [asdict(item) for item in leftovers],
            "seen_during": [asdict(item) for item in list(ctx.leaked_during.values())[:50]],
            "seen_during_count": len(ctx.leaked_during),
        },
        "samples": ctx.samples,
    }
    if args.mode == "soak":
        keys = ("rss_kb", "rss_anon_kb", "fds", "rss_minus_logs_kb")
        summary["flatness"] = {key: flatness(ctx.samples, key) for key in keys}
    kill_leftovers(leftovers)
    kill_leftovers(list(ctx.leaked_during.values()))
    summary["cgroup_root"] = ctx.probe.cgroup_root
    summary["_created"] = sorted(ctx.created)
    summary["_mark"] = mark
    return summary


def daemon_code() -> dict[str, str]:
    """The commit of this checkout, and a hash of the uncommitted changes under execd/ (the code a
    daemon this script starts runs)."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, timeout=30)
        return done.stdout.decode(errors="replace") if done.returncode == 0 else ""

    diff = git("diff", "HEAD", "--", "execd")
    untracked = git("ls-files", "--others", "--exclude-standard", "--", "execd").split()
    digest = hashlib.sha256(diff.encode())
    for name in sorted(untracked):
        with contextlib.suppress(OSError):
            digest.update(name.encode() + (ROOT / name).read_bytes())
    dirty = bool(diff or untracked)
    return {"commit": git("rev-parse", "HEAD").strip(), "execd_changes": digest.hexdigest()[:12] if dirty else ""}


def verdict(summary: dict[str, Any]) -> int:
    leaks = summary["leaked_processes"]
    leaked = bool(leaks["end"] or leaks["seen_during_count"] or leaks.get("after_stop"))
    cgroups_left = (summary["figures"]["cgroups"]["end"] or 0) > 0 or summary.get("cgroup_root_left_after_stop")
    if leaked or cgroups_left or (summary["leaked_fds"] or 0) > 0 or summary["responses"]["server_errors_5xx"]:
        return 1
    flat = summary.get("flatness", {})
    not_flat = any(flat.get(key, {}).get("flat") is False for key in ("rss_kb", "rss_anon_kb", "fds"))
    if summary["anomaly_count"] or summary["responses"]["unexpected"] or not_flat:
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mode", choices=["hostile", "soak"])
    parser.add_argument("--count", type=int, default=1000, help="hostile lifecycles (hostile mode)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to soak (soak mode)")
    parser.add_argument("--workers", type=int, help="concurrent workers (default 20 hostile, 50 soak)")
    parser.add_argument("--sessions-per-worker", type=int, default=2, help="sessions each soak worker keeps")
    parser.add_argument("--interval-s", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--url", help="a running daemon (default: start one)")
    parser.add_argument("--token-file", type=Path, help="its access token (with --url)")
    parser.add_argument("--daemon-pid", type=int, help="its pid (with --url; default: the port's listener)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the summary to PATH")
    parser.add_argument("--keep-logs", action="store_true", help="keep the daemon's log (path printed)")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 20 if args.mode == "hostile" else 50
    workdir = Path(tempfile.mkdtemp(prefix="execd-soak-"))
    daemon: Daemon | None = None
    summary: dict[str, Any] | None = None
    try:
        if args.url:
            token = args.token_file.read_text().strip() if args.token_file else None
            url = args.url
            daemon_pid = args.daemon_pid or find_daemon_pid(url)
            if daemon_pid is None:
                log("the daemon's pid is unknown: no RSS, fd or process-tree figures (give --daemon-pid)")
        else:
            token = secrets.token_hex(16)
            token_file = workdir / "token"
            token_file.write_text(token + "\n")
            token_file.chmod(0o600)
            env = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
            env.update(
                EXECD_ACCESS_TOKEN_FILE=str(token_file),
                EXECD_MAX_SESSIONS="2048",
                EXECD_LOG_FORMAT="json",
                EXECD_LOG_LEVEL="info",
            )
            daemon = Daemon("soak", workdir, env)
            daemon.start()
            url, daemon_pid = f"http://{HOST}:{daemon.port}", daemon.pid
            log(f"daemon pid {daemon_pid} on {url}, log {daemon.log_path}")
        summary = asyncio.run(drive(args, url, token, daemon_pid))
    except (OSError, RuntimeError, aiohttp.ClientError) as exc:
        log(f"soak failed: {exc!r}")
        return 2
    finally:
        created: set[str] = set(summary.pop("_created", [])) if summary else set()
        mark = summary.pop("_mark", "") if summary else ""
        if daemon is not None:
            daemon.stop()
            if summary is not None:
                summary["daemon_problems"] = daemon.problems
                summary["daemon_log"] = daemon_log_errors(daemon.log_path)
        if summary is not None and daemon is not None and summary.get("cgroup_root"):
            summary["cgroup_root_left_after_stop"] = os.path.exists(summary["cgroup_root"])
        if summary is not None and mark:
            after = Probe(None, mark).leftovers(created, 0)
            summary["leaked_processes"]["after_stop"] = [asdict(item) for item in after]
            kill_leftovers(after)
        if args.keep_logs:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    status = verdict(summary)
    summary["exit_status"] = status
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return status


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
