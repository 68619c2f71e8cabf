"""The aiohttp application: middlewares (errors, auth, shutdown), routes, start-up and clean-up."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from execd import __version__, identity, ladder, process
from execd.api import metrics, openapi, opensandbox, runs, sessions
from execd.api.errors import error_response, from_exception, from_http_exception, json_response
from execd.api.keys import METRICS, REGISTRY, SETTINGS, STARTED_AT
from execd.api.server import FALLBACK_ROUTE, add_fallback, expect_continue, mark_head_received
from execd.config import Settings
from execd.logging import get_logger
from execd.metrics import CLIENT_GONE_STATUS, Metrics
from execd.registry import Registry, RegistryConfig
from execd.run import RunLimits
from execd.target import Selector

log = get_logger("execd.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/ping", opensandbox.PREFIX + "/ping"})


def errors_middleware(metrics: Metrics) -> Middleware:
    """Exceptions as the contract's JSON errors; and every answer counted by route template, method
    and status, here rather than in a middleware of its own (each layer costs every run a coroutine
    call), where every status is known: the gate's 401 and 503 and the errors made here."""
    count = metrics.http_request

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        mark_head_received(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                count(_route_template(request), request.method, exc.status)
                raise
            response = from_http_exception(exc)
        except (asyncio.CancelledError, ConnectionError):
            count(_route_template(request), request.method, CLIENT_GONE_STATUS)
            raise  # a client gone mid-stream is no error of ours: aiohttp closes quietly
        except Exception as exc:
            response = _error_response(request, exc)
        count(_route_template(request), request.method, response.status)
        return response

    return errors


def _error_response(request: web.Request, exc: Exception) -> web.Response:
    api_error = from_exception(exc)
    if api_error is None:
        log.exception("request_failed", method=request.method, path=request.path)
        return error_response(500, "INTERNAL", f"internal error: {type(exc).__name__}")
    return error_response(api_error.status, api_error.code, api_error.message, **api_error.extra)


def _route_template(request: web.Request) -> str:
    """The matched route's path template (`/session/{session_id}`): a label never holds an id."""
    resource = request.match_info.route.resource
    if resource is None or resource.name == FALLBACK_ROUTE:
        return "other"
    return resource.canonical


def gate_middleware(token: str | None) -> Middleware:
    """Who gets in: with a token configured, only requests that carry it (401; /healthz and /ping
    are open), and nobody while the daemon stops (503). One middleware, not two: each layer costs
    every run a coroutine call."""
    expected = token.encode() if token else b""

    @web.middleware
    async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected and request.path not in OPEN_PATHS:
            given = request.headers.get("X-EXECD-ACCESS-TOKEN")
            if given is None:
                scheme, _, value = request.headers.get("Authorization", "").partition(" ")
                given = value.strip() if scheme.lower() == "bearer" else ""
                if not given and request.match_info.route.name == runs.EVENTS_ROUTE:
                    given = request.query.get("access_token", "")  # EventSource cannot set headers
            # A header's bytes that are not UTF-8 arrive surrogate-escaped: compared as the bytes they are.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
                return error_response(401, "UNAUTHORIZED", "a valid access token is required")
        if request.app[REGISTRY].shutting_down:
            return error_response(503, "SHUTTING_DOWN", "the daemon is shutting down")
        return await handler(request)

    return gate


async def healthz(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "sessions": request.app[REGISTRY].live_count(),
            "uptime_s": round(time.monotonic() - request.app[STARTED_AT], 3),
            "watchdog": request.app[REGISTRY].watchdog_state,
            **_target(request.app[REGISTRY]),
        }
    )


def _target(registry: Registry) -> dict[str, Any]:
    """Sidecar mode: which process the selector finds (pid null while none: sessions then fail
    with 503 SESSION_START_FAILED; the daemon itself is healthy, so the status stays ok)."""
    health = registry.target_health()
    return {} if health is None else {"target": health}


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def openapi_document(request: web.Request) -> web.Response:
    return json_response(openapi.document())


async def _registry_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    registry = app[REGISTRY]
    loop = asyncio.get_running_loop()
    on_sigchld = False
    if settings.reap_orphans:
        process.become_subreaper()
        try:
            loop.add_signal_handler(signal.SIGCHLD, process.reap_zombie_children)
            on_sigchld = True
        except RuntimeError:
            pass  # uvloop keeps SIGCHLD for itself: orphans are then reaped by the periodic pass
    registry.start()
    reaper = loop.create_task(registry.reaper_loop(reap_orphans=settings.reap_orphans))
    if not settings.access_token:
        log.warning("authentication_disabled", hint="set EXECD_ACCESS_TOKEN or --access-token")
    log.info("daemon_started", version=__version__)
    yield
    reaper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reaper
    await registry.shutdown()
    await registry.stop()
    if on_sigchld:
        loop.remove_signal_handler(signal.SIGCHLD)
    if settings.reap_orphans:
        process.reap_zombie_children()


async def _end_sessions_first(app: web.Application) -> None:
    # aiohttp waits for open streams on shutdown: end the runs first, or a `sleep 3600` holds it up.
    await app[REGISTRY].shutdown()


def create_app(settings: Settings | None = None) -> web.Application:
    settings = settings or Settings()
    registry = Registry(
        RegistryConfig(
            max_sessions=settings.max_sessions,
            idle_timeout_s=settings.idle_timeout_s,
            max_run_timeout_ms=settings.max_run_timeout_ms,
            timings=ladder.Timings(settings.interrupt_grace_ms / 1000, settings.kill_wait_ms / 1000),
            between_runs_bytes=settings.between_runs_bytes,
            run_limits=RunLimits(settings.run_log_bytes, settings.max_output_bytes, settings.max_readers),
            runs_kept=settings.runs_kept,
            shell_fd_limit=process.raise_fd_limit(),
            run_as=identity.resolve(settings.run_as) if settings.run_as and not settings.target else None,
            run_as_spec=settings.run_as,
            target=Selector.parse(settings.target) if settings.target else None,
            state_dir=settings.state_dir,
            max_processes=settings.max_processes,
            allow_privilege_escalation=settings.allow_privilege_escalation,
            session_cgroups=settings.session_cgroups,
        )
    )
    app = web.Application(
        middlewares=[errors_middleware(registry.metrics), gate_middleware(settings.access_token)],
        client_max_size=settings.max_body_bytes,
    )
    app[SETTINGS] = settings
    app[STARTED_AT] = time.monotonic()
    app[REGISTRY] = registry
    app[METRICS] = registry.metrics
    app.cleanup_ctx.append(_registry_context)
    app.on_shutdown.append(_end_sessions_first)
    app.router.add_get("/healthz", healthz, expect_handler=expect_continue)
    app.router.add_get("/ping", ping, expect_handler=expect_continue)
    app.router.add_get("/openapi.json", openapi_document, expect_handler=expect_continue)
    app[opensandbox.COMMANDS] = opensandbox.Commands()
    app[opensandbox.SHELLS] = opensandbox.Shells()
    if settings.opensandbox_at_root:
        opensandbox.add_routes(app.router)  # first: where paths collide (`/session*`), its routes win
    sessions.add_routes(app.router)
    runs.add_routes(app.router)
    metrics.add_routes(app.router)
    app.add_subapp(opensandbox.PREFIX, opensandbox.subapp(app))
    add_fallback(app.router)
    return app
