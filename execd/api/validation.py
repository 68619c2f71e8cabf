"""Reading and checking request bodies: every problem is a 400 (or 413) that names the field."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from execd import identity
from execd.api import openapi
from execd.api.errors import InvalidRequest, PayloadTooLarge
from execd.api.keys import SETTINGS
from execd.registry import Place, SessionOptions

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Which fields each body may carry: the OpenAPI document's request schemas say it, once.
SESSION_FIELDS = openapi.fields_of(openapi.SESSION_REQUEST)
RUN_FIELDS = openapi.fields_of(openapi.RUN_REQUEST)
STDIN_FIELDS = openapi.fields_of(openapi.STDIN_REQUEST)
INTERRUPT_FIELDS = openapi.fields_of(openapi.INTERRUPT_REQUEST)
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}`. Over the body limit is a 413; a body that
    has not arrived within the request timeout is a 400 (a slow client must not hold a handler)."""
    settings = request.app[SETTINGS]
    raw = await _read_body(request, settings.max_body_bytes, settings.request_timeout_s)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


async def _read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"the body ({request.content_length} bytes) is over the limit of {max_bytes} bytes")
    # Most bodies came with the headers: take what is there, and wait (within the timeout) only
    # while more is to come.
    chunk = request.content.read_nowait()
    if request.content.at_eof():
        _check_size(len(chunk), max_bytes)
        return chunk
    chunks, size = [chunk], len(chunk)
    try:
        async with asyncio.timeout(timeout_s):
            while not request.content.at_eof():
                chunk = await request.content.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                _check_size(size, max_bytes)
                chunks.append(chunk)
    except TimeoutError:
        raise InvalidRequest(f"the body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def _check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise PayloadTooLarge(f"the body is over the limit of {max_bytes} bytes")


class Fields:
    """Typed access to a body's fields; unknown fields are refused."""

    def __init__(self, body: Mapping[str, Any], allowed: AbstractSet[str]) -> None:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
        self.body = body

    def aliased(self, name: str, alias: str) -> Any:
        if name in self.body and alias in self.body:
            raise InvalidRequest(f"give either {name!r} or its alias {alias!r}, not both")
        return self.body.get(name, self.body.get(alias))

    def string(self, name: str, value: Any = None, *, allow_none: bool = True) -> str | None:
        value = self.body.get(name) if value is None else value
        if value is None and allow_none:
            return None
        if not isinstance(value, str):
            raise InvalidRequest(f"{name!r} must be a string")
        if "\0" in value:
            raise InvalidRequest(f"{name!r} must not contain NUL characters")
        _check_unicode(name, value)
        return value

    def boolean(self, name: str) -> bool:
        value = self.body.get(name)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidRequest(f"{name!r} must be true or false")
        return value

    def number(self, name: str, value: Any = None, *, integer: bool = False) -> float | None:
        value = self.body.get(name) if value is None else value
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not _is_integral(value)):
            raise InvalidRequest(f"{name!r} must be {'an integer' if integer else 'a number'}")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            raise InvalidRequest(f"{name!r} is out of range")
        if value < 0:
            raise InvalidRequest(f"{name!r} must not be negative")
        return value

    def string_map(self, name: str, *, env_names: bool = False) -> dict[str, str]:
        value = self.body.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InvalidRequest(f"{name!r} must be an object of strings")
        for key, item in value.items():
            if not isinstance(item, str):
                raise InvalidRequest(f"{name}[{key!r}] must be a string")
            if "\0" in item or "\0" in key:
                raise InvalidRequest(f"{name}[{key!r}] must not contain NUL characters")
            if env_names and not ENV_NAME.match(key):
                raise InvalidRequest(f"{name}: {key!r} is not a valid variable name")
            if env_names:
                _check_env_name(name, key)
            _check_unicode(f"{name}[{key!r}]", key + item)
        return dict(value)


# What would change how the shell starts or runs the daemon's wrapper, or hide a process from the
# session sweep: never from a client.
SHELL_CONTROL_NAMES = frozenset({"BASH_ENV", "ENV", "SHELLOPTS", "BASHOPTS", "POSIXLY_CORRECT"})


def _check_env_name(name: str, key: str) -> None:
    if key.lower().startswith("__execd"):
        raise InvalidRequest(f"{name}: {key!r} is reserved for the daemon's wrapper")
    if key.startswith("EXECD_"):
        raise InvalidRequest(f"{name}: {key!r} is reserved: EXECD_* names are the daemon's (and its session tag)")
    if key in SHELL_CONTROL_NAMES:
        raise InvalidRequest(f"{name}: {key!r} would change how bash starts or runs; it cannot be set here")


def _check_unicode(name: str, value: str) -> None:
    """A lone surrogate (JSON allows "\\ud800") is no character: it can be neither run nor shown."""
    if not value.isascii() and LONE_SURROGATE.search(value):
        raise InvalidRequest(f"{name!r} must be valid Unicode (it holds a lone surrogate)")


def _is_integral(value: float) -> bool:
    return isinstance(value, int) or float(value).is_integer()


def directory(name: str, path: str | None, base: str, user: identity.Identity | None, root: str = "/") -> str | None:
    """A directory that must exist (under the shell's `root`); a relative one is taken from
    `base`, as `cd` would. For a shell of another user, one that user may enter (checked as that
    user, not as the daemon)."""
    if path is None:
        return None
    full = os.path.join(base, path)
    real = identity.real_path(full, root)
    if real is None or not identity.is_directory(real, root):
        raise InvalidRequest(f"{name!r}: {path!r} is not a directory")
    if user is not None and not user.may_enter(full, root):
        raise InvalidRequest(f"{name!r}: user {user.name!r} may not enter {path!r}")
    return path


