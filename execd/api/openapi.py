"""The OpenAPI 3.1 document of every route, served at `GET /openapi.json`.

The request bodies' schemas here are the one declaration of which fields each body may carry: the
validator takes its allowed fields from them (execd/api/validation.py), and tests prove that every
route the app serves is documented here and the other way round, and that the session and run
objects carry exactly the properties documented.
"""

from __future__ import annotations

import functools
from typing import Any

from execd import __version__

JSON = "application/json"
SSE = "text/event-stream"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), **extra}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


STRING = {"type": "string"}
INTEGER = {"type": "integer"}
BOOLEAN = {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
STRING_MAP = {"type": "object", "additionalProperties": STRING}

# ----- request bodies: the validator's allowed fields come from these -------------------------

SESSION_REQUEST = _obj(
    {
        "cwd": {**STRING, "description": "absolute path of an existing directory the shell's user may enter"},
        "env": {
            **STRING_MAP,
            "description": "exported in the shell; EXECD_*, BASH_ENV, ENV, SHELLOPTS, BASHOPTS, "
            "POSIXLY_CORRECT and __execd* names are refused",
        },
        "idle_timeout_s": {"type": "number", "minimum": 0},
        "labels": {**STRING_MAP, "maxProperties": 64},
        "user": {"anyOf": [STRING, {"type": "integer", "minimum": 0}], "description": "name or numeric uid"},
    },
    additionalProperties=False,
)
RUN_REQUEST = _obj(
    {
        "code": {**STRING, "description": "bash code, run as if typed at a prompt (required; alias `command`)"},
        "command": {**STRING, "description": "alias of `code`"},
        "timeout_ms": {**INTEGER, "minimum": 0},
        "timeout": {**INTEGER, "minimum": 0, "description": "alias of `timeout_ms`"},
        "cwd": STRING,
        "env": STRING_MAP,
        "stdin": _nullable({**STRING, "description": 'text then EOF, or "stream" for POST …/stdin'}),
        "on_disconnect": {"enum": ["interrupt", "continue"]},
        "disconnect_grace_ms": {**INTEGER, "minimum": 0},
        "background": BOOLEAN,
        "run_id": {**STRING, "pattern": "^[A-Za-z0-9._-]{1,64}$"},
    },
    additionalProperties=False,
)
INTERRUPT_REQUEST = _obj(
    {"signal": {"enum": ["SIGINT", "SIGTERM", "SIGKILL"]}, "run_id": STRING}, additionalProperties=False
)
STDIN_REQUEST = _obj({"data": STRING, "eof": BOOLEAN}, additionalProperties=False)


def fields_of(schema: dict[str, Any]) -> frozenset[str]:
    """The fields a request body may carry."""
    return frozenset(schema["properties"])


# ----- answers ---------------------------------------------------------------------------------

ERROR = _obj({"code": STRING, "message": STRING}, ("code", "message"), additionalProperties=True)
SESSION = _obj(
    {
        "session_id": STRING,
        "state": {"enum": ["starting", "idle", "running", "closing", "closed", "exited", "failed"]},
        "pid": _nullable(INTEGER),
        "cwd": STRING,
        "user": STRING,
        "labels": STRING_MAP,
        "created_at": TIME,
        "last_active_at": TIME,
        "idle_timeout_s": {"type": "number"},
        "run_count": INTEGER,
        "current_run_id": _nullable(STRING),
        "last_run_id": _nullable(STRING),
        "reason": _nullable(STRING),
        "exit_code": _nullable(INTEGER),
        "signal": _nullable(STRING),
    },
    ("session_id", "state", "cwd", "labels", "created_at", "run_count"),
)
RESOURCES = _obj({"num_processes": INTEGER, "rss_bytes": INTEGER, "cpu_seconds": {"type": "number"}})
SESSION_WITH_RESOURCES = {"allOf": [SESSION, _obj({"resources": RESOURCES}, ("resources",))]}
RUN = _obj(
    {
        "run_id": STRING,
        "session_id": STRING,
        "state": {"enum": ["running", "completed", "aborted"]},
        "started_at": TIME,
        "finished_at": _nullable(TIME),
        "exit_code": _nullable(INTEGER),
        "interrupted": BOOLEAN,
        "timed_out": BOOLEAN,
        "shell_exited": BOOLEAN,
        "error": _nullable(_obj({"code": STRING, "message": STRING})),
        "output_bytes": INTEGER,
        "dropped_bytes": INTEGER,
        "last_seq": INTEGER,
        "readers": INTEGER,
        "background": BOOLEAN,
        "on_disconnect": {"enum": ["interrupt", "continue"]},
        "stdin": _nullable({"enum": ["stream", "text"]}),
    },
    ("run_id", "session_id", "state", "started_at"),
)
HEALTH = _obj(
    {
        "status": STRING,
        "version": STRING,
        "sessions": INTEGER,
        "uptime_s": {"type": "number"},
        "watchdog": {"enum": ["ok", "restarting"]},
        "target": _obj({"selector": STRING, "pid": _nullable(INTEGER)}, ("selector", "pid")),
    },
    ("status", "version"),
)

# ----- events (SSE: `id:` the seq, `event:` the type, one `data:` line of this JSON) -------------

_EVENT_BASE = {"type": STRING, "seq": INTEGER, "run_id": STRING, "timestamp": INTEGER}


def _event(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    return _obj({**_EVENT_BASE, "type": {"const": kind}, **fields}, ("type", "run_id"))


EVENTS = {
    "init": _event("init", {"session_id": STRING, "text": STRING}),
    "stdout": _event("stdout", {"text": STRING}),
    "stderr": _event("stderr", {"text": STRING}),
    "execution_complete": _event(
        "execution_complete",
        {
            "exit_code": INTEGER,
            "execution_time": INTEGER,
            "interrupted": BOOLEAN,
            "timed_out": BOOLEAN,
            "output_truncated": BOOLEAN,
            "cwd": STRING,
            "shell_exited": BOOLEAN,
        },
    ),
    "error": _event(
        "error",
        {
            "code": STRING,
            "message": STRING,
            "error": _obj(
                {"ename": STRING, "evalue": STRING, "traceback": {"type": "array", "items": STRING}},
                ("ename", "evalue"),
                description="the same code and message, in the shape OpenSandbox clients read",
            ),
        },
    ),
    "gap": _obj(
        {"type": {"const": "gap"}, "run_id": STRING, "after": INTEGER, "next_seq": INTEGER, "dropped_bytes": INTEGER},
        ("type", "next_seq", "dropped_bytes"),
    ),
}
EVENT_STREAM = {
    "description": "Server-Sent Events: one event per `init`, output chunk, `gap`, and exactly one terminal "
    "event (`execution_complete` or `error`), then the stream ends; `: ping` comments keep it alive.",
    "content": {SSE: {"schema": {"oneOf": list(EVENTS.values())}}},
}

# ----- the operations ----------------------------------------------------------------------------

_CODES = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    404: "SESSION_NOT_FOUND, RUN_NOT_FOUND or NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "SESSION_BUSY, NO_ACTIVE_RUN, RUN_ID_CONFLICT, STDIN_NOT_STREAMED, RUN_FINISHED or STDIN_CLOSED",
    410: "SESSION_ENDED",
    413: "PAYLOAD_TOO_LARGE",
    417: "INVALID_REQUEST (an Expect other than 100-continue)",
    429: "TOO_MANY_SESSIONS or TOO_MANY_READERS",
    500: "INTERNAL (a bug)",
    503: "SHUTTING_DOWN, SESSION_START_FAILED or RESOURCE_EXHAUSTED",
}
SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": STRING}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": STRING}
CURSOR = [
    {"name": "Last-Event-ID", "in": "header", "required": False, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
    {"name": "after", "in": "query", "required": False, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
]


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _operation(
    summary: str,
    ok: dict[str, dict[str, Any]],
    *,
    body: dict[str, Any] | None = None,
    params: list[dict[str, Any]] | None = None,
    open_route: bool = False,
) -> dict[str, Any]:
    responses = dict(ok)
    for status, codes in _CODES.items():
        responses.setdefault(str(status), _json({"$ref": "#/components/schemas/Error"}, codes))
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = {"required": False, "content": {JSON: {"schema": body}}}
    if open_route:
        operation["security"] = []
    return operation


def _paths() -> dict[str, dict[str, Any]]:
    session_ref = {"$ref": "#/components/schemas/Session"}
    run_ref = {"$ref": "#/components/schemas/Run"}
    sid, both = [SESSION_ID], [SESSION_ID, RUN_ID]
    return {
        "/session": {
            "post": _operation("Open a session (a persistent bash)", {"200": _json(session_ref)}, body=SESSION_REQUEST),
            "get": _operation(
                "List sessions", {"200": _json(_obj({"sessions": {"type": "array", "items": session_ref}}))}
            ),
        },
        "/session/{session_id}": {
            "get": _operation(
                "A session, with resources summed over its processes",
                {"200": _json(SESSION_WITH_RESOURCES)},
                params=sid,
            ),
            "delete": _operation("Close and forget a session", {"200": _json(session_ref)}, params=sid),
        },
        "/session/{session_id}/run": {
            "post": _operation(
                "Run code; its events stream as SSE (202 and the run object when `background`)",
                {"200": EVENT_STREAM, "202": _json(run_ref)},
                body=RUN_REQUEST,
                params=[SESSION_ID, CURSOR[0]],
            )
        },
        "/session/{session_id}/interrupt": {
            "post": _operation(
                "Interrupt the run in progress",
                {"202": _json(_obj({"run_id": STRING, "signal": STRING}))},
                body=INTERRUPT_REQUEST,
                params=sid,
            )
        },
        "/session/{session_id}/runs": {
            "get": _operation(
                "The session's kept runs, newest first",
                {"200": _json(_obj({"runs": {"type": "array", "items": run_ref}}))},
                params=sid,
            )
        },
        "/session/{session_id}/runs/{run_id}": {
            "get": _operation("A run object", {"200": _json(run_ref)}, params=both)
        },
        "/session/{session_id}/runs/{run_id}/events": {
            "get": _operation(
                "A run's events after a cursor, live until its end (204 when nothing more will come)",
                {"200": EVENT_STREAM, "204": {"description": "the run has ended and the cursor is its last event"}},
                params=[
                    *both,
                    *CURSOR,
                    {"name": "access_token", "in": "query", "required": False, "schema": STRING},
                ],
            )
        },
        "/session/{session_id}/runs/{run_id}/stdin": {
            "post": _operation(
                "Write to a run's streamed stdin",
                {"200": _json(_obj({"written": INTEGER}))},
                body=STDIN_REQUEST,
                params=both,
            )
        },
        "/healthz": {"get": _operation("Health", {"200": _json(HEALTH)}, open_route=True)},
        "/ping": {
            "get": _operation(
                "Liveness (OpenSandbox clients)",
                {"200": {"description": "pong", "content": {"text/plain": {"schema": STRING}}}},
                open_route=True,
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (text format); also open on --metrics-port when set",
                {"200": {"description": "metrics", "content": {"text/plain": {"schema": STRING}}}},
            )
        },
        "/openapi.json": {"get": _operation("This document", {"200": _json({"type": "object"})})},
    }


@functools.cache
def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "execd",
            "version": __version__,
            "description": "Persistent bash sessions over HTTP; runs stream as Server-Sent Events.",
        },
        "paths": _paths(),
        "components": {
            "schemas": {"Error": ERROR, "Session": SESSION, "Run": RUN, **{f"Event_{k}": v for k, v in EVENTS.items()}},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "header": {"type": "apiKey", "in": "header", "name": "X-EXECD-ACCESS-TOKEN"},
            },
        },
        "security": [{"bearer": []}, {"header": []}],
    }
