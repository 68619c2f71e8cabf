"""Property-based fuzzing of every route of a live daemon, over raw sockets: the strategies (what a
case is), the target (a daemon, its pool of sessions, how a case is sent and checked) and the checks.

Shared by tests/test_fuzz_routes.py (a few hundred cases) and scripts/fuzz.py (a long run).

A case names sessions and runs symbolically (`Ref`): "the first live session of the pool", "a
session that was deleted", "its seed run", "the background run the prelude started", or a literal
id. The target resolves them when the case is sent, so every case stays meaningful while the fuzz
deletes sessions, ends shells and starts runs; after each case it puts the pool back as it was.

Properties of every answer: no 5xx; every non-2xx answer is JSON with `code` and `message`
(strings), aiohttp's own protocol-level 400s included; every SSE stream carries exactly one
terminal event, last, and then ends.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import json
import shlex
import socket
import zlib
from collections import Counter
from typing import Any, Literal
from urllib.parse import quote

from hypothesis import strategies as st

TOKEN = "fuzz-token-\u00e9t\u00e9"  # non-ASCII: the comparison of non-UTF-8 header bytes must hold up
TERMINAL = ("execution_complete", "error")
ANSWER_TIMEOUT_S = 60.0  # only so that a hung answer fails the case instead of the whole run
MAX_BODY_BYTES = 4096  # the daemon under fuzz is started with this limit: 413s cost little to provoke
DAEMON_ARGS = (
    "--max-body-bytes",
    str(MAX_BODY_BYTES),
    "--interrupt-grace-ms",
    "300",
    "--kill-wait-ms",
    "500",
    "--max-run-timeout-ms",
    "5000",
    "--log-format",
    "json",
)
POOL_SIZE = 2
SEED_RUN_ID = "seed"
# The background run a prelude starts: it reads stdin (streamed) for at most a second.
PRELUDE_CODE = 'read -t 1 line; echo "got [$line]"'
BACKGROUND_PLACEHOLDER = "@background-run-id"


# ----- cases ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ref:
    """A session or run id, resolved when the case is sent.

    kind: `live` (pool session `index`), `deleted` (a session deleted before the fuzz), `seed` (the
    run every pool session starts with), `last` (the pool session's newest run), `background` (the
    run the prelude started), `other` (a run of the other pool session), `literal` (`text` as is).
    """

    kind: Literal["live", "deleted", "seed", "last", "background", "other", "literal"]
    index: int = 0
    text: str = ""
    raw: bool = False  # a literal put into the path unescaped (may hold '/', '?', spaces...)


@dataclasses.dataclass(frozen=True)
class Case:
    method: bytes
    path: str  # a template: {sid} and {rid} are replaced by the resolved refs (URL-escaped)
    sid: Ref = Ref("live")
    rid: Ref = Ref("seed")
    query: tuple[tuple[str, str], ...] = ()
    auth: str = "header"  # see AUTH
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    framing: str = "length"  # see FRAMINGS
    prelude: bool = False  # start a background stdin-streamed run in pool session 0 first


AUTH = ("header", "bearer", "bearer-lower", "query", "none", "wrong", "bytes", "empty", "both-wrong-first")
FRAMINGS = ("length", "none", "chunked", "chunked-bad", "length-bad", "length-twice", "length-short")

ROUTES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/session", ("POST", "GET")),
    ("/session/{sid}", ("GET", "DELETE")),
    ("/session/{sid}/run", ("POST",)),
    ("/session/{sid}/interrupt", ("POST",)),
    ("/session/{sid}/runs", ("GET",)),
    ("/session/{sid}/runs/{rid}", ("GET",)),
    ("/session/{sid}/runs/{rid}/events", ("GET",)),
    ("/session/{sid}/runs/{rid}/stdin", ("POST",)),
    ("/healthz", ("GET",)),
    ("/ping", ("GET",)),
)
UNKNOWN_PATHS = (
    "/",
    "/nope",
    "//session",
    "/session/",
    "/session/{sid}/",
    "/session/{sid}/run/more",
    "/session/{sid}/runs/{rid}/events/x",
    "/session/{sid}/nope",
    "/metrics",
    "/openapi.json",
    "/opensandbox/ping",
    "/%2e%2e/session",
    "/session/%00",
    "/healthz/",
    "/SESSION",
)
PROTOCOL_PATHS = ("*", "http://fuzz/session", "session", "/session#frag", "/ses sion")
METHODS = ("GET", "POST", "DELETE", "HEAD", "OPTIONS", "PATCH", "PUT")


# ----- strategies: values ---------------------------------------------------------------------

# Text as JSON can carry it: any code point, lone surrogates and NUL included.
odd_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12),
    st.sampled_from(["", "\0", "\ud800", "a\udfffb", "\x7f", "\u2028", "\ufeff", "é", "💥", "../..", "$(id)", "`id`"]),
)
huge_numbers = st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, -1, -0.5, 1e308, 1.5, 0.0, 10**400])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_numbers, st.floats(), odd_text)
json_junk = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)),
    max_leaves=12,
)
env_names = st.one_of(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True),
    st.sampled_from(["EXECD_SESSION_ID", "BASH_ENV", "ENV", "SHELLOPTS", "__execd_x", "PATH", "HOME", "1X", "A-B"]),
    odd_text,
)
env_maps = st.one_of(st.dictionaries(env_names, st.one_of(odd_text, json_scalars), max_size=3), json_junk)
timeouts = st.one_of(st.integers(-5, 3000), huge_numbers, json_scalars)
dirs = st.one_of(st.sampled_from(["/", "/tmp", "tmp", "/nonexistent", "/etc/passwd", ".", ".."]), odd_text)

# Code that ends by itself within a second, whatever the rest of the body says.
SAFE_CODES = (
    "true",
    "false",
    "echo hi",
    "echo err >&2",
    "exit 3",
    "return 2",
    "sleep 0.05",
    "printf 'a\\0b\\377c'",
    "cd /tmp",
    "export FUZZ=1",
    "kill -9 $$",
    'read -t 0.2 line; echo "[$line]"',
    "sleep 0.3 & echo started",
    "for i in 1 2 3; do echo $i; done",
    "",
    "   ",
)
safe_code = st.one_of(
    st.sampled_from(SAFE_CODES),
    odd_text.map(lambda t: "echo " + shlex.quote(t)),  # NUL and lone surrogates: refused as 400 (not run)
    odd_text.map(lambda t: ": " + shlex.quote(t)),
)
run_ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True),
    st.sampled_from([SEED_RUN_ID, "", "x" * 65, "a/b", "a b", "é"]),
    odd_text,
)


@st.composite
def objects_of(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, Any]:
    """An object built from the contract's fields (each present or not), sometimes with an unknown
    field, sometimes a field of junk."""
    body: dict[str, Any] = {}
    for name, values in fields.items():
        if draw(st.booleans()):
            body[name] = draw(st.one_of(values, json_junk) if draw(st.integers(0, 9)) == 0 else values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(odd_text)] = draw(json_junk)
    return body


session_bodies = objects_of(
    {
        "cwd": dirs,
        "env": env_maps,
        "idle_timeout_s": st.one_of(st.integers(0, 10**6), huge_numbers, json_scalars),
        "labels": st.one_of(st.dictionaries(odd_text, odd_text, max_size=3), json_junk),
        "user": st.sampled_from(["root", "nobody", "0", "no-such-user"]),
    }
)
run_bodies = objects_of(
    {
        "code": safe_code,
        "command": safe_code,
        "timeout_ms": timeouts,
        "timeout": timeouts,
        "cwd": dirs,
        "env": env_maps,
        "stdin": st.one_of(st.none(), st.just("stream"), odd_text),
        "on_disconnect": st.one_of(st.sampled_from(["interrupt", "continue"]), odd_text),
        "disconnect_grace_ms": st.one_of(st.integers(0, 500), huge_numbers, json_scalars),
        "background": st.one_of(st.booleans(), json_scalars),
        "run_id": run_ids,
    }
)
interrupt_bodies = objects_of(
    {
        "signal": st.one_of(
            st.sampled_from(["SIGINT", "SIGTERM", "SIGKILL", "SIGHUP", "INT", "sigint", "9"]), odd_text
        ),
        "run_id": run_ids,
    }
)
stdin_bodies = objects_of(
    {"data": st.one_of(odd_text, st.text(max_size=200)), "eof": st.one_of(st.booleans(), json_scalars)}
)
BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/session": session_bodies,
    "/session/{sid}/run": run_bodies,
    "/session/{sid}/interrupt": interrupt_bodies,
    "/session/{sid}/runs/{rid}/stdin": stdin_bodies,
}


def _dumps_raw(value: Any) -> bytes:
    """JSON with non-ASCII written as it is: lone surrogates become bytes that are not UTF-8."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def encoded(draw: st.DrawFn, value: st.SearchStrategy[Any]) -> bytes:
    """A body as bytes: JSON (escaped or raw), JSON cut short, a non-object, bytes, whitespace..."""
    how = draw(st.sampled_from(["json", "json", "json", "raw", "cut", "junk", "bytes", "empty", "space", "deep"]))
    if how == "json":
        return json.dumps(draw(value)).encode()
    if how == "raw":
        return _dumps_raw(draw(value))
    if how == "cut":
        whole = json.dumps(draw(value)).encode()
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if how == "junk":
        return json.dumps(draw(json_junk)).encode()
    if how == "bytes":
        return draw(st.binary(max_size=64))
    if how == "empty":
        return b""
    if how == "space":
        return b" \r\n\t "
    depth = draw(st.sampled_from([10, 1000, 100_000]))
    return (b"[" * depth + b"]" * depth)[: MAX_BODY_BYTES * 2]


