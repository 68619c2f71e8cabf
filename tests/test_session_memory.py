"""A deleted session and its shell go when the last reference does, not at a later cycle
collection (a soak saw them pile up between collections)."""

from __future__ import annotations

import asyncio
import gc

from execd.registry import Session
from tests.conftest import Daemon


def live_sessions() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Session))


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
