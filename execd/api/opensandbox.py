"""The OpenSandbox drop-in: OpenSandbox execd's command and session routes, on our sessions and runs.

The unmodified `opensandbox` SDK (1.1.1) drives execd through these routes, mounted at `/opensandbox`
(and at the root with `--opensandbox-at-root`). Each is translated to the registry and the run model:
`POST /command` is a run in a fresh session that is closed once the run ends; a run's events go out
as the native stream does (the SDK reads their `data:` JSON), but for the terminal event, which says a
non-zero exit as OpenSandbox does: an `error` event, `ename` CommandExecError and `evalue` the exit
code. Nothing here is known to the core. See docs/opensandbox.md.
"""

from __future__ import annotations

import collections
import json
import shlex
import signal
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from execd import identity
from execd.api import runs, sessions
from execd.api.errors import ApiError, InvalidRequest, json_response
from execd.api.keys import REGISTRY, SETTINGS
from execd.api.server import expect_continue
from execd.api.validation import Fields, directory, read_json
from execd.registry import NoActiveRun, Place, Registry, Session, SessionOptions, SessionState
from execd.run import Aborted, Completed, Run, RunRequest, rfc3339
from execd.runlog import NO_CURSOR
from execd.sse import dumps

PREFIX = "/opensandbox"
COMMANDS_KEPT = 64  # finished `/command` runs whose status and logs stay readable
TAIL_CURSOR = "EXECD-COMMANDS-TAIL-CURSOR"


class Commands:
    """The runs of `POST /command`, by id (the run's id): the newest ones, finished or not."""

    def __init__(self) -> None:
        self.runs: collections.OrderedDict[str, Run] = collections.OrderedDict()

    def add(self, run: Run) -> None:
        self.runs[run.run_id] = run
        finished = [rid for rid, kept in self.runs.items() if not kept.running]
        for rid in finished[: max(0, len(finished) - COMMANDS_KEPT)]:
            del self.runs[rid]


COMMANDS = web.AppKey("opensandbox_commands", Commands)


class Shells:
    """OpenSandbox's sessions outlive an `exit` (it starts a bash per run); ours end with their
    shell. A session id the SDK holds names the session that replaced it after an `exit`, one
    that starts in the cwd where the ended one stopped."""

    def __init__(self) -> None:
        self.current: dict[str, str] = {}  # the SDK's session id -> the session now serving it

    def resolve(self, session_id: str) -> str:
        return self.current.get(session_id, session_id)

    async def live(self, registry: Registry, session_id: str) -> Session:
        """The session serving `session_id`, with a new shell if the last one exited by itself."""
        session = registry.get(self.resolve(session_id))
        if session.state != SessionState.EXITED:
            return session
        options = SessionOptions(cwd=session.shell.cwd, labels=session.labels, user=session.shell.config.user)
        replacement = await registry.open(options)
        self.current[session_id] = replacement.id
        await registry.delete(session.id)
        return replacement

    def forget(self, session_id: str) -> str:
        return self.current.pop(session_id, session_id)


SHELLS = web.AppKey("opensandbox_shells", Shells)


# ----- the wire: OpenSandbox's events -----------------------------------------------------------


def event(kind: str, **fields: Any) -> bytes:
    """One OpenSandbox event as an SSE frame (the SDK reads `data:` lines and bare JSON alike)."""
    data = dumps({"type": kind, "timestamp": int(time.time() * 1000), **fields})
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), data.encode())


def exit_code(run: Run) -> int | None:
    return run.outcome.exit_code if isinstance(run.outcome, Completed) else None


def failure(run: Run) -> str | None:
    """Why a finished run failed, in words (None: it exited 0, or it is still running)."""
    outcome = run.outcome
    if isinstance(outcome, Aborted):
        return outcome.message
    if outcome is None or (outcome.exit_code == 0 and not outcome.timed_out):
        return None
    if outcome.timed_out:
        return f"timeout after {int((run.request.timeout_s or 0) * 1000)} ms: exit status {outcome.exit_code}"
    return f"exit status {outcome.exit_code}"


def terminal(run: Run) -> bytes | None:
    """A non-zero exit (a timeout, an interrupt, `exit 3`) as the `error` event the SDK reads an
    exit code from; an exit 0 and an aborted run keep their own (`execution_complete`, `error`)."""
    outcome = run.outcome
    if not isinstance(outcome, Completed) or (outcome.exit_code == 0 and not outcome.timed_out):
        return None
    error = {"ename": "CommandExecError", "evalue": str(outcome.exit_code), "traceback": [failure(run)]}
    return event("error", error=error, execution_time=int(run.duration_s * 1000))