# ----- strategies: ids, queries, headers --------------------------------------------------------

session_refs = st.one_of(
    st.builds(Ref, st.just("live"), st.integers(0, POOL_SIZE - 1)),
    st.just(Ref("deleted")),
    st.builds(Ref, st.just("literal"), text=odd_text),
    st.builds(Ref, st.just("literal"), text=st.sampled_from(["..", ".", "%", "a/b", "?x", "#"]), raw=st.just(True)),
)
run_refs = st.one_of(
    st.sampled_from([Ref("seed"), Ref("last"), Ref("other"), Ref("background")]),
    st.builds(Ref, st.just("literal"), text=run_ids),
)
query_values = st.one_of(
    st.sampled_from(["0", "1", "2", "-1", "00", "1e3", " 1", "\u0661", "99999999999999999999999", "", TOKEN, "x"]),
    odd_text,
)
queries = st.lists(
    st.tuples(st.sampled_from(["after", "access_token", "after", "x", ""]), query_values), max_size=3
).map(tuple)
header_bytes = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
latin1_bytes = st.binary(max_size=24).filter(lambda b: all(c >= 0x20 and c != 0x7F for c in b))
# Headers the daemon reads, or that aiohttp acts on before the daemon's code sees the request.
KNOWN_HEADERS = (
    b"X-EXECD-ACCESS-TOKEN",
    b"Authorization",
    b"Last-Event-ID",
    b"Content-Encoding",
    b"Accept",
    b"Accept-Encoding",
    b"X-Anything",
)
# What aiohttp's parser refuses twice (RFC 9110 singletons): only the protocol-level cases repeat them.
SINGLETONS = (b"Host", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"User-Agent", b"Server", b"ETag")
FRAMING_HEADERS = (b"connection", b"expect", b"content-location", b"content-range", b"max-forwards")
token_names = st.from_regex(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,12}", fullmatch=True).filter(
    lambda name: name.lower() not in (*(n.lower() for n in SINGLETONS), *FRAMING_HEADERS)
)
header_names = st.one_of(st.sampled_from(KNOWN_HEADERS), token_names)
# `Expect` is answered by aiohttp's route machinery before any middleware (see the test file).
expect_values = st.one_of(st.sampled_from([b"100-continue", b"100-Continue", b"", b"junk", b"200-ok"]), latin1_bytes)
content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=latin-1",
        b"text/plain",
        b"multipart/form-data; boundary=x",
        b"application/x-www-form-urlencoded",
        b"\xff\xfe",
        b"",
    ]
)
last_event_ids = st.one_of(st.sampled_from([b"0", b"1", b"2", b"-1", b"x", b"", b"\xd9\xa1", b"10" * 20]), latin1_bytes)


