"""The one termination ladder: polite signal -> grace -> SIGKILL -> await the exits and the reap.

Every path that ends something climbs it: an interrupt, a timeout or a run nobody reads any more
climb it from the first rung (the run's processes); DELETE, idle reaping, giving up on a stuck
shell and shutdown start at the SIGKILL sweep of the whole session. Each wait is on the processes'
exits (pidfds), bounded by a named timing from the settings, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from execd import process
from execd.cgroups import SessionCgroups


@dataclass(frozen=True)
class Timings:
    grace_s: float = 2.0  # polite signal -> SIGKILL of the run's processes (EXECD_INTERRUPT_GRACE_MS)
    kill_wait_s: float = 1.0  # SIGKILL -> the exits, or the shell is given up (EXECD_KILL_WAIT_MS)


async def climb_for_run(
    run_end: Callable[[], Awaitable[None]],
    timings: Timings,
    kill_run_processes: Callable[[], None],
    give_up: Callable[[], Awaitable[None]],
) -> None:
    """After the polite signal (the caller has sent it): `grace_s` later SIGKILL what the run
    started (even if the run has ended: its orphans go too), wait `kill_wait_s` for the run to end,
    then give up the shell (a session sweep)."""
    await asyncio.sleep(timings.grace_s)
    kill_run_processes()
    if await _within(run_end(), timings.kill_wait_s):
        return
    await give_up()


async def climb_for_process(
    pid: int, exited: Callable[[], Awaitable[object]], grace_s: float, timings: Timings
) -> bool:
    """For a process that has had its polite signal (the supervised command): `grace_s` for it to
    exit, then SIGKILL its process group and wait `kill_wait_s`. False if it is still there."""
    if await _within(exited(), grace_s):
        return True
    process.signal_pids([-pid, pid], signal.SIGKILL)  # its group first: what it started goes too
    return await _within(exited(), timings.kill_wait_s)


async def sweep_sessions(sessions: Mapping[str, int | None], timings: Timings, cgroups: SessionCgroups | None) -> bool:
    """SIGKILL every process of these sessions (session tag -> shell pid; their cgroups, where
    they have them) and wait for the exits, off the event loop (it reads /proc). False if
    something survived `kill_wait_s`."""
    if not sessions:
        return True
    return await asyncio.to_thread(process.kill_sessions, sessions, timings.kill_wait_s, cgroups)


def sweep_sessions_now(sessions: Mapping[str, int | None], timings: Timings, cgroups: SessionCgroups | None) -> bool:
    """The same, blocking: for a forced exit, where nothing may wait on the event loop."""
    return process.kill_sessions(sessions, min(timings.kill_wait_s, 0.5), cgroups)


async def _within(end: Awaitable[object], timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(end, timeout_s)
    except TimeoutError:
        return False
    return True