# ----- requests ---------------------------------------------------------------------------------


def _fields(body: Mapping[str, Any]) -> Fields:
    """The native checks of strings and env (NUL, lone surrogates, names the daemon keeps for
    itself); OpenSandbox's bodies carry fields we do not read, so none is refused as unknown."""
    return Fields(body, frozenset(body))


def _string(body: Mapping[str, Any], name: str) -> str | None:
    return _fields(body).string(name) or None


def _timeout_ms(body: Mapping[str, Any]) -> int:
    value = body.get("timeout", 0) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest("'timeout' must be a number of milliseconds, at least 0")
    return value


def _code(body: Mapping[str, Any]) -> str:
    argv = body.get("argv")
    if argv is not None:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv[:1]):
            raise InvalidRequest("'argv' must be a non-empty list of strings")
        if not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise InvalidRequest("'argv' must be strings without NUL")
        return shlex.join(argv)
    command = _string(body, "command")
    if command is None or not command.strip():
        raise InvalidRequest("'command' or 'argv' is required")
    return command


def _envs(body: Mapping[str, Any]) -> dict[str, str]:
    return _fields(body).string_map("envs", env_names=True)


def _cwd(body: Mapping[str, Any], base: str, user: identity.Identity | None, root: str) -> str | None:
    """An existing directory the shell's user may enter (relative ones from `base`)."""
    return directory("cwd", _string(body, "cwd"), base, user, root)


def _user(body: Mapping[str, Any], place: Place) -> identity.Identity | None:
    """`uid`/`gid` through the run-as mechanism: only a daemon that may switch users takes another."""
    uid, gid = body.get("uid"), body.get("gid")
    if uid is None and gid is None:
        return None
    if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in (uid, gid)):
        raise InvalidRequest("'uid' and 'gid' must be numbers, at least 0")
    current = place.default_user or identity.daemon_identity()
    uid = current.uid if uid is None else uid
    gid = current.gid if gid is None else gid
    if (uid, gid) == (current.uid, current.gid):
        return None
    if not identity.can_switch():
        raise InvalidRequest("'uid'/'gid': this daemon cannot run commands as another user (it is not root)")
    return place.resolve_user(f"{uid}:{gid}")


# ----- routes -----------------------------------------------------------------------------------


