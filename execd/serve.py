"""`execd serve`: settings from flags and environment, the daemon until SIGTERM or SIGINT. Only
this command loads the daemon's modules (the client commands start fast without them)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from execd import process
from execd.api import create_app
from execd.api.keys import REGISTRY
from execd.api.metrics import OpenListener
from execd.api.server import ConnectionLimits, Listener
from execd.config import Settings, settings_from_args
from execd.logging import LoopErrors, configure, get_logger

log = get_logger("execd.serve")


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"execd: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    # Read once: what the daemon starts later (the watchdog, the shells) never sees it.
    os.environ.pop(Settings.env_name("access_token"), None)
    if getattr(args, "access_token", None):
        log.warning("access_token_on_command_line", hint="any local user sees it in ps; use --access-token-file")
    process.keep_buffers_on_the_heap()
    return run_loop(serve(settings), settings.event_loop)


async def serve(settings: Settings) -> int:
    """Serve until a signal; then stop taking work, end runs, close sessions, exit within the grace."""
    # The ports first: a busy one is one line and exit 1, before anything has started.
    sock = _listen(settings.host, settings.port)
    metrics_sock = _listen(settings.host, settings.metrics_port) if sock and settings.metrics_port else None
    if sock is None or (settings.metrics_port and metrics_sock is None):
        if sock is not None:
            sock.close()
        return 1
    app = create_app(settings)
    # The whole stop must fit in the grace: aiohttp's own wait for open connections gets half of
    # it, and whatever is still running at 80% is killed outright.
    grace = settings.shutdown_grace_s
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=grace * 0.5)
    await runner.setup()
    listener = Listener(
        runner,
        ConnectionLimits(settings.max_connections, settings.request_timeout_s),
        {"access_log": None, "keepalive_timeout": settings.keepalive_timeout_s},
    )
    await listener.start(sock)
    log.info("listening", host=settings.host, port=settings.port, pid=os.getpid())
    open_metrics: OpenListener | None = None
    if metrics_sock is not None:
        open_metrics = OpenListener(app[REGISTRY].metrics)
        await open_metrics.start(metrics_sock)
        log.info("metrics_listening", host=settings.host, port=settings.metrics_port, token_required=False)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrors())
    stop, force = asyncio.Event(), asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        # Only flags: the order of the shutdown is this function's, below.
        received.append(signum)
        (force if stop.is_set() else stop).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()
    registry = app[REGISTRY]
    registry.shutting_down = True  # from now on every request is 503
    listener.close()
    log.info("shutdown_requested", signal=signal.Signals(received[0]).name)
    if open_metrics is not None:
        await open_metrics.stop()  # at most a moment: a scrape in flight
    cleanup = loop.create_task(runner.cleanup())
    forced = loop.create_task(force.wait())
    done, _ = await asyncio.wait({cleanup, forced}, timeout=grace * 0.8, return_when=asyncio.FIRST_COMPLETED)
    if cleanup not in done:
        if forced in done:
            log.warning("forced_exit", signal=signal.Signals(received[-1]).name)
        else:
            log.warning("shutdown_grace_expired", grace_s=grace)
        registry.kill_all_now()
        if forced in done:
            os._exit(1)
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup
    forced.cancel()
    log.info("stopped")
    return 0


def _listen(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        print(f"execd: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return None


def run_loop(main: Coroutine[Any, Any, int], choice: str) -> int:
    """Run on asyncio, or on uvloop when asked for (the `fast` extra)."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise SystemExit("execd: --event-loop uvloop needs the `fast` extra (pip install 'execd[fast]')") from None
        return uvloop.run(main)
    if choice != "asyncio":
        raise SystemExit(f"execd: --event-loop must be asyncio or uvloop, not {choice!r}")
    return asyncio.run(main)
