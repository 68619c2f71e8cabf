"""GET /metrics: the daemon's Prometheus metrics, on the main port behind the token like every
other route, and, if the operator asks (`--metrics-port`), open on a port of its own."""

from __future__ import annotations

import socket

from aiohttp import web

from execd.api.keys import METRICS
from execd.api.server import expect_continue
from execd.metrics import CONTENT_TYPE, Metrics

PATH = "/metrics"


async def scrape(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(PATH, scrape, expect_handler=expect_continue)


class OpenListener:
    """/metrics and nothing else, with no token, on a socket of its own: for a Prometheus that
    cannot hold the daemon's token. No session route is reachable through it."""

    def __init__(self, metrics: Metrics) -> None:
        app = web.Application()
        app[METRICS] = metrics
        add_routes(app.router)
        # A scrape is quick: a stop waits a moment for one in flight, not the daemon's whole grace.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)

    async def start(self, sock: socket.socket) -> None:
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
