"""Every error is JSON {code, message} with the contract's status: 400, 401, 404, 409, 410, 413, 429."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, DaemonFactory
from tests.helpers_core import expect_error, get_session, open_run

UNKNOWN_ID = "0123456789abcdef01234567"


async def _session_id(daemon: Daemon) -> str:
    return str((await daemon.create())["session_id"])


# ----- 400 INVALID_REQUEST --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/session", {"cwd": "/", "colour": "blue"}, "colour"),
        ("/session", {"labels": {}, "zzz_extra": 1}, "zzz_extra"),
        ("run", {"code": "true", "langauge": "bash"}, "langauge"),
        ("run", {"code": "true", "timeout_s": 5}, "timeout_s"),
    ],
    ids=["session_colour", "session_extra", "run_typo", "run_timeout_s"],
)
async def test_unknown_field_is_a_400_naming_the_field(daemon: Daemon, path: str, body: Any, field: str) -> None:
    if path == "run":
        path = f"/session/{await _session_id(daemon)}/run"
    response = await daemon.client.post(path, json=body)
    error = await expect_error(response, 400, "INVALID_REQUEST")
    assert field in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"code": 42},
        {"code": None},
        {"code": ["echo", "hi"]},
        {"command": 1},
        {"code": "true", "timeout_ms": "100"},
        {"code": "true", "timeout_ms": True},
        {"code": "true", "timeout_ms": 1.5},
        {"code": "true", "timeout": [1]},
        {"code": "true", "env": ["A=1"]},
        {"code": "true", "env": {"A": 1}},
        {"code": "true", "cwd": 5},
        {"code": "true", "stdin": 5},
        {"code": "true", "on_disconnect": "ignore"},
    ],
    ids=lambda body: "-".join(f"{k}={v!r}" for k, v in body.items()),
)
async def test_run_with_wrong_types_is_a_400(daemon: Daemon, body: dict[str, Any]) -> None:
    sid = await _session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json=body)
    await expect_error(response, 400, "INVALID_REQUEST")
    assert (await get_session(daemon, sid))["run_count"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"cwd": 5},
        {"env": "A=1"},
        {"env": {"A": None}},
        {"labels": ["a"]},
        {"labels": {"k": 1}},
        {"idle_timeout_s": "600"},
        {"idle_timeout_s": False},
    ],
    ids=lambda body: "-".join(f"{k}={v!r}" for k, v in body.items()),
)
async def test_session_with_wrong_types_is_a_400(daemon: Daemon, body: dict[str, Any]) -> None:
    response = await daemon.client.post("/session", json=body)
    await expect_error(response, 400, "INVALID_REQUEST")
    assert (await (await daemon.client.get("/session")).json())["sessions"] == []


@pytest.mark.parametrize("field", ["timeout_ms", "timeout"])
async def test_negative_timeout_is_a_400(daemon: Daemon, field: str) -> None:
    sid = await _session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true", field: -1})
    error = await expect_error(response, 400, "INVALID_REQUEST")
    assert "negative" in error["message"]


async def test_negative_idle_timeout_is_a_400(daemon: Daemon) -> None:
    await expect_error(await daemon.client.post("/session", json={"idle_timeout_s": -5}), 400, "INVALID_REQUEST")


async def test_code_and_its_alias_together_is_a_400(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true", "command": "true"})
    await expect_error(response, 400, "INVALID_REQUEST")


async def test_missing_code_is_a_400(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    for body in ({}, {"timeout_ms": 10}):
        error = await expect_error(await daemon.client.post(f"/session/{sid}/run", json=body), 400, "INVALID_REQUEST")
        assert "code" in error["message"]


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"code": "true",}', b"not json", b"\xff\xfe", b'{"code": "true"} trailing'],
    ids=["unclosed", "trailing_comma", "text", "invalid_utf8", "trailing_text"],
)
async def test_malformed_json_is_a_400(daemon: Daemon, raw: bytes) -> None:
    sid = await _session_id(daemon)
    headers = {"Content-Type": "application/json"}
    await expect_error(await daemon.client.post("/session", data=raw, headers=headers), 400, "INVALID_REQUEST")
    response = await daemon.client.post(f"/session/{sid}/run", data=raw, headers=headers)
    await expect_error(response, 400, "INVALID_REQUEST")


@pytest.mark.parametrize("raw", [b"[]", b'"code"', b"42", b"null"])
async def test_body_that_is_not_a_json_object_is_a_400(daemon: Daemon, raw: bytes) -> None:
    sid = await _session_id(daemon)
    await expect_error(await daemon.client.post(f"/session/{sid}/run", data=raw), 400, "INVALID_REQUEST")
    await expect_error(await daemon.client.post("/session", data=raw), 400, "INVALID_REQUEST")


async def test_zero_length_run_body_is_a_400_for_missing_code(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    await expect_error(await daemon.client.post(f"/session/{sid}/run", data=b""), 400, "INVALID_REQUEST")


async def test_stdin_that_is_neither_text_nor_stream_is_a_400(daemon: Daemon) -> None:
    # v1 reserved "stream" (a 400); v2 gives it a meaning (tests/test_runs_v2.py). Other types stay 400.
    sid = await _session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "cat", "stdin": 3})
    error = await expect_error(response, 400, "INVALID_REQUEST")
    assert "stdin" in error["message"]


async def test_bad_cwd_is_a_400(daemon: Daemon, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    sid = await _session_id(daemon)
    for cwd in (str(tmp_path / "missing"), str(a_file), "relative/missing"):
        response = await daemon.client.post(f"/session/{sid}/run", json={"code": "pwd", "cwd": cwd})
        error = await expect_error(response, 400, "INVALID_REQUEST")
        assert "cwd" in error["message"]
        await expect_error(await daemon.client.post("/session", json={"cwd": cwd}), 400, "INVALID_REQUEST")
    got = await get_session(daemon, sid)
    assert got["run_count"] == 0 and got["state"] == "idle"


@pytest.mark.parametrize("key", ["1ABC", "A-B", "A B", "", "A=B", "é", "A\nB"])
async def test_env_key_that_is_not_a_variable_name_is_a_400(daemon: Daemon, key: str) -> None:
    sid = await _session_id(daemon)
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true", "env": {key: "v"}})
    await expect_error(response, 400, "INVALID_REQUEST")
    await expect_error(await daemon.client.post("/session", json={"env": {key: "v"}}), 400, "INVALID_REQUEST")


# ----- 413 PAYLOAD_TOO_LARGE ------------------------------------------------------------------


async def test_body_over_the_limit_is_a_413(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_body_bytes=1000)
    sid = await _session_id(daemon)
    small = await daemon.run(sid, "echo " + "a" * 900)
    assert small.stdout == "a" * 900 + "\n"
    big = {"code": "echo " + "a" * 2000}
    await expect_error(await daemon.client.post(f"/session/{sid}/run", json=big), 413, "PAYLOAD_TOO_LARGE")
    await expect_error(
        await daemon.client.post("/session", json={"labels": {"k": "v" * 2000}}), 413, "PAYLOAD_TOO_LARGE"
    )
    assert (await get_session(daemon, sid))["run_count"] == 1


async def test_chunked_body_over_the_limit_is_a_413(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_body_bytes=1000)
    sid = await _session_id(daemon)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds as the body arrives
        yield b'{"code": "echo '
        for _ in range(20):
            yield b"a" * 100
        yield b'"}'

    response = await daemon.client.post(f"/session/{sid}/run", data=chunks())
    await expect_error(response, 413, "PAYLOAD_TOO_LARGE")


async def test_a_body_that_arrives_in_pieces_after_its_headers_is_read_whole(daemon: Daemon) -> None:
    # Most bodies come with the headers; this one makes the daemon wait for the rest.
    sid = await _session_id(daemon)

    async def slowly() -> AsyncIterator[bytes]:
        yield b'{"code": "echo '
        await asyncio.sleep(0.05)
        yield b'slow-body"}'

    async with daemon.client.post(f"/session/{sid}/run", data=slowly()) as response:
        assert response.status == 200
        assert b'"text":"slow-body\\n"' in await response.read()


# ----- 404 SESSION_NOT_FOUND ------------------------------------------------------------------


async def test_unknown_session_id_is_a_404_on_every_route(daemon: Daemon) -> None:
    client = daemon.client
    await expect_error(await client.get(f"/session/{UNKNOWN_ID}"), 404, "SESSION_NOT_FOUND")
    await expect_error(await client.delete(f"/session/{UNKNOWN_ID}"), 404, "SESSION_NOT_FOUND")
    await expect_error(await client.post(f"/session/{UNKNOWN_ID}/run", json={"code": "true"}), 404, "SESSION_NOT_FOUND")
    await expect_error(await client.post(f"/session/{UNKNOWN_ID}/interrupt", json={}), 404, "SESSION_NOT_FOUND")


async def test_deleted_session_is_a_404_for_get_run_and_delete(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    await daemon.delete(sid)
    client = daemon.client
    await expect_error(await client.get(f"/session/{sid}"), 404, "SESSION_NOT_FOUND")
    await expect_error(await client.post(f"/session/{sid}/run", json={"code": "true"}), 404, "SESSION_NOT_FOUND")
    await expect_error(await client.delete(f"/session/{sid}"), 404, "SESSION_NOT_FOUND")


# ----- 409 SESSION_BUSY -----------------------------------------------------------------------


async def test_run_while_a_run_is_in_progress_is_a_409_with_its_run_id(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    async with open_run(daemon, sid, "sleep 30") as live:
        init = await live.next_event()
        response = await daemon.client.post(f"/session/{sid}/run", json={"code": "echo second"})
        error = await expect_error(response, 409, "SESSION_BUSY")
        assert error["run_id"] == init.data["run_id"]
        await daemon.client.post(f"/session/{sid}/interrupt", json={"run_id": init.data["run_id"]})
        terminal = await live.until_terminal()
    assert terminal.data["interrupted"] is True
    # The refused run never ran, and the session takes the next one.
    assert (await get_session(daemon, sid))["run_count"] == 1
    assert (await daemon.run(sid, "echo after")).stdout == "after\n"


# ----- 410 SESSION_ENDED ----------------------------------------------------------------------


async def test_run_on_an_ended_session_is_a_410_with_state_and_reason(daemon: Daemon) -> None:
    sid = await _session_id(daemon)
    await daemon.run(sid, "exit 9")
    response = await daemon.client.post(f"/session/{sid}/run", json={"code": "true"})
    error = await expect_error(response, 410, "SESSION_ENDED")
    assert error["state"] == "exited"
    assert isinstance(error["reason"], str) and error["reason"]


# ----- 429 TOO_MANY_SESSIONS ------------------------------------------------------------------


async def test_session_limit_is_a_429_and_only_live_sessions_count(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(max_sessions=2)
    first = await _session_id(daemon)
    second = await _session_id(daemon)
    await expect_error(await daemon.client.post("/session", json={}), 429, "TOO_MANY_SESSIONS")
    await daemon.run(first, "exit 0")  # ended: it stays visible but no longer counts
    assert (await get_session(daemon, first))["state"] == "exited"
    third = await _session_id(daemon)
    await expect_error(await daemon.client.post("/session", json={}), 429, "TOO_MANY_SESSIONS")
    await daemon.delete(second)
    await _session_id(daemon)
    assert (await get_session(daemon, third))["state"] == "idle"


# ----- 401 UNAUTHORIZED -----------------------------------------------------------------------


async def test_token_is_required_on_every_route_but_health_and_ping(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="s3cret")
    client = daemon.client
    good = {"X-EXECD-ACCESS-TOKEN": "s3cret"}
    sid = (await (await client.post("/session", json={}, headers=good)).json())["session_id"]
    routes = [
        ("POST", "/session", {}),
        ("GET", "/session", None),
        ("GET", f"/session/{sid}", None),
        ("POST", f"/session/{sid}/run", {"code": "true"}),
        ("POST", f"/session/{sid}/interrupt", {}),
        ("DELETE", f"/session/{sid}", None),
        ("GET", "/no/such/route", None),
    ]
    wrong_headers: list[dict[str, str]] = [
        {},
        {"X-EXECD-ACCESS-TOKEN": "wrong"},
        {"X-EXECD-ACCESS-TOKEN": ""},
        {"X-EXECD-ACCESS-TOKEN": "s3cret-and-more"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "s3cret"},
    ]
    for method, path, body in routes:
        for headers in wrong_headers:
            response = await client.request(method, path, json=body, headers=headers)
            await expect_error(response, 401, "UNAUTHORIZED")
    # Nothing was done by the refused requests.
    listed = await (await client.get("/session", headers=good)).json()
    assert [s["session_id"] for s in listed["sessions"]] == [sid]
    assert listed["sessions"][0]["run_count"] == 0


async def test_both_token_headers_are_accepted(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="s3cret")
    client = daemon.client
    for headers in ({"X-EXECD-ACCESS-TOKEN": "s3cret"}, {"Authorization": "Bearer s3cret"}):
        response = await client.post("/session", json={}, headers=headers)
        assert response.status == 200, await response.text()
        sid = (await response.json())["session_id"]
        async with client.post(f"/session/{sid}/run", json={"code": "echo authed"}, headers=headers) as run:
            assert run.status == 200
            assert '"text":"authed\\n"' in await run.text()
        assert (await client.delete(f"/session/{sid}", headers=headers)).status == 200


async def test_health_and_ping_are_open_with_a_token_configured(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="s3cret")
    health = await daemon.client.get("/healthz")
    assert health.status == 200
    assert (await health.json())["status"] == "ok"
    assert (await daemon.client.get("/ping")).status == 200


# ----- routes and methods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/"), ("GET", "/nope"), ("POST", "/session/x/y/z"), ("GET", "/session/x/run/more")],
)
async def test_unknown_route_is_a_json_404(daemon: Daemon, method: str, path: str) -> None:
    response = await daemon.client.request(method, path)
    text = await response.text()
    assert response.status == 404, text
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) >= {"code", "message"} and body["code"] != "INTERNAL"


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/session"), ("PATCH", "/session/abc"), ("GET", "/session/abc/run"), ("DELETE", "/healthz")],
)
async def test_wrong_method_is_a_json_405(daemon: Daemon, method: str, path: str) -> None:
    response = await daemon.client.request(method, path)
    text = await response.text()
    assert response.status == 405, text
    assert response.content_type == "application/json"
    assert "<html" not in text.lower()
    body = await response.json()
    assert isinstance(body["code"], str) and isinstance(body["message"], str)
    assert response.headers.get("Allow")


@pytest.mark.parametrize(
    "body",
    [{"code": "echo \ud800"}, {"code": "true", "env": {"A": "\udcff"}}, {"code": "true", "stdin": "\udfff"}],
    ids=["code", "env", "stdin"],
)
async def test_lone_surrogate_in_a_string_is_a_400(daemon: Daemon, body: dict[str, Any]) -> None:
    sid = await _session_id(daemon)
    await expect_error(await daemon.client.post(f"/session/{sid}/run", json=body), 400, "INVALID_REQUEST")
    labels = {"labels": {"k": "\ud800"}}
    await expect_error(await daemon.client.post("/session", json=labels), 400, "INVALID_REQUEST")
    assert (await daemon.run(sid, "echo fine")).stdout == "fine\n"


async def test_token_is_never_logged(make_daemon: DaemonFactory, capfd: pytest.CaptureFixture[str]) -> None:
    daemon = await make_daemon(access_token="tok-never-in-logs", log_level="debug")
    client = daemon.client
    await expect_error(await client.get("/session", headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHORIZED")
    good = {"Authorization": "Bearer tok-never-in-logs"}
    sid = (await (await client.post("/session", json={}, headers=good)).json())["session_id"]
    async with client.post(f"/session/{sid}/run", json={"code": "echo hi"}, headers=good) as response:
        assert response.status == 200
        await response.read()
    await client.delete(f"/session/{sid}", headers=good)
    captured = capfd.readouterr()
    assert "session_opened" in captured.out + captured.err  # the daemon did log, to where we look
    assert "tok-never-in-logs" not in captured.out + captured.err


async def test_deeply_nested_json_is_a_400(daemon: Daemon) -> None:
    body = "[" * 100_000 + "]" * 100_000
    response = await daemon.client.post("/session", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert (await response.json())["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize("field", ["idle_timeout_s"])
async def test_number_too_large_for_a_float_is_a_400(daemon: Daemon, field: str) -> None:
    response = await daemon.client.post(
        "/session", data=f'{{"{field}": 1{"0" * 400}}}', headers={"Content-Type": "application/json"}
    )
    body = await response.json()
    assert (response.status, body["code"]) == (400, "INVALID_REQUEST"), body
    assert field in body["message"]


async def test_env_names_of_the_wrapper_are_refused(daemon: Daemon) -> None:
    session = await daemon.create()
    response = await daemon.client.post(
        f"/session/{session['session_id']}/run", json={"code": "true", "env": {"__execd_dir": "/"}}
    )
    body = await response.json()
    assert (response.status, body["code"]) == (400, "INVALID_REQUEST"), body
    assert "__execd_dir" in body["message"]


@pytest.mark.parametrize(
    "key",
    [
        "EXECD_SESSION_ID",
        "EXECD_ANYTHING",
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "POSIXLY_CORRECT",
        "__EXECD_DIR",
    ],
)
async def test_env_names_that_control_the_shell_or_its_tag_are_a_400(daemon: Daemon, key: str) -> None:
    response = await daemon.client.post("/session", json={"env": {key: "x"}})
    body = await expect_error(response, 400, "INVALID_REQUEST")
    assert key in body["message"]
    session = await daemon.create()
    response = await daemon.client.post(
        f"/session/{session['session_id']}/run", json={"code": "true", "env": {key: "x"}}
    )
    assert key in (await expect_error(response, 400, "INVALID_REQUEST"))["message"]


async def test_a_token_header_with_bytes_that_are_not_utf8_is_a_401(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(access_token="s3cret")
    port = daemon.client.server.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /session HTTP/1.1\r\nHost: x\r\nX-EXECD-ACCESS-TOKEN: \xff\xfe\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert b'"code":"UNAUTHORIZED"' in body


async def test_a_body_whose_content_encoding_does_not_decode_is_a_400(daemon: Daemon) -> None:
    response = await daemon.client.post(
        "/session", data=b"not gzip at all", headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    body = await expect_error(response, 400, "INVALID_REQUEST")
    assert "body" in body["message"]


@pytest.mark.parametrize(
    "labels",
    [{f"k{i}": "v" for i in range(65)}, {"k": "v" * 4097}, {"k" * 257: "v"}],
    ids=["65-labels", "long-value", "long-key"],
)
async def test_labels_beyond_their_limits_are_a_400(daemon: Daemon, labels: dict[str, str]) -> None:
    await expect_error(await daemon.client.post("/session", json={"labels": labels}), 400, "INVALID_REQUEST")
    assert (await daemon.create(labels={f"k{i}": "v" * 4096 for i in range(64)}))["labels"]["k63"] == "v" * 4096


async def test_a_session_that_runs_out_of_file_descriptors_is_a_503_resource_exhausted(daemon: Daemon) -> None:
    assert (await daemon.client.get("/healthz")).status == 200  # the connection the POST will reuse
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the daemon's first two files of a session, not for the pipes that come next.
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 2, hard))
    try:
        response = await daemon.client.post("/session")
        body = await expect_error(response, 503, "RESOURCE_EXHAUSTED")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "file descriptors" in body["message"]
    listed = await (await daemon.client.get("/session")).json()
    assert listed["sessions"] == []  # the failed session was not kept
    assert (await daemon.create())["state"] == "idle"