async def ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def run_in_session(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    session = await request.app[SHELLS].live(registry, request.match_info["session_id"])
    body = await read_json(request)
    code = _string(body, "command")
    if code is None or not code.strip():
        raise InvalidRequest("'command' is required")
    run_request = RunRequest(code, _cwd(body, session.shell.cwd, session.user, session.root))
    run, _ = registry.start_run(session, run_request, None, _timeout_ms(body))
    return await runs.stream(request, run, NO_CURSOR, terminal)


async def run_command(request: web.Request) -> web.StreamResponse:
    """A command in a fresh session of its own, closed once the command ends."""
    registry = request.app[REGISTRY]
    body = await read_json(request)
    code, background = _code(body), body.get("background") is True
    place = registry.place()
    user = _user(body, place)
    cwd = _cwd(body, "/", user or place.default_user, place.root)
    options = SessionOptions(cwd=cwd, env=_envs(body), user=user, place=place)
    session = await registry.open(options)
    try:
        run_request = RunRequest(code, background=background, on_disconnect="continue" if background else "interrupt")
        run, _ = registry.start_run(session, run_request, None, _timeout_ms(body))
    except Exception:
        await registry.delete(session.id)
        raise
    registry.spawn(_close_after(registry, session, run))
    request.app[COMMANDS].add(run)
    if background:
        return _started_in_background(run)
    return await runs.stream(request, run, NO_CURSOR, terminal)


async def _close_after(registry: Registry, session: Session, run: Run) -> None:
    await run.wait_end()
    if session.id in registry.sessions:
        await registry.delete(session.id)


def _started_in_background(run: Run) -> web.Response:
    """What OpenSandbox answers for a background command: `init`, then `execution_complete` at once."""
    frames = event("init", text=run.run_id) + event("execution_complete", execution_time=0)
    return web.Response(body=frames, headers=runs.SSE_HEADERS)


def _find_run(request: web.Request, run_id: str) -> Run:
    """A `/command` run, or the run of a session by its id."""
    run = request.app[COMMANDS].runs.get(run_id)
    if run is not None:
        return run
    for session in request.app[REGISTRY].sessions.values():
        if run_id in session.runs:
            return session.runs[run_id]
    raise ApiError(404, "RUN_NOT_FOUND", f"no command with id {run_id!r} (unknown or forgotten)")


async def command_status(request: web.Request) -> web.Response:
    run = _find_run(request, request.match_info["id"])
    return json_response(
        {
            "id": run.run_id,
            "content": run.request.code,
            "running": run.running,
            "exit_code": exit_code(run),
            "error": failure(run),
            "started_at": rfc3339(run.started_at),
            "finished_at": rfc3339(run.finished_at) if run.finished_at is not None else None,
        }
    )


async def command_logs(request: web.Request) -> web.Response:
    """The output after `cursor` as plain text. The cursor is the seq of the last event read (our
    logs are events, not a file): opaque to the SDK, which only hands back what the header said."""
    run = _find_run(request, request.match_info["id"])
    raw = request.query.get("cursor", "")
    if raw and not raw.isdigit():
        raise InvalidRequest("'cursor' must be a number")
    part = run.log.after(int(raw) if raw else NO_CURSOR)
    text = "".join(_output_text(b"".join(frame)) for frame in part.frames)
    response = web.Response(text=text, content_type="text/plain")
    response.headers[TAIL_CURSOR] = str(max(part.last_seq, 0))
    return response


def _output_text(frame: bytes) -> str:
    """The text of a stdout/stderr event (not of output between runs), else ''."""
    head = frame[:48]
    if b"\nevent: stdout\n" not in head and b"\nevent: stderr\n" not in head:
        return ""
    data = json.loads(frame.partition(b"\ndata: ")[2])
    if data.get("type") not in ("stdout", "stderr") or data.get("between_runs"):
        return ""
    text: str = data.get("text", "")
    return text


async def interrupt_command(request: web.Request) -> web.Response:
    """SIGINT for a command (or a session's run) in progress; a session's id also closes it."""
    registry = request.app[REGISTRY]
    target = request.query.get("id", "")
    if not target:
        raise InvalidRequest("the query parameter 'id' is required")
    session = registry.sessions.get(request.app[SHELLS].resolve(target))
    if session is not None:
        request.app[SHELLS].forget(target)
        _interrupt(registry, session, None)
        await registry.delete(session.id)
        return web.Response()
    run = _find_run(request, target)
    owner = registry.sessions.get(run.session_id)
    if run.running and owner is not None:
        _interrupt(registry, owner, run.run_id)
    return web.Response()


async def delete_session(request: web.Request) -> web.Response:
    session_id = request.app[SHELLS].forget(request.match_info["session_id"])
    return json_response(await request.app[REGISTRY].delete(session_id))


def _interrupt(registry: Registry, session: Session, run_id: str | None) -> None:
    if session.state != SessionState.RUNNING:
        return
    try:
        registry.interrupt(session, signal.SIGINT, run_id)
    except NoActiveRun:
        pass  # it ended meanwhile


def add_routes(router: web.UrlDispatcher) -> None:
    """OpenSandbox execd's routes, on any router: the sub-application's, or the root's."""
    for method, path, handler in (
        ("GET", "/ping", ping),
        ("POST", "/session", sessions.create_session),
        ("POST", "/session/{session_id}/run", run_in_session),
        ("DELETE", "/session/{session_id}", delete_session),
        ("POST", "/command", run_command),
        ("DELETE", "/command", interrupt_command),
        ("GET", "/command/status/{id}", command_status),
        ("GET", "/command/{id}/logs", command_logs),
    ):
        router.add_route(method, path, handler, expect_handler=expect_continue)


def subapp(parent: web.Application) -> web.Application:
    """The adapter as an application of its own, to mount at PREFIX: it shares the parent's
    registry, settings and commands, and gets the parent's middlewares (errors, the token gate)."""
    app = web.Application()
    app[REGISTRY] = parent[REGISTRY]
    app[SETTINGS] = parent[SETTINGS]
    app[COMMANDS] = parent[COMMANDS]
    app[SHELLS] = parent[SHELLS]
    add_routes(app.router)
    return app
