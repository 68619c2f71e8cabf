"""Property: a stream cut at any points and resumed with Last-Event-ID reads exactly what one
uninterrupted read does, byte for byte, every seq once: for runs that interleave stdout and stderr,
whether they belong to nobody (background) or to their readers (on_disconnect "interrupt" with a
grace long enough to come back)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GAP_ID, assert_no_processes, parse_sse
from tests.helpers_control import served


@pytest.fixture(scope="module")
def daemon_url() -> Iterator[str]:
    session_ids: set[str] = set()
    with served("--log-level", "warning") as daemon:
        yield daemon.url
        session_ids = asyncio.run(_session_ids(daemon.url))
    assert_no_processes(session_ids)


async def _session_ids(url: str) -> set[str]:
    async with aiohttp.ClientSession(url) as http, http.get("/session") as response:
        return {s["session_id"] for s in (await response.json())["sessions"]}


def run_code(lines: int, pattern: list[bool], pause_every: int) -> str:
    """Numbered lines, each to stdout or stderr by `pattern`, a short pause now and then (so the
    cuts land while the run is live)."""
    steps = []
    for i in range(lines):
        target = ">&2" if pattern[i % len(pattern)] else ""
        steps.append(f"echo line-{i}-{'x' * (i % 7)} {target}")
        if pause_every and i % pause_every == pause_every - 1:
            steps.append("sleep 0.01")
    return "\n".join(steps)


async def cut_and_resume(url: str, code: str, cuts: list[int], belongs_to_readers: bool) -> None:
    async with aiohttp.ClientSession(url) as http:
        async with http.post("/session") as response:
            sid = (await response.json())["session_id"]
        if belongs_to_readers:
            first = await http.post(
                f"/session/{sid}/run", json={"code": code, "disconnect_grace_ms": 10_000, "run_id": "prop"}
            )
        else:
            await (
                await http.post(f"/session/{sid}/run", json={"code": code, "background": True, "run_id": "prop"})
            ).read()
            first = await http.get(f"/session/{sid}/runs/prop/events")
        pieces = []
        cursor: int | None = None
        response = first
        for cut in [*cuts, None]:
            assert response.status in (200, 204), await response.text()
            if response.status == 204:
                break
            raw = await (response.content.read() if cut is None else _read_upto(response, cut))
            response.close()
            complete = raw[: raw.rfind(b"\n\n") + 2] if b"\n\n" in raw else b""
            for block in complete.split(b"\n\n"):
                if block and not block.startswith(b":"):
                    pieces.append(block + b"\n\n")
            if pieces:
                cursor = parse_sse(pieces[-1])[0].id
            if cut is None:
                break
            headers = {"Last-Event-ID": str(cursor)} if cursor is not None else {}
            response = await http.get(f"/session/{sid}/runs/prop/events", headers=headers)
        async with http.get(f"/session/{sid}/runs/prop/events") as whole:
            expected = await whole.read()
        async with http.delete(f"/session/{sid}"):
            pass
    joined = b"".join(pieces)
    assert joined == expected
    ids = [event.id for event in parse_sse(joined)]
    assert GAP_ID not in ids and ids == list(range(len(ids)))
    assert parse_sse(joined)[-1].type == "execution_complete"


async def _read_upto(response: aiohttp.ClientResponse, limit: int) -> bytes:
    raw = b""
    while len(raw) < limit:
        chunk = await response.content.read(limit - len(raw))
        if not chunk:
            break
        raw += chunk
    return raw


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.integers(min_value=1, max_value=120),
    pattern=st.lists(st.booleans(), min_size=1, max_size=5),
    pause_every=st.integers(min_value=0, max_value=30),
    cuts=st.lists(st.integers(min_value=1, max_value=3000), max_size=6),
    belongs_to_readers=st.booleans(),
)
def test_a_stream_cut_at_random_points_and_resumed_equals_one_uninterrupted_read(
    daemon_url: str, lines: int, pattern: list[bool], pause_every: int, cuts: list[int], belongs_to_readers: bool
) -> None:
    code = run_code(lines, pattern, pause_every)
    asyncio.run(asyncio.wait_for(cut_and_resume(daemon_url, code, cuts, belongs_to_readers), 60))