def user(value: Any, place: Place) -> identity.Identity | None:
    """A session's `user`: a name or a numeric uid (as a number or a string), of the place its
    shell starts in."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequest("'user' must be a user name or a numeric uid")
    try:
        return place.resolve_user(str(value))
    except identity.UnknownIdentity as exc:
        raise InvalidRequest(f"'user': {exc}") from None


MAX_LABELS = 64
MAX_LABEL_KEY = 256
MAX_LABEL_VALUE = 4096


def labels(value: dict[str, str]) -> dict[str, str]:
    """Labels are for finding sessions, not for storing data: 64 at most, keys of up to 256 and
    values of up to 4,096 characters."""
    if len(value) > MAX_LABELS:
        raise InvalidRequest(f"'labels': {len(value)} labels, more than the {MAX_LABELS} allowed")
    for key, item in value.items():
        if len(key) > MAX_LABEL_KEY or len(item) > MAX_LABEL_VALUE:
            raise InvalidRequest(
                f"'labels'[{key[:40]!r}]: keys may have {MAX_LABEL_KEY} characters, values {MAX_LABEL_VALUE}"
            )
    return value


def session_spec(body: Mapping[str, Any], place: Place) -> SessionOptions:
    fields = Fields(body, SESSION_FIELDS)
    cwd = fields.string("cwd")
    if cwd is not None and not os.path.isabs(cwd):
        raise InvalidRequest(f"'cwd': {cwd!r} must be an absolute path")
    who = user(body.get("user"), place)
    return SessionOptions(
        cwd=directory("cwd", cwd, "/", who or place.default_user, place.root),
        env=fields.string_map("env", env_names=True),
        idle_timeout_s=fields.number("idle_timeout_s"),
        labels=labels(fields.string_map("labels")),
        user=who,
        place=place,
    )


RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


@dataclass(frozen=True)
class RunSpec:
    code: str
    timeout_ms: int
    cwd: str | None
    env: dict[str, str]
    stdin: str | None
    stdin_stream: bool
    run_id: str | None
    background: bool
    on_disconnect: Literal["interrupt", "continue"]
    disconnect_grace_ms: int | None


def run_spec(body: Mapping[str, Any], session_cwd: str, user: identity.Identity | None, root: str = "/") -> RunSpec:
    fields = Fields(body, RUN_FIELDS)
    code = fields.aliased("code", "command")
    if code is None:
        raise InvalidRequest("'code' is required")
    code = fields.string("code", code, allow_none=False)
    timeout = fields.number("timeout_ms", fields.aliased("timeout_ms", "timeout"), integer=True)
    stdin = fields.string("stdin")
    background = fields.boolean("background")
    on_disconnect = fields.string("on_disconnect")
    if on_disconnect not in (None, "interrupt", "continue"):
        raise InvalidRequest(f'\'on_disconnect\': {on_disconnect!r} is not one of "interrupt", "continue"')
    if background and on_disconnect == "interrupt":
        raise InvalidRequest("a 'background' run has no reader to belong to: 'on_disconnect' cannot be \"interrupt\"")
    grace = fields.number("disconnect_grace_ms", integer=True)
    run_id = fields.string("run_id")
    if run_id is not None and not RUN_ID.match(run_id):
        raise InvalidRequest(f"'run_id': {run_id!r} must match ^[A-Za-z0-9._-]{{1,64}}$")
    return RunSpec(
        code=code or "",
        timeout_ms=int(timeout or 0),
        cwd=directory("cwd", fields.string("cwd"), session_cwd, user, root),
        env=fields.string_map("env", env_names=True),
        stdin=None if stdin == "stream" else stdin,
        stdin_stream=stdin == "stream",
        run_id=run_id,
        background=background,
        on_disconnect="continue" if on_disconnect == "continue" or background else "interrupt",
        disconnect_grace_ms=None if grace is None else int(grace),
    )


@dataclass(frozen=True)
class StdinSpec:
    data: bytes
    eof: bool


def stdin_spec(body: Mapping[str, Any]) -> StdinSpec:
    fields = Fields(body, STDIN_FIELDS)
    data = body.get("data")
    if data is not None and not isinstance(data, str):
        raise InvalidRequest("'data' must be a string")
    if data:
        _check_unicode("data", data)  # NUL is fine here: it goes down a pipe, not into bash's words
    return StdinSpec(data=(data or "").encode(), eof=fields.boolean("eof"))


def cursor(value: str | None, last_seq: int) -> int | None:
    """A reader's cursor from Last-Event-ID or ?after=: a seq the run has reached, or None."""
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise InvalidRequest(f"the cursor {value[:40]!r} is not a non-negative integer")
    seq = int(value)
    if seq > last_seq:
        raise InvalidRequest(f"the cursor {seq} is past the run's last event ({last_seq})")
    return seq


@dataclass(frozen=True)
class InterruptSpec:
    signal: signal.Signals
    run_id: str | None


def interrupt_spec(body: Mapping[str, Any]) -> InterruptSpec:
    fields = Fields(body, INTERRUPT_FIELDS)
    name = fields.string("signal") or "SIGINT"
    if name not in SIGNALS:
        raise InvalidRequest(f"'signal': {name!r} is not one of {', '.join(SIGNALS)}")
    return InterruptSpec(signal=SIGNALS[name], run_id=fields.string("run_id"))