@st.composite
def encodings(draw: st.DrawFn, body: bytes, brotli: bool) -> tuple[tuple[tuple[bytes, bytes], ...], bytes]:
    """A Content-Encoding and the body as sent: compressed right, or bytes that do not decode.
    `brotli`: also `br`, which aiohttp's parser refuses itself when Brotli is not installed."""
    hows = ["none", "gzip", "deflate", "gzip-bad", "deflate-bad", "junk", "identity"]
    how = draw(st.sampled_from([*hows, "br"] if brotli else hows))
    if how == "none":
        return (), body
    if how == "gzip":
        return ((b"Content-Encoding", b"gzip"),), gzip.compress(body)
    if how == "deflate":
        return ((b"Content-Encoding", b"deflate"),), zlib.compress(body)
    if how in ("gzip-bad", "deflate-bad"):
        return ((b"Content-Encoding", how[:-4].encode()),), body + b"\x00\xff not compressed"
    if how == "br":
        return ((b"Content-Encoding", b"br"),), body or b"\x8b\x02\x80"
    if how == "identity":
        return ((b"Content-Encoding", b"identity"),), body
    return ((b"Content-Encoding", draw(st.sampled_from([b"x-junk", b"gzip, br", b"\xff", b"compress"]))),), body


# ----- strategies: cases ----------------------------------------------------------------------


