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

from execd import identity, process
from execd.api import create_app
from execd.api.keys import REGISTRY
from execd.api.metrics import OpenListener
from execd.api.server import ConnectionLimits, Listener
from execd.config import Settings, settings_from_args
from execd.frozen import original_environ
from execd.logging import LoopErrors, configure, get_logger
from execd.supervise import Supervised

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
    return run_loop(serve(settings, getattr(args, "command", None) or []), settings.event_loop)


async def serve(settings: Settings, command: list[str] | None = None) -> int:
    """Serve until a signal (or, with a command, until it exits); then stop taking work, end runs,
    close sessions, exit within the grace (with the command's exit status, if there is one)."""
    # The ports first: a busy one is one line and exit 1, before anything has started.
    sock = _listen(settings.host, settings.port)
    metrics_sock = _listen(settings.host, settings.metrics_port) if sock and settings.metrics_port else None
    if sock is None or (settings.metrics_port and metrics_sock is None):
        if sock is not None:
            sock.close()
        return 1
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
    supervised = _supervised(settings, command) if command else None
    if supervised is not None:
        try:
            supervised.start(stop.set)
        except OSError as exc:  # one line and 127, as a shell says of a command it cannot run
            print(f"execd: cannot run {supervised.shown!r}: {exc.strerror or exc}", file=sys.stderr)
            for opened in (sock, metrics_sock):
                if opened is not None:
                    opened.close()
            return 127
    try:
        app, runner, listener, open_metrics = await _start(settings, sock, metrics_sock)
    except BaseException:
        if supervised is not None:
            supervised.kill_now()  # a daemon that could not start leaves nothing running
        raise
    grace = settings.shutdown_grace_s
    await stop.wait()
    registry = app[REGISTRY]
    registry.shutting_down = True  # from now on every request is 503
    listener.close()
    if received:
        log.info("shutdown_requested", signal=signal.Signals(received[0]).name)
        if supervised is not None:
            supervised.pass_on(received[0])
    else:
        log.info("shutdown_requested", cause="command_exited")
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
            if supervised is not None:
                supervised.kill_now()
            os._exit(1)
        cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cleanup
    forced.cancel()
    if supervised is not None:
        await supervised.stop(grace * 0.2, registry.config.timings)
        log.info("stopped", exit_status=supervised.exit_status)
        return supervised.exit_status
    log.info("stopped")
    return 0


async def _start(
    settings: Settings, sock: socket.socket, metrics_sock: socket.socket | None
) -> tuple[web.Application, web.AppRunner, Listener, OpenListener | None]:
    app = create_app(settings)
    # The whole stop must fit in the grace: aiohttp's own wait for open connections gets half of
    # it, and whatever is still running at 80% is killed outright.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=settings.shutdown_grace_s * 0.5)
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
    return app, runner, listener, open_metrics


def _supervised(settings: Settings, command: list[str]) -> Supervised:
    """The command runs as the shells do: as `--run-as` when the daemon is root (in sidecar mode
    there is no command: the sandbox's container runs its own)."""
    env = original_environ()
    user = identity.resolve(settings.run_as) if settings.run_as and not settings.target else None
    if user is None or identity.Owner.of(user) is None:
        return Supervised(command, env)
    prefix = user.spawn_prefix(settings.allow_privilege_escalation)
    return Supervised([*prefix, *command], {**env, **user.environment()}, shown=command[0])


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
            main.close()  # never started: no "never awaited" warning on the way out
            raise SystemExit("execd: --event-loop uvloop needs the `fast` extra (pip install 'execd[fast]')") from None
        return uvloop.run(main)
    if choice != "asyncio":
        raise SystemExit(f"execd: --event-loop must be asyncio or uvloop, not {choice!r}")
    return asyncio.run(main)
