"""A run that belongs to nobody never waits for a reader, and its log stays within its window:
memory is measured on a real `execd serve` process with psutil while the runs print."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import pytest

from tests.conftest import parse_sse
from tests.conftest import wait_for as poll
from tests.helpers_control import DaemonProcess, subprocess_daemons

MB = 1024 * 1024
WINDOW = 1024 * 1024  # EXECD_RUN_LOG_BYTES, the default
# Lines of 1023 x's and a newline: ASCII, and JSON escapes only the newline.
PRINT = "yes \"$(printf 'x%.0s' {{1..1023}})\" | head -c {size}"


@pytest.fixture
async def daemon_process() -> AsyncIterator[Callable[..., Any]]:
    async for start in subprocess_daemons():
        yield start


class RssSampler:
    """The daemon's RSS every 20 ms while something runs: the peak above the baseline."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._task = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            await asyncio.sleep(0.02)

    def stop(self) -> int:
        self._task.cancel()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


async def start_background(daemon: DaemonProcess, code: str) -> tuple[str, str]:
    assert daemon.http is not None
    session = await daemon.create()
    sid = session["session_id"]
    async with daemon.http.post(f"/session/{sid}/run", json={"code": code, "background": True}) as response:
        assert response.status == 202, await response.text()
        return sid, (await response.json())["run_id"]


async def run_object(daemon: DaemonProcess, sid: str, rid: str) -> dict[str, Any]:
    assert daemon.http is not None
    async with daemon.http.get(f"/session/{sid}/runs/{rid}") as response:
        run: dict[str, Any] = await response.json()
        return run


async def completed(daemon: DaemonProcess, sid: str, rid: str, timeout: float) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        run = await run_object(daemon, sid, rid)
        return run if run["state"] == "completed" else None

    run: dict[str, Any] = await poll(done, timeout, f"run {rid} completed", interval=0.05)
    return run


@pytest.mark.timeout(180)
async def test_a_background_run_printing_a_gigabyte_with_no_reader_finishes_in_bounded_memory(
    daemon_process: Callable[..., Any],
) -> None:
    # Above the default output limit (256 MiB), so that every byte becomes an event to drop.
    daemon: DaemonProcess = await daemon_process(EXECD_MAX_OUTPUT_BYTES="2000000000")
    size = 1_000_000_000
    sampler = RssSampler(daemon.proc.pid)
    sid, rid = await start_background(daemon, PRINT.format(size=size))
    run = await completed(daemon, sid, rid, timeout=150)
    growth = sampler.stop()
    print(f"\n1 GB background run: daemon RSS grew {growth / MB:.1f} MB, dropped {run['dropped_bytes']} bytes")
    assert growth <= WINDOW + 16 * MB
    assert run["output_bytes"] == size and run["exit_code"] == 0
    assert daemon.http is not None
    async with daemon.http.get(f"/session/{sid}/runs/{rid}/events") as response:
        replay = await response.read()
    events = parse_sse(replay)
    assert [e.type for e in events[:2]] == ["init", "gap"] and events[-1].type == "execution_complete"
    gap = events[1].data
    assert gap["dropped_bytes"] == run["dropped_bytes"]
    kept = replay.split(b"\n\n", 2)[2]  # after init and the gap
    kept_frames = kept[: kept.rfind(b"id: ")]  # before the terminal event
    assert len(kept_frames) <= WINDOW
    # Every byte the run wrote went either into a dropped event or into a kept one: the text's wire
    # size (each 1,024-byte line gains one byte, its newline's escape) plus each event's envelope.
    kept_text = sum(len(e.data["text"]) for e in events if e.type == "stdout")
    dropped_text = size - kept_text
    assert dropped_text * 1025 // 1024 <= run["dropped_bytes"] <= dropped_text * 1025 // 1024 * 1.01


@pytest.mark.timeout(180)
async def test_a_hundred_background_runs_at_once_stay_within_a_hundred_windows(
    daemon_process: Callable[..., Any],
) -> None:
    daemon: DaemonProcess = await daemon_process(EXECD_MAX_SESSIONS="200")
    size = 20_000_000
    sessions = [await daemon.create() for _ in range(100)]
    sampler = RssSampler(daemon.proc.pid)
    assert daemon.http is not None
    runs = []
    for session in sessions:
        sid = session["session_id"]
        body = {"code": PRINT.format(size=size), "background": True}
        async with daemon.http.post(f"/session/{sid}/run", json=body) as response:
            runs.append((sid, (await response.json())["run_id"]))
    finished = [await completed(daemon, sid, rid, timeout=150) for sid, rid in runs]
    growth = sampler.stop()
    print(f"\n100 background runs x 20 MB: daemon RSS grew {growth / MB:.1f} MB")
    assert all(run["output_bytes"] == size and run["dropped_bytes"] > 0 for run in finished)
    assert growth <= 100 * WINDOW + 32 * MB
