"""GET /metrics: Prometheus text that parses, and each family moving when its event happens.

Real daemons, real shells: every figure is read back through the route, as Prometheus reads it.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from execd.api.keys import REGISTRY
from execd.config import Settings
from tests.conftest import Daemon, DaemonFactory, wait_for
from tests.helpers_control import EventStream, free_port, open_run, run_children, served

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FAMILIES = {
    "execd_sessions",
    "execd_sessions_created",
    "execd_sessions_closed",
    "execd_runs_started",
    "execd_runs_finished",
    "execd_run_duration_seconds",
    "execd_output_bytes",
    "execd_dropped_bytes",
    "execd_readers",
    "execd_interrupts",
    "execd_sigkill_escalations",
    "execd_http_requests",
}


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(daemon: Daemon, **headers: str) -> Samples:
    response = await daemon.client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4"), response.headers
    return parse(await response.text())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def metric(daemon: Daemon, name: str, **labels: str) -> float:
    return value(await scrape(daemon), name, **labels)


async def moved(daemon: Daemon, name: str, expected: float, **labels: str) -> None:
    """Until the sample reaches `expected` (some are counted once the loop is free after the event)."""

    async def reached() -> bool:
        return await metric(daemon, name, **labels) >= expected

    await wait_for(reached, 10, f"{name}{labels} >= {expected}")


async def interrupt(daemon: Daemon, session_id: str) -> None:
    response = await daemon.client.post(f"/session/{session_id}/interrupt", json={})
    assert response.status == 202, await response.text()


async def busy(daemon: Daemon, session: dict[str, Any], code: str) -> EventStream:
    """A streamed run, returned once its `sleep` exists (the code is really running)."""
    stream = await open_run(daemon.client, session["session_id"], code)
    await wait_for(lambda: run_children(session["pid"], "sleep"), 10, "sleep started")
    return stream


# ----- the route --------------------------------------------------------------------------------


async def test_every_family_is_exposed_and_parses(daemon: Daemon) -> None:
    response = await daemon.client.get("/metrics")
    assert response.status == 200
    names = {family.name for family in text_string_to_metric_families(await response.text())}
    assert names >= FAMILIES, FAMILIES - names
    assert any(name.startswith("process_") for name in names), names
    samples = parse(await response.text())
    # Every known label value is there from the start, at 0.
    for state in ("starting", "idle", "running", "closing", "closed", "exited", "failed"):
        assert ("execd_sessions", frozenset({("state", state)})) in samples
    assert value(samples, "execd_runs_finished_total", outcome="timed_out", code="") == 0
    assert ("execd_runs_finished_total", frozenset({("outcome", "timed_out"), ("code", "")})) in samples


async def test_the_token_guards_metrics_and_bearer_works(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="metrics-token")
    response = await daemon.client.get("/metrics")
    assert response.status == 401
    assert (await response.json())["code"] == "UNAUTHORIZED"
    samples = await scrape(daemon, Authorization="Bearer metrics-token")
    assert value(samples, "execd_http_requests_total", route="/metrics", method="GET", status="401") == 1


def test_the_metrics_port_serves_metrics_open_and_nothing_else() -> None:
    port = free_port()
    with served("--metrics-port", str(port), env={"EXECD_ACCESS_TOKEN": "served-token"}) as daemon:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            names = {family.name for family in text_string_to_metric_families(response.read().decode())}
        assert names >= FAMILIES
        for url in (f"{daemon.url}/metrics", f"http://127.0.0.1:{port}/session"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code in (401, 404), url


def test_the_metrics_port_is_checked_at_start() -> None:
    with pytest.raises(ValueError, match="--metrics-port"):
        Settings(metrics_port=70000)
    assert Settings().metrics_port == 0


# ----- runs ---------------------------------------------------------------------------------------


async def test_a_run_moves_its_families(daemon: Daemon) -> None:
    session = await daemon.create()
    assert await metric(daemon, "execd_sessions", state="idle") == 1
    result = await daemon.run(session["session_id"], "printf 'out\\n'; printf 'errs\\n' >&2")
    assert result.complete["exit_code"] == 0
    await moved(daemon, "execd_runs_finished_total", 1, outcome="completed", code="")
    samples = await scrape(daemon)
    assert value(samples, "execd_sessions_created_total") == 1
    assert value(samples, "execd_runs_started_total") == 1
    assert value(samples, "execd_run_duration_seconds_count") == 1
    assert 0 < value(samples, "execd_run_duration_seconds_sum") < 10
    assert value(samples, "execd_run_duration_seconds_bucket", le="+Inf") == 1
    assert value(samples, "execd_output_bytes_total", stream="stdout") == 4
    assert value(samples, "execd_output_bytes_total", stream="stderr") == 5
    assert value(samples, "execd_interrupts_total", cause="request") == 0


async def test_an_interrupt_counts_its_cause_and_outcome(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await busy(daemon, session, "sleep 30")
    await interrupt(daemon, session["session_id"])
    assert (await stream.until_terminal()).data["interrupted"] is True
    await moved(daemon, "execd_runs_finished_total", 1, outcome="interrupted", code="")
    samples = await scrape(daemon)
    assert value(samples, "execd_interrupts_total", cause="request") == 1
    assert value(samples, "execd_sigkill_escalations_total") == 0  # sleep obeyed SIGINT


async def test_a_timeout_counts_as_timed_out(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "sleep 30", timeout_ms=200)
    assert result.complete["timed_out"] is True
    await moved(daemon, "execd_runs_finished_total", 1, outcome="timed_out", code="")
    samples = await scrape(daemon)
    assert value(samples, "execd_interrupts_total", cause="timeout") == 1
    assert value(samples, "execd_runs_finished_total", outcome="interrupted", code="") == 0


async def test_a_client_gone_interrupts_its_run(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await busy(daemon, session, "sleep 30")
    assert await metric(daemon, "execd_readers") == 1
    stream.response.close()  # the client goes away mid-stream
    await moved(daemon, "execd_interrupts_total", 1, cause="client_gone")
    await moved(daemon, "execd_runs_finished_total", 1, outcome="interrupted", code="")
    samples = await scrape(daemon)
    assert value(samples, "execd_readers") == 0
    assert value(samples, "execd_http_requests_total", route="/session/{session_id}/run", method="POST", status="499")


async def test_readers_count_every_attached_stream(daemon: Daemon) -> None:
    session = await daemon.create()
    stream = await busy(daemon, session, "sleep 30")
    run_id = stream.events[0].data["run_id"]
    async with daemon.client.get(f"/session/{session['session_id']}/runs/{run_id}/events") as second:
        assert second.status == 200
        await moved(daemon, "execd_readers", 2)
        await interrupt(daemon, session["session_id"])
        await stream.until_terminal()
        await second.read()
    await wait_for(lambda: _no_readers(daemon), 10, "readers gone")


async def _no_readers(daemon: Daemon) -> bool:
    return await metric(daemon, "execd_readers") == 0


async def test_a_run_that_ignores_sigint_escalates_to_sigkill(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(interrupt_grace_ms=200)
    session = await daemon.create()
    stream = await busy(daemon, session, 'trap "" INT; sleep 30')
    await interrupt(daemon, session["session_id"])
    terminal = await stream.until_terminal()
    assert terminal.data["interrupted"] is True
    await moved(daemon, "execd_sigkill_escalations_total", 1)
    assert await metric(daemon, "execd_runs_finished_total", outcome="interrupted", code="") == 1


async def test_dropped_bytes_of_a_background_run(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(run_log_bytes=4096)
    session = await daemon.create()
    response = await daemon.client.post(
        f"/session/{session['session_id']}/run", json={"code": "seq 1 20000", "background": True}
    )
    assert response.status == 202, await response.text()
    await moved(daemon, "execd_runs_finished_total", 1, outcome="completed", code="")
    samples = await scrape(daemon)
    assert value(samples, "execd_dropped_bytes_total") > 0
    assert value(samples, "execd_output_bytes_total", stream="stdout") == len(
        "".join(f"{i}\n" for i in range(1, 20001))
    )


# ----- sessions -----------------------------------------------------------------------------------


async def test_delete_counts_deleted_and_aborts_the_run(daemon: Daemon) -> None:
    session = await daemon.create()
    response = await daemon.client.post(
        f"/session/{session['session_id']}/run", json={"code": "sleep 30", "background": True}
    )
    assert response.status == 202
    assert await metric(daemon, "execd_sessions", state="running") == 1
    await daemon.delete(session["session_id"])
    await moved(daemon, "execd_runs_finished_total", 1, outcome="aborted", code="SESSION_CLOSED")
    samples = await scrape(daemon)
    assert value(samples, "execd_sessions_closed_total", reason="deleted") == 1
    assert value(samples, "execd_sessions", state="running") == 0


async def test_a_reaped_session_counts_idle_timeout(daemon: Daemon) -> None:
    await daemon.create(idle_timeout_s=0.3)
    await moved(daemon, "execd_sessions_closed_total", 1, reason="idle_timeout")
    await wait_for(lambda: _state_count(daemon, "closed"), 10, "the session closed")


async def _state_count(daemon: Daemon, state: str) -> float:
    return await metric(daemon, "execd_sessions", state=state)


async def test_a_shell_that_exits_counts_exited(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "exit 3")
    assert result.complete["shell_exited"] is True
    await moved(daemon, "execd_sessions_closed_total", 1, reason="exited")
    assert await metric(daemon, "execd_sessions", state="exited") == 1


async def test_shutdown_counts_shutdown_and_aborts_the_run(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon()
    session = await daemon.create()
    response = await daemon.client.post(
        f"/session/{session['session_id']}/run", json={"code": "sleep 30", "background": True}
    )
    assert response.status == 202
    metrics = daemon.app[REGISTRY].metrics
    await daemon.client.close()  # the daemon stops: nothing is left to scrape, so read the counts
    await wait_for(lambda: metrics.runs_finished[("aborted", "SHUTTING_DOWN")], 10, "the run aborted")
    assert metrics.sessions_closed["shutdown"] == 1


# ----- HTTP requests ------------------------------------------------------------------------------


async def test_requests_are_counted_by_route_template_never_by_id(daemon: Daemon) -> None:
    session = await daemon.create()
    session_id = session["session_id"]
    result = await daemon.run(session_id, "true")
    run_id = result.terminal.data["run_id"]
    assert (await daemon.client.get(f"/session/{session_id}/runs/{run_id}")).status == 200
    assert (await daemon.client.get(f"/session/{session_id}-nope")).status == 404
    assert (await daemon.client.get(f"/no/such/{session_id}")).status == 404
    assert (await daemon.client.request("TRACE", "/session")).status == 405
    response = await daemon.client.get("/metrics")
    text = await response.text()
    assert session_id not in text and run_id not in text
    samples = parse(text)

    def requests(route: str, method: str, status: str) -> float:
        return value(samples, "execd_http_requests_total", route=route, method=method, status=status)

    assert requests("/session", "POST", "200") == 1
    assert requests("/session/{session_id}/run", "POST", "200") == 1
    assert requests("/session/{session_id}/runs/{run_id}", "GET", "200") == 1
    assert requests("/session/{session_id}", "GET", "404") == 1
    assert requests("other", "GET", "404") == 1
    assert requests("other", "other", "405") == 1
    hex_id = re.compile(r"[0-9a-f]{16,}")
    for name, labels in samples:
        if name.startswith("execd_"):
            assert not any(hex_id.search(label_value) for _, label_value in labels), (name, labels)