@st.composite
def cases(draw: st.DrawFn, *, headers: bool = False, protocol: bool = False, route: str | None = None) -> Case:
    """Any well-formed request to any route. `headers` adds any header name and `Expect`;
    `protocol` adds (instead of `Expect`) what aiohttp's parser answers itself: control bytes in
    headers, odd methods, broken chunked framing and Content-Length, `Content-Encoding: br`,
    a duplicate `Host`."""
    headers = headers or protocol
    if route is not None:
        path = route
        method = draw(st.sampled_from(dict(ROUTES)[route]))
    elif draw(st.integers(0, 7)) == 0:
        path = draw(st.sampled_from(UNKNOWN_PATHS + PROTOCOL_PATHS if protocol else UNKNOWN_PATHS))
        method = draw(st.sampled_from(METHODS))
    else:
        path, allowed = draw(st.sampled_from(ROUTES))
        method = draw(st.sampled_from(allowed)) if draw(st.integers(0, 5)) else draw(st.sampled_from(METHODS))
    if protocol and draw(st.integers(0, 5)) == 0:
        method = draw(st.sampled_from(["FOO", "get", "GET ", "G\u00c9T", "CONNECT", "TRACE", "PRI"]))
    body_value = BODIES.get(path, json_junk) if method == "POST" else json_junk
    body = draw(encoded(body_value)) if method in ("POST", "PUT", "PATCH") or draw(st.integers(0, 9)) == 0 else b""
    sent: list[tuple[bytes, bytes]] = []
    if body or draw(st.booleans()):
        encoding, body = draw(encodings(body, brotli=protocol))
        sent.extend(encoding)
        if draw(st.integers(0, 3)):
            sent.append((b"Content-Type", draw(content_types)))
    if "{rid}" in path and draw(st.integers(0, 3)) == 0:
        sent.append((b"Last-Event-ID", draw(last_event_ids)))
    if not headers:
        sent.extend(draw(st.lists(st.tuples(st.sampled_from(KNOWN_HEADERS), latin1_bytes), max_size=1)))
    else:
        names = st.one_of(header_names, st.sampled_from(SINGLETONS)) if protocol else header_names
        sent.extend(draw(st.lists(st.tuples(names, header_bytes if protocol else latin1_bytes), max_size=2)))
        if not protocol and draw(st.booleans()):  # kept apart: not a parser error (see the test file)
            sent.append((b"Expect", draw(expect_values)))
    framing = draw(st.sampled_from(FRAMINGS)) if protocol else draw(st.sampled_from(["length", "length", "chunked"]))
    auth = draw(st.sampled_from(AUTH))
    return Case(
        method=method.encode("utf-8"),
        path=path,
        sid=draw(session_refs),
        rid=draw(run_refs),
        query=draw(queries) if draw(st.integers(0, 2)) == 0 or "{rid}" in path else (),
        auth=auth,
        headers=tuple(sent),
        body=body,
        framing=framing,
        prelude="{sid}" in path and draw(st.integers(0, 3)) == 0,
    )


