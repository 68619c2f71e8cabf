"""A real browser reads a background run: Chromium's own `EventSource`, through a TCP proxy that cuts
the stream mid-run, reconnects by itself with `Last-Event-ID` and ends with exactly the run's output
and exit code, nothing missing or doubled. Needs a Chromium on PATH (`.ci/run` installs Debian's)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, Route, async_playwright

from tests.conftest import DaemonFactory

TOKEN = "browser-token-s3cret"
LAST_LINE = 24
# Four phases of six numbered lines on both streams, each after a gate file the test creates: phase 2
# is written while the browser is cut off (it comes back replayed), phase 3 live on the resumed
# stream until the second cut, phase 4 and the end while cut off again. `(exit 7)` sets $? without
# ending the shell.
CODE = """gate() { while [ ! -e "$1" ]; do sleep 0.02; done; }
lines() { for i in $(seq "$1" "$2"); do echo "out $i"; echo "err $i" >&2; sleep 0.05; done; }
lines 1 6; gate GATES/1; lines 7 12; gate GATES/2; lines 13 18; gate GATES/3; lines 19 24; (exit 7)"""
EXPECTED_STDOUT = "".join(f"out {i}\n" for i in range(1, LAST_LINE + 1))
EXPECTED_STDERR = "".join(f"err {i}\n" for i in range(1, LAST_LINE + 1))
WAIT_MS = 15_000

# `error` is both a named event of the contract (a MessageEvent with data) and EventSource's own
# signal that the connection dropped (a plain Event, after which the browser reconnects by itself).
PAGE = """<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">
<script>
window.received = []; window.drops = []; window.done = false;
let lastId = null;
const source = new EventSource(EVENTS_URL);
for (const type of ["init", "stdout", "stderr", "gap", "execution_complete", "error"]) {
  source.addEventListener(type, (event) => {
    if (!(event instanceof MessageEvent)) {
      window.drops.push({after: lastId, readyState: source.readyState});
      return;
    }
    lastId = event.lastEventId;
    window.received.push({type, id: event.lastEventId, data: JSON.parse(event.data)});
    if (type === "execution_complete" || type === "error") {
      source.close();
      window.done = true;
    }
  });
}
window.has = (stream, line) =>
  window.received.filter((e) => e.type === stream).map((e) => e.data.text).join("").split("\\n").includes(line);
