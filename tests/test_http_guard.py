"""The HTTP protocol around the application: protocol errors answer the contract's JSON, open
connections are capped, a connection must send its first request in time and a body must arrive
in time. A real daemon (`execd serve`) on a real socket, bytes as a hostile client sends them."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers_control import ServedDaemon, served

WAIT_S = 30.0  # for a socket read that must end: a safety net, never a measure


@pytest.fixture(scope="module")
def daemon() -> Iterator[ServedDaemon]:
    with served("--max-connections", "8", "--request-timeout-s", "0.5") as daemon:
        yield daemon


def exchange(daemon: ServedDaemon, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT_S) as conn:
        conn.sendall(raw)
        return _read_all(conn)


def _read_all(conn: socket.socket) -> bytes:
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    return answer


def status_and_json(answer: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    return int(head.split(b" ", 2)[1]), json.loads(body)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"POST /session HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"BREW /session HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
    ids=["oversized-header", "bad-chunking", "unknown-method", "tls-on-http", "negative-length", "bad-version"],
)
def test_protocol_errors_answer_the_contracts_json(daemon: ServedDaemon, raw: bytes) -> None:
    status, body = status_and_json(exchange(daemon, raw))
    assert 400 <= status < 500
    assert body["code"] == "INVALID_REQUEST" and body["message"].startswith("the request could not be read")


def test_connections_past_the_cap_get_a_503_and_the_daemon_serves_once_they_close(daemon: ServedDaemon) -> None:
    held = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(8)]
    try:
        for conn in held:  # each is accepted (a request on it is served) and stays open
            conn.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        status, body = status_and_json(exchange(daemon, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert (status, body["code"]) == (503, "RESOURCE_EXHAUSTED")
    finally:
        for conn in held:
            conn.close()
    answer = b""
    for _ in range(100):  # the daemon learns of the closes as its loop turns
        answer = exchange(daemon, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if answer.startswith(b"HTTP/1.1 200"):
            break
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_a_connection_that_sends_nothing_is_closed(daemon: ServedDaemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT_S) as conn:
        assert conn.recv(4096) == b""  # closed by the daemon, not by this socket's timeout


def test_a_request_head_sent_a_byte_at_a_time_too_slowly_is_cut_off(daemon: ServedDaemon) -> None:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=WAIT_S) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHo")
        assert _read_all(conn) == b""


def test_a_body_that_does_not_arrive_in_time_is_a_400_naming_the_timeout(daemon: ServedDaemon) -> None:
    raw = b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{"
    status, body = status_and_json(exchange(daemon, raw))
    assert (status, body["code"]) == (400, "INVALID_REQUEST")
    assert "did not arrive within 0.5 s" in body["message"]


def test_a_body_that_does_not_decode_is_one_log_line_not_a_traceback(tmp_path: Path) -> None:
    token, log_path = tmp_path / "token", tmp_path / "daemon.log"
    token.write_text("guard-token")
    raw = (
        b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 15\r\nConnection: close\r\n\r\nnot gzip at all"
    )
    with log_path.open("wb") as log, served("--access-token-file", str(token), output=log) as daemon:
        status, body = status_and_json(exchange(daemon, raw))  # answered before the body is read
    assert (status, body["code"]) == (401, "UNAUTHORIZED")
    text = log_path.read_text()
    assert "Can not decode content-encoding" in text and "Traceback" not in text
