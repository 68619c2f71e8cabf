"""Starting the daemon with bad flags or a busy port: one line naming the problem, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EXECD_")}
    return subprocess.run(
        [sys.executable, "-m", "execd", "serve", *args],
        cwd=REPO,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "99999"], {}, "--port"),
        (["--log-level", "foo"], {}, "--log-level"),
        (["--max-sessions", "-1"], {}, "--max-sessions"),
        (["--idle-timeout-s", "nan"], {}, "--idle-timeout-s"),
        (["--max-readers", "0"], {}, "--max-readers"),
        ([], {"EXECD_PORT": "-5"}, "EXECD_PORT"),
        ([], {"EXECD_EVENT_LOOP": "trio"}, "EXECD_EVENT_LOOP"),
        ([], {"EXECD_MAX_SESSIONS": "lots"}, "EXECD_MAX_SESSIONS"),
        (["--run-as", "no-such-user-anywhere"], {}, "--run-as"),
        (["--run-as", "root:no-such-group"], {}, "--run-as"),
        (["--max-connections", "0"], {}, "--max-connections"),
        (["--request-timeout-s", "0"], {}, "--request-timeout-s"),
        ([], {"EXECD_MAX_PROCESSES": "-3"}, "EXECD_MAX_PROCESSES"),
    ],
)
def test_a_bad_flag_or_variable_is_one_line_naming_it_and_exit_2(
    args: list[str], env: dict[str, str], named: str
) -> None:
    done = serve(*args, env=env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_busy_port_is_one_line_and_exit_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        done = serve("--host", "127.0.0.1", "--port", str(port))
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0], done.stderr
    assert done.stdout == ""
