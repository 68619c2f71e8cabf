"""Every non-2xx answer is `{"code": ..., "message": ...}`; domain errors map to codes here, once."""

from __future__ import annotations

import errno
from typing import Any

from aiohttp import web

from execd.registry import (
    NoActiveRun,
    RunFinished,
    RunIdConflict,
    RunNotFound,
    SessionEnded,
    SessionNotFound,
    SessionStartFailed,
    ShellBusy,
    ShuttingDown,
    StdinClosed,
    StdinNotStreamed,
    TooManySessions,
)
from execd.run import TooManyReaders
from execd.sse import dumps


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


class InvalidRequest(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(400, "INVALID_REQUEST", message)


class PayloadTooLarge(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(413, "PAYLOAD_TOO_LARGE", message)


# What a system call that fails for want of a resource is out of (503 RESOURCE_EXHAUSTED).
RESOURCES = {
    errno.ENOSPC: "disk space",
    errno.EDQUOT: "disk quota",
    errno.EMFILE: "file descriptors (the daemon's limit)",
    errno.ENFILE: "file descriptors (the system's limit)",
    errno.EAGAIN: "processes or threads",
    errno.ENOMEM: "memory",
}


def json_response(data: Any, status: int = 200) -> web.Response:
    """JSON that is valid UTF-8 even when a path held undecodable bytes (they become U+FFFD)."""
    return web.json_response(data, status=status, dumps=dumps)


def error_response(status: int, code: str, message: str, **extra: Any) -> web.Response:
    return json_response({"code": code, "message": message, **extra}, status=status)


def from_exception(exc: Exception) -> ApiError | None:
    """The contract's answer for a domain error, or None for a bug."""
    match exc:
        case ApiError():
            return exc
        case web.RequestPayloadError():
            return ApiError(400, "INVALID_REQUEST", f"the body could not be read: {exc}")
        case SessionNotFound():
            return ApiError(404, "SESSION_NOT_FOUND", str(exc))
        case ShellBusy():
            return ApiError(409, "SESSION_BUSY", str(exc), run_id=exc.run_id)
        case NoActiveRun():
            return ApiError(409, "NO_ACTIVE_RUN", str(exc))
        case SessionEnded():
            return ApiError(410, "SESSION_ENDED", str(exc), state=str(exc.state), reason=exc.reason)
        case TooManySessions():
            return ApiError(429, "TOO_MANY_SESSIONS", str(exc))
        case ShuttingDown():
            return ApiError(503, "SHUTTING_DOWN", str(exc))
        case SessionStartFailed():
            if exc.errno in RESOURCES:
                return ApiError(503, "RESOURCE_EXHAUSTED", f"out of {RESOURCES[exc.errno]}: {exc}")
            return ApiError(503, "SESSION_START_FAILED", str(exc))
        case OSError() if exc.errno in RESOURCES:
            return ApiError(503, "RESOURCE_EXHAUSTED", f"out of {RESOURCES[exc.errno]}: {exc.strerror}")
        case RunNotFound():
            return ApiError(404, "RUN_NOT_FOUND", str(exc))
        case RunIdConflict():
            return ApiError(409, "RUN_ID_CONFLICT", str(exc), run_id=exc.run_id)
        case StdinNotStreamed():
            return ApiError(409, "STDIN_NOT_STREAMED", str(exc))
        case RunFinished():
            extra = {"written": exc.written} if exc.written is not None else {}
            return ApiError(409, "RUN_FINISHED", str(exc), **extra)
        case StdinClosed():
            return ApiError(409, "STDIN_CLOSED", str(exc))
        case TooManyReaders():
            return ApiError(429, "TOO_MANY_READERS", str(exc))
    return None


_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 413: "PAYLOAD_TOO_LARGE"}


def from_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own answers (unknown route, wrong method) in the contract's JSON shape."""
    code = _HTTP_CODES.get(exc.status, "INVALID_REQUEST" if exc.status < 500 else "INTERNAL")
    message = exc.reason
    if exc.status == 404:
        message = "no such route"
    elif exc.status == 405 and isinstance(exc, web.HTTPMethodNotAllowed):
        message = f"method {exc.method} is not allowed here; allowed: {', '.join(sorted(exc.allowed_methods))}"
    response = error_response(exc.status, code, message)
    if exc.status == 405:
        response.headers["Allow"] = exc.headers.get("Allow", "")
    return response