@st.composite
def run_cases(draw: st.DrawFn) -> Case:
    """A run started with a valid-looking body (sometimes a retry of the seed run) in a live
    session: what the stream carries is the point."""
    body = draw(objects_of({"timeout_ms": timeouts, "stdin": st.one_of(st.none(), st.just("stream"), odd_text)}))
    body["code"] = draw(safe_code)
    if draw(st.integers(0, 4)) == 0:
        body["run_id"] = draw(run_ids)
    if draw(st.integers(0, 4)) == 0:
        body["background"] = True
    live = st.builds(Ref, st.just("live"), st.integers(0, POOL_SIZE - 1))
    return Case(
        method=b"POST",
        path="/session/{sid}/run",
        sid=draw(live if draw(st.integers(0, 5)) else session_refs),
        body=json.dumps(body).encode(),
        auth=draw(st.sampled_from(["header", "bearer"])),
    )


@st.composite
def live_run_cases(draw: st.DrawFn) -> Case:
    """stdin, interrupt and events of the run a prelude started, which is still reading stdin."""
    path = draw(
        st.sampled_from(
            ["/session/{sid}/runs/{rid}/stdin", "/session/{sid}/interrupt", "/session/{sid}/runs/{rid}/events"]
        )
    )
    if path.endswith("/events"):
        body = b""
    else:
        value = draw(BODIES[path])
        if path.endswith("/interrupt") and draw(st.booleans()):
            value["run_id"] = BACKGROUND_PLACEHOLDER  # the prelude's run, by its id
        body = json.dumps(value).encode()
    return Case(
        method=b"GET" if path.endswith("/events") else b"POST",
        path=path,
        sid=Ref("live", 0),
        rid=draw(st.sampled_from([Ref("background"), Ref("background"), Ref("seed")])),
        query=draw(queries),
        auth=draw(st.sampled_from(["header", "bearer", "query"])),
        body=body,
        prelude=True,
    )


def all_cases() -> st.SearchStrategy[Case]:
    """The long run's mix."""
    return st.one_of(cases(), cases(), cases(headers=True), cases(protocol=True), run_cases(), live_run_cases())


# ----- answers --------------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    reason: bytes
    headers: dict[bytes, bytes]  # lower-case names; a repeated header keeps its last value
    body: bytes
    chunked_complete: bool | None = None  # None when not chunked

    @property
    def content_type(self) -> str:
        return self.headers.get(b"content-type", b"").split(b";")[0].strip().decode("latin-1").lower()

    def json(self) -> Any:
        return json.loads(self.body)


class ProtocolError(Exception):
    pass


