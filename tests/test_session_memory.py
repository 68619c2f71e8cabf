"""A deleted session, its shell and its runs go when the last reference does, not at a later cycle
collection (a soak saw them pile up between collections)."""

from __future__ import annotations

import asyncio
import gc

from execd.registry import Session
from execd.run import Run
from execd.shell import Shell
from tests.conftest import Daemon


def live_sessions() -> int:
    """Sessions, shells and runs alive (each counted: a cycle would keep any of them)."""
    return sum(1 for obj in gc.get_objects() if isinstance(obj, (Session, Shell, Run)))


async def test_a_deleted_session_is_freed_without_the_cycle_collector(daemon: Daemon) -> None:
    gc.collect()
    before = live_sessions()
    gc.disable()
    try:
        for _ in range(5):
            session = await daemon.create()
            await daemon.run(session["session_id"], "echo hi")
            await daemon.delete(session["session_id"])
        await asyncio.sleep(0.1)  # the close's own tasks finish
        assert live_sessions() == before
    finally:
        gc.enable()
