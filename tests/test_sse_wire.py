"""The run stream on the wire: SSE framing byte for byte, headers, event order and fields, pings."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from tests.conftest import Daemon, DaemonFactory, RunResult, read_run
from tests.helpers_control import open_run

FRAME = re.compile(rb"id: (\d+)\nevent: ([a-z_]+)\ndata: ([^\n]*)\n\n")
PING = b": ping\n\n"
COMMON_FIELDS = {"type", "seq", "run_id", "timestamp"}


def frames(raw: bytes) -> list[tuple[int, str, dict[str, object]]]:
    """Split the whole body into frames and pings; anything else on the wire fails the test."""
    found = []
    position = 0
    while position < len(raw):
        if raw.startswith(PING, position):
            position += len(PING)
            continue
        match = FRAME.match(raw, position)
        assert match, raw[position : position + 200]
        found.append((int(match[1]), match[2].decode(), json.loads(match[3])))
        position = match.end()
    return found


async def run_raw(daemon: Daemon, session_id: str, code: str) -> tuple[RunResult, dict[str, str]]:
    async with daemon.client.post(f"/session/{session_id}/run", json={"code": code}) as response:
        headers = dict(response.headers)
        return await read_run(response), headers


async def test_every_event_is_framed_as_id_event_and_one_data_line(daemon: Daemon) -> None:
    session = await daemon.create()
    before = int(time.time() * 1000)
    result, _ = await run_raw(daemon, session["session_id"], "echo hello; echo 'multi\nline' >&2; printf '\\0\\x01'")
    after = int(time.time() * 1000)
    parsed = frames(result.raw)
    assert [seq for seq, _, _ in parsed] == list(range(len(parsed)))
    run_id = parsed[0][2]["run_id"]
    for seq, event, data in parsed:
        assert set(data) >= COMMON_FIELDS
        assert data["type"] == event
        assert data["seq"] == seq
        assert data["run_id"] == run_id
        assert type(data["timestamp"]) is int
        assert before <= data["timestamp"] <= after
    assert result.stderr == "multi\nline\n"
    assert result.stdout == "hello\n\x00\x01"


async def test_output_event_bytes_match_the_contract_example(daemon: Daemon) -> None:
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "echo hello")
    init, stdout, complete = result.events
    run_id, ts = init.data["run_id"], stdout.data["timestamp"]
    exact = (
        f'id: 1\nevent: stdout\ndata: {{"type":"stdout","seq":1,"run_id":"{run_id}","timestamp":{ts},'
        f'"text":"hello\\n"}}\n\n'
    ).encode()
    assert result.raw.startswith(b"id: 0\nevent: init\ndata: {")
    assert exact in result.raw
    assert result.raw.endswith(b"}\n\n")
    assert complete.type == "execution_complete"


async def test_run_answer_headers_are_those_of_an_event_stream(daemon: Daemon) -> None:
    session = await daemon.create()
    _, headers = await run_raw(daemon, session["session_id"], "true")
    assert headers["Content-Type"].split(";")[0] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"


async def test_init_comes_first_with_session_id_and_run_id(daemon: Daemon) -> None:
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "echo x")
    init = result.events[0]
    assert (init.type, init.id) == ("init", 0)
    assert init.data["session_id"] == session["session_id"]
    assert init.data["text"] == init.data["run_id"]
    assert isinstance(init.data["run_id"], str) and init.data["run_id"]
    assert [e.type for e in result.events].count("init") == 1
    # A new run has a new id, and seq starts again at 0.
    again, _ = await run_raw(daemon, session["session_id"], "echo y")
    assert again.events[0].data["run_id"] != init.data["run_id"]
    assert again.events[0].id == 0


async def test_exactly_one_terminal_event_ends_every_stream(daemon: Daemon) -> None:
    session = await daemon.create()
    sid = session["session_id"]
    for code in ("echo ok", "return 3", "if then", "exit 2"):
        result, _ = await run_raw(daemon, sid, code)
        types = [e.type for e in result.events]
        terminals = [t for t in types if t in ("execution_complete", "error")]
        assert terminals == [types[-1]], (code, types)
        assert result.raw.endswith(b"\n\n")
    died = await daemon.create()
    result, _ = await run_raw(daemon, died["session_id"], "kill -9 $$")
    assert [e.type for e in result.events if e.type in ("execution_complete", "error")] == ["error"]
    assert result.events[-1].type == "error"


async def test_execution_complete_carries_every_contract_field(daemon: Daemon) -> None:
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "cd /usr; (exit 6)")
    complete = result.complete
    assert set(complete) == COMMON_FIELDS | {
        "exit_code",
        "execution_time",
        "interrupted",
        "timed_out",
        "output_truncated",
        "cwd",
        "shell_exited",
    }
    assert complete["exit_code"] == 6
    assert type(complete["execution_time"]) is int and complete["execution_time"] >= 0
    assert complete["interrupted"] is False
    assert complete["timed_out"] is False
    assert complete["output_truncated"] is False
    assert complete["cwd"] == "/usr"
    assert complete["shell_exited"] is False


async def test_output_events_carry_only_text_besides_the_common_fields(daemon: Daemon) -> None:
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "echo out; echo err >&2")
    for event in result.of("stdout") + result.of("stderr"):
        assert set(event.data) == COMMON_FIELDS | {"text"}
    for event in result.events:
        assert "results" not in event.data and "execution_count" not in event.data


async def test_error_event_carries_code_message_and_error_object(daemon: Daemon) -> None:
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "kill -9 $$")
    error = result.terminal
    assert set(error.data) == COMMON_FIELDS | {"code", "message", "error"}
    assert error.data["error"] == {"ename": error.data["code"], "evalue": error.data["message"], "traceback": []}


async def test_quiet_run_sends_ping_comments(make_daemon: DaemonFactory) -> None:
    daemon = await make_daemon(sse_ping_s=0.2)
    session = await daemon.create()
    result, _ = await run_raw(daemon, session["session_id"], "echo start; sleep 1; echo end")
    raw = result.raw
    assert PING in raw
    start = raw.index(b'"text":"start\\n"')
    end = raw.index(b'"text":"end\\n"')
    assert PING in raw[start:end]  # pings fall in the quiet stretch, each one a whole block
    assert raw.startswith(b"id: 0\nevent: init\n")
    frames(raw)  # pings never break a frame
    assert result.stdout == "start\nend\n"


async def test_event_json_is_compact(daemon: Daemon) -> None:
    session = await daemon.create()
    result = await daemon.run(session["session_id"], "echo out; echo err >&2")
    for line in result.raw.decode().splitlines():
        if line.startswith("data: "):
            body = line[len("data: ") :]
            assert body == json.dumps(json.loads(body), ensure_ascii=False, separators=(",", ":"))


async def test_output_that_never_pauses_reaches_the_client_while_it_flows(daemon: Daemon, tmp_path: Path) -> None:
    # A line every 1.5 ms (busy-waiting: no pause of 2 ms that would count as quiet) for 0.6 s is
    # under one 64 KiB batch of events: it reaches the client while it flows only because a batch
    # goes out once its oldest event has waited a few ms. The program stops once the client has
    # seen a line.
    seen = tmp_path / "seen"
    program = tmp_path / "trickle.py"
    program.write_text(
        "import os, sys, time\n"
        "for _ in range(400):\n"
        f"    if os.path.exists({str(seen)!r}):\n"
        "        print('client-saw-output-live'); break\n"
        "    sys.stdout.write('tick\\n'); sys.stdout.flush()\n"
        "    until = time.perf_counter() + 0.0015\n"
        "    while time.perf_counter() < until: pass\n"
        "else:\n"
        "    print('client-saw-nothing')\n"
    )
    session = await daemon.create()
    stream = await open_run(daemon.client, session["session_id"], f"{sys.executable} {program}")
    await stream.until_stdout("tick", timeout=60)
    seen.touch()
    await stream.until_terminal(timeout=60)
    assert stream.stdout.endswith("client-saw-output-live\n"), stream.stdout[-200:]


async def test_output_text_survives_every_kind_of_escape(daemon: Daemon) -> None:
    # Plain text goes out as it is, lines and tabs by replace, the rest through json.dumps: one
    # chunk of each kind, and a mix, all come back exactly.
    session = await daemon.create()
    sid = session["session_id"]
    plain = "x" * 5000
    lines = ("w" * 80 + "\tz\n") * 100  # few enough escapes for bytes.replace
    mixed = 'q"b\\s\x01\x1f é ✓\n' * 50
    code = f"printf '%s' '{plain}'; sleep 0.05; printf '{lines}'; sleep 0.05; cat <<'EOF'\n{mixed}EOF"
    result = await daemon.run(sid, code.replace("\t", "\\t"))
    assert result.stdout == plain + lines + mixed
    for line in result.raw.decode().splitlines():
        if line.startswith("data: "):
            json.loads(line[len("data: ") :])