// A fresh EventSource whose cursor is the last event: the route answers 204 and the browser gives up.
window.probe = (url) => new Promise((resolve) => {
  const probe = new EventSource(url);
  probe.onmessage = () => resolve("message");
  probe.onerror = () => { resolve(probe.readyState); probe.close(); };
});
</script>"""


@dataclass
class Request:
    connection: int
    line: str
    headers: dict[str, str]


@dataclass
class CuttingProxy:
    """127.0.0.1:<port> → the daemon's port, byte for byte. Records every request head it forwards
    (a GET has no body) and cuts every open connection on demand."""

    upstream_port: int
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    _open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)
    _server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def cut(self) -> int:
        cut = len(self._open)
        for client, upstream in self._open:
            client.transport.abort()
            upstream.transport.abort()
        return cut

    async def close(self) -> None:
        assert self._server
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    def events_requests(self) -> list[Request]:
        return [r for r in self.requests if "/events" in r.line]

    async def _serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pair = (client, upstream)
        self._open.add(pair)
        try:
            await asyncio.gather(
                self._pipe(client_reader, upstream, sniff=number),
                self._pipe(upstream_reader, client),
                return_exceptions=True,
            )
        finally:
            self._open.discard(pair)
            client.transport.abort()
            upstream.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sniff: int = 0) -> None:
        pending = b""
        while data := await reader.read(65536):
            if sniff:
                pending += data
                while b"\r\n\r\n" in pending:
                    head, pending = pending.split(b"\r\n\r\n", 1)
                    line, *fields = head.decode("latin-1").split("\r\n")
                    headers = {k.strip().lower(): v.strip() for k, v in (f.split(":", 1) for f in fields)}
                    self.requests.append(Request(sniff, line, headers))
            writer.write(data)
            await writer.drain()
        writer.transport.abort()


def find_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("no Chromium found on PATH, and CI must run the browser test: .ci/run installs Debian's chromium")
    pytest.skip("no Chromium found on PATH, so the browser test did not run: apt-get install -y chromium")


async def until(page: Page, condition: str) -> None:
    await page.wait_for_function(condition, timeout=WAIT_MS, polling=20)


async def test_browser_eventsource_resumes_a_cut_stream_with_last_event_id(
    make_daemon: DaemonFactory, tmp_path: Path
) -> None:
    chromium = find_chromium()
    daemon = await make_daemon(access_token=TOKEN)
    auth = {"X-EXECD-ACCESS-TOKEN": TOKEN}
    proxy = CuttingProxy(daemon.client.server.port)
    origin = f"http://127.0.0.1:{await proxy.start()}"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = await browser.new_page()
            statuses: list[int] = []  # of the stream's responses, as the browser saw them
            page.on("response", lambda r: statuses.append(r.status) if "/events?" in r.url else None)
            response = await daemon.client.post("/session", headers=auth)
            assert response.status == 200, await response.text()
            session_id = (await response.json())["session_id"]
            code = CODE.replace("GATES", str(tmp_path))
            response = await daemon.client.post(
                f"/session/{session_id}/run", json={"code": code, "background": True}, headers=auth
            )
            assert response.status == 202, await response.text()
            run_id = (await response.json())["run_id"]

            # The page comes from the proxy's origin (Playwright answers for it), so the stream is same-origin.
            events_url = f"/session/{session_id}/runs/{run_id}/events?access_token={TOKEN}"
            html = PAGE.replace("EVENTS_URL", json.dumps(events_url))

            async def serve_page(route: Route) -> None:
                await route.fulfill(status=200, content_type="text/html", body=html)

            await page.route(f"{origin}/page.html", serve_page)
            await page.goto(f"{origin}/page.html")
            await page.unroute(f"{origin}/page.html")

            await until(page, "has('stdout', 'out 6') && has('stderr', 'err 6')")
            assert proxy.cut() >= 1  # cut 1: the run waits at its first gate
            await until(page, "window.drops.length >= 1")
            (tmp_path / "1").touch()  # lines 7-12 while the browser is away
            await until(page, "has('stdout', 'out 12') && has('stderr', 'err 12')")  # replayed after its reconnect
            assert len(proxy.events_requests()) == 2, proxy.requests
            (tmp_path / "2").touch()  # lines 13-18, live on the resumed stream
            await until(page, "has('stdout', 'out 14')")
            assert not await page.evaluate("window.done")
            assert proxy.cut() >= 1  # cut 2
            await until(page, "window.drops.length >= 2")
            (tmp_path / "3").touch()  # the rest and the end while the browser is away again
            await until(page, "window.done")
            events: list[dict[str, Any]] = await page.evaluate("window.received")
            drops: list[dict[str, Any]] = await page.evaluate("window.drops")
            after_last = f"{events_url}&after={events[-1]['id']}"
            probe_state = await page.evaluate("(url) => window.probe(url)", after_last)
            # Playwright reports responses asynchronously: wait for all four before the browser goes.
            for _ in range(200):
                if len(statuses) >= 4:
                    break
                await asyncio.sleep(0.025)
        finally:
            await browser.close()
            await proxy.close()

    ids = [int(e["id"]) for e in events]
    assert ids == list(range(len(events))), ids  # init is 0; every seq once, in order, none missing
    assert [e["data"]["seq"] for e in events] == ids
    assert [e["type"] for e in events if e["type"] not in ("stdout", "stderr")] == ["init", "execution_complete"]
    assert "".join(e["data"]["text"] for e in events if e["type"] == "stdout") == EXPECTED_STDOUT
    assert "".join(e["data"]["text"] for e in events if e["type"] == "stderr") == EXPECTED_STDERR
    assert events[-1]["data"]["exit_code"] == 7

    # The browser reconnected by itself, twice, each time on a new connection naming the last event it had.
    requests = proxy.events_requests()
    assert len(requests) == 4, requests  # the first, two reconnects, the probe
    assert len({r.connection for r in requests[:3]}) == 3  # (the probe may reuse the last, ended, stream's)
    assert all(f"access_token={TOKEN}" in r.line for r in requests)
    assert "last-event-id" not in requests[0].headers
    assert [r.headers.get("last-event-id") for r in requests[1:3]] == [d["after"] for d in drops], (requests, drops)
    assert [d["readyState"] for d in drops] == [0, 0]  # CONNECTING: the browser retries by itself
    # A cursor at the last event of the finished run: 204, and the browser's EventSource stops for good.
    assert "last-event-id" not in requests[3].headers
    assert probe_state == 2  # EventSource.CLOSED
    # As the browser saw them: streams answered 200, the probe 204. (Playwright does not report
    # every response of a stream the page closes at once; the proxy's count above is the exact one.)
    assert statuses[-1] == 204 and set(statuses[:-1]) == {200}, statuses