def parse_answers(raw: bytes, head_request: bool) -> list[Answer]:
    """Every HTTP/1.1 response in `raw` (a connection read to its end)."""
    answers: list[Answer] = []
    rest = raw
    while rest:
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            raise ProtocolError(f"a response without the end of its head: {head[:200]!r}")
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not a status line: {lines[0][:200]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        status = int(parts[1])
        answer = Answer(status, parts[2] if len(parts) > 2 else b"", headers, b"")
        first = not any(a.status >= 200 for a in answers)  # the answer to the request itself
        if head_request and first and not (rest.startswith(b"HTTP/") or b"content-length" not in headers):
            # A body after the head of an answer to HEAD: aiohttp's parser refused the request
            # before it knew it was a HEAD, and answered with a body. Read it as such.
            length = int(headers[b"content-length"])
            answer.body, rest = rest[:length], rest[length:]
        elif (head_request and first) or status in (204, 304) or 100 <= status < 200:
            pass
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            answer.body, rest, answer.chunked_complete = _dechunk(rest)
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            if len(rest) < length:
                raise ProtocolError(f"the body ended after {len(rest)} of {length} bytes")
            answer.body, rest = rest[:length], rest[length:]
        else:
            answer.body, rest = rest, b""
        answers.append(answer)
    return answers


def _dechunk(data: bytes) -> tuple[bytes, bytes, bool]:
    body = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            return bytes(body), b"", False
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, sep, data = data.partition(b"\r\n")  # no trailers expected
            return bytes(body), data, bool(sep)
        if len(data) < size + 2:
            body += data[:size]
            return bytes(body), b"", False
        body += data[:size]
        data = data[size + 2 :]


def sse_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(type, data) of every event of a stream; comments skipped. Raises on a malformed frame."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        fields = dict(line.split(": ", 1) for line in lines)
        if set(fields) - {"id", "event", "data"} or "event" not in fields or "data" not in fields:
            raise ProtocolError(f"a malformed SSE frame: {block[:300]!r}")
        data = json.loads(fields["data"])
        if data.get("type") != fields["event"]:
            raise ProtocolError(f"event {fields['event']!r} carries type {data.get('type')!r}")
        events.append((fields["event"], data))
    return events


# The kinds of problem, as the first word(s) of each problem's text.
FIVE_XX = "5xx"
PROTOCOL_TEXT = "protocol-level 400 not JSON"  # aiohttp's parser answered itself, in text/plain
NOT_JSON = "not JSON"
BAD_STREAM = "bad stream"
NO_ANSWER = "no answer"
KINDS = (FIVE_XX, PROTOCOL_TEXT, NOT_JSON, BAD_STREAM, NO_ANSWER)


def kind_of(problem: str) -> str:
    return next(kind for kind in KINDS if problem.startswith(kind))


def check(answer: Answer, head: bool = False) -> list[str]:
    """What is wrong with one answer, by the contract's rules for every route."""
    problems = []
    if answer.status >= 500:
        problems.append(f"{FIVE_XX}: {answer.status} {answer.body[:200]!r}")
    if answer.status >= 300 and not head:
        try:
            body = answer.json()
        except ValueError:
            kind = PROTOCOL_TEXT if answer.status == 400 and answer.content_type == "text/plain" else NOT_JSON
            problems.append(f"{kind}: {answer.status} ({answer.content_type or 'no type'}) {answer.body[:200]!r}")
        else:
            if not (
                isinstance(body, dict) and isinstance(body.get("code"), str) and isinstance(body.get("message"), str)
            ):
                problems.append(f"{NOT_JSON}: a {answer.status} without string code and message: {answer.body[:300]!r}")
            elif answer.content_type != "application/json":
                problems.append(f"{NOT_JSON}: a JSON {answer.status} with Content-Type {answer.content_type!r}")
    if answer.status == 200 and answer.content_type == "text/event-stream" and not head:
        problems.extend(f"{BAD_STREAM}: {problem}" for problem in check_stream(answer))
    return problems


def check_stream(answer: Answer) -> list[str]:
    if answer.chunked_complete is False:
        return ["the stream did not end cleanly (no last chunk)"]
    try:
        events = sse_events(answer.body)
    except (ProtocolError, ValueError, UnicodeDecodeError) as exc:
        return [f"a malformed stream: {exc}"]
    terminals = [i for i, (kind, _) in enumerate(events) if kind in TERMINAL]
    if len(terminals) != 1 or terminals[0] != len(events) - 1:
        return [f"not exactly one terminal event, last: {[kind for kind, _ in events]}"]
    return []


# ----- the target -----------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    case: Case
    sent: bytes
    answers: list[Answer]
    problems: list[str]
    prelude_sent: bytes = b""

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]

    def reproducer(self) -> str:
        case = repr(self.case)
        lines = [f"case: {case if len(case) <= 1500 else case[:1500] + '...'}"]
        if self.prelude_sent:
            lines.append(f"first (the prelude, expect 202): {self.prelude_sent!r}")
        sent = self.sent if len(self.sent) <= 1200 else self.sent[:1200] + b"..."
        lines.append(f"then send on a fresh connection ({len(self.sent)} bytes): {sent!r}")
        for answer in self.answers:
            lines.append(f"answer: {answer.status} {answer.headers.get(b'content-type', b'')!r} {answer.body[:300]!r}")
        return "\n".join(lines)


class Target:
    """A live daemon, its pool of sessions, and the cases sent to it."""

    def __init__(self, host: str, port: int, token: str = TOKEN) -> None:
        self.host, self.port, self.token = host, port, token
        self.pool: list[str] = []
        self.last_run: dict[str, str] = {}
        self.deleted = ""
        self.background = ""
        self.seen_sessions: set[str] = set()
        self.statuses: Counter[int] = Counter()
        self.cases = 0

    # --- plain requests, with the token ---

    def raw(self, request: bytes, head: bool = False) -> tuple[list[Answer], list[str]]:
        with socket.create_connection((self.host, self.port), timeout=ANSWER_TIMEOUT_S) as sock:
            sock.sendall(request)
            chunks = []
            try:
                while data := sock.recv(65536):
                    chunks.append(data)
            except TimeoutError:
                return [], [f"{NO_ANSWER}: none complete within {ANSWER_TIMEOUT_S}s: {b''.join(chunks)[:300]!r}"]
            except ConnectionResetError:
                pass  # the daemon may close a connection with a request body it did not read
        raw = b"".join(chunks)
        if not raw:
            return [], [f"{NO_ANSWER}: the connection closed without one"]
        try:
            return parse_answers(raw, head), []
        except (ProtocolError, ValueError) as exc:
            return [], [f"{NO_ANSWER}: an answer that does not parse ({exc}): {raw[:300]!r}"]

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        data = b"" if body is None else json.dumps(body).encode()
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nX-EXECD-ACCESS-TOKEN: ".encode()
            + self.token.encode()
            + f"\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        answers, problems = self.raw(request)
        assert answers and not problems, (request, problems)
        for answer in answers:
            found = check(answer)
            assert not found, (request, found, answer)
        return answers[0]

    # --- the pool ---

    def set_up(self) -> None:
        self.pool = [self._new_session() for _ in range(POOL_SIZE)]
        self.deleted = self._new_session()
        assert self.call("DELETE", f"/session/{self.deleted}").status == 200

    def _new_session(self) -> str:
        answer = self.call("POST", "/session", {})
        assert answer.status == 200, answer
        sid: str = answer.json()["session_id"]
        self.seen_sessions.add(sid)
        seed = self.call("POST", f"/session/{sid}/run", {"code": "echo seed", "run_id": SEED_RUN_ID})
        assert seed.status == 200, seed
        self.last_run[sid] = SEED_RUN_ID
        return sid

    def restore(self) -> None:
        """Put the pool back: end runs in progress, replace sessions that ended or were deleted."""
        for index, sid in enumerate(self.pool):
            answer = self.call("GET", f"/session/{sid}")
            if answer.status == 200 and answer.json()["state"] == "running":
                self._finish(sid, answer.json()["current_run_id"])
                answer = self.call("GET", f"/session/{sid}")
            if answer.status == 200 and answer.json()["state"] == "idle":
                continue
            if answer.status == 200:
                assert self.call("DELETE", f"/session/{sid}").status == 200
            self.pool[index] = self._new_session()

    def _finish(self, sid: str, run_id: str) -> None:
        """Interrupt a run and read its events to the end (the stream must hold up too)."""
        self.call("POST", f"/session/{sid}/interrupt", {"run_id": run_id})  # 202, or 409 if it just ended
        events = self.call("GET", f"/session/{sid}/runs/{quote(run_id, safe='')}/events")
        assert events.status in (200, 204), events

    def tear_down(self) -> list[dict[str, Any]]:
        """Delete every session; return what GET /session still lists."""
        for sid in self.pool:
            self.call("DELETE", f"/session/{sid}")
        self.pool = []
        for session in self.call("GET", "/session").json()["sessions"]:
            self.call("DELETE", f"/session/{session['session_id']}")
        listed: list[dict[str, Any]] = self.call("GET", "/session").json()["sessions"]
        return listed

    # --- cases ---

    def resolve(self, ref: Ref, sid: str) -> str:
        match ref.kind:
            case "live":
                return self.pool[ref.index % len(self.pool)]
            case "deleted":
                return self.deleted
            case "seed":
                return SEED_RUN_ID
            case "last":
                return self.last_run.get(sid, SEED_RUN_ID)
            case "background":
                return self.background or "no-background-run"
            case "other":
                others = [s for s in self.pool if s != sid]
                return self.last_run.get(others[0], SEED_RUN_ID) if others else SEED_RUN_ID
        return ref.text

    def build(self, case: Case) -> bytes:
        sid = self.resolve(case.sid, "")
        rid = self.resolve(case.rid, sid)

        def segment(ref: Ref, value: str) -> str:
            if ref.kind == "literal" and ref.raw:
                return value
            return quote(value.encode("utf-8", "surrogatepass"), safe="")

        path = case.path.replace("{sid}", segment(case.sid, sid)).replace("{rid}", segment(case.rid, rid))
        query = list(case.query)
        headers: list[tuple[bytes, bytes]] = [(b"Host", b"fuzz"), (b"Connection", b"close")]
        token = self.token.encode()
        match case.auth:
            case "header":
                headers.append((b"X-EXECD-ACCESS-TOKEN", token))
            case "bearer":
                headers.append((b"Authorization", b"Bearer " + token))
            case "bearer-lower":
                headers.append((b"authorization", b"bearer  " + token + b" "))
            case "query":
                query.append(("access_token", self.token))
            case "wrong":
                headers.append((b"X-EXECD-ACCESS-TOKEN", token[:-1]))
            case "bytes":
                headers.append((b"X-EXECD-ACCESS-TOKEN", self.token.encode("latin-1")))
            case "empty":
                headers.append((b"Authorization", b"Bearer "))
            case "both-wrong-first":
                headers += [(b"X-EXECD-ACCESS-TOKEN", b"nope"), (b"Authorization", b"Bearer " + token)]
        if query:
            path += "?" + "&".join(
                quote(k.encode("utf-8", "surrogatepass"), safe="")
                + "="
                + quote(v.encode("utf-8", "surrogatepass"), safe="")
                for k, v in query
            )
        body = case.body.replace(json.dumps(BACKGROUND_PLACEHOLDER).encode(), json.dumps(self.background).encode())
        headers.extend(case.headers)
        match case.framing:
            case "length":
                if body or case.method in (b"POST", b"PUT", b"PATCH"):
                    headers.append((b"Content-Length", str(len(body)).encode()))
            case "none":
                pass
            case "chunked" | "chunked-bad":
                headers.append((b"Transfer-Encoding", b"chunked"))
                body = _chunked(body, bad=case.framing == "chunked-bad")
            case "length-bad":
                headers.append((b"Content-Length", b"-1" if body else b"abc"))
            case "length-twice":
                headers += [(b"Content-Length", str(len(body)).encode())] * 2
            case "length-short":
                headers.append((b"Content-Length", str(max(0, len(body) - 3)).encode()))
        head = case.method + b" " + path.encode("utf-8", "surrogatepass") + b" HTTP/1.1\r\n"
        head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        return head + b"\r\n" + body

    def run_case(self, case: Case) -> Outcome:
        prelude_sent = b""
        if case.prelude:
            prelude_sent = self._prelude()
        request = self.build(case)
        head = case.method == b"HEAD"
        answers, problems = self.raw(request, head=head)
        for answer in answers:
            problems.extend(check(answer, head))
        self.cases += 1
        for answer in answers:
            self.statuses[answer.status] += 1
        self._learn(case, answers)
        self.restore()
        return Outcome(case, request, answers, problems, prelude_sent)

    def _prelude(self) -> bytes:
        sid = self.pool[0]
        self.background = f"bg-{self.cases}"
        body = {"code": PRELUDE_CODE, "background": True, "stdin": "stream", "run_id": self.background}
        answer = self.call("POST", f"/session/{sid}/run", body)
        assert answer.status == 202, answer
        self.last_run[sid] = self.background
        return json.dumps(body).encode()

    def _learn(self, case: Case, answers: list[Answer]) -> None:
        """Sessions the case created (deleted now) and runs it started (ids for later cases)."""
        if not answers or answers[0].status not in (200, 202):
            return
        answer = answers[0]
        if case.path == "/session" and case.method == b"POST" and answer.content_type == "application/json":
            sid = answer.json()["session_id"]
            self.seen_sessions.add(sid)
            assert self.call("DELETE", f"/session/{sid}").status == 200
        elif case.path.endswith("/run") and case.method == b"POST":
            sid = self.resolve(case.sid, "")
            if answer.status == 202:
                self.last_run[sid] = answer.json()["run_id"]
            elif answer.content_type == "text/event-stream":
                for kind, data in sse_events(answer.body):
                    if kind == "init":
                        self.last_run[sid] = data["run_id"]


def _chunked(body: bytes, bad: bool) -> bytes:
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    out = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces)
    if bad:
        return out + b"zz\r\n" + base64.b64encode(body[:4]) + b"\r\n0\r\n\r\n"
    return out + b"0\r\n\r\n"


def histogram(statuses: Counter[int]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))
