"""The README's command that starts the daemon, run as a user runs it, with flags."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from tests.helpers_control import free_port

REPO = Path(__file__).resolve().parent.parent


def test_scripts_serve_starts_the_daemon_with_flags() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "serve"), "--host", "127.0.0.1", "--port", str(port), "--max-sessions", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180  # the first call may install the project into .venv
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    health = json.load(response)
                break
            except OSError:
                assert time.monotonic() < deadline, "scripts/serve did not answer /healthz"
                time.sleep(0.2)
        assert health["status"] == "ok"
        request = urllib.request.Request(f"http://127.0.0.1:{port}/session", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            session = json.load(response)
        run = urllib.request.Request(
            f"http://127.0.0.1:{port}/session/{session['session_id']}/run",
            data=json.dumps({"code": "echo from-serve"}).encode(),
            method="POST",
        )
        with urllib.request.urlopen(run, timeout=10) as response:
            assert '"text":"from-serve\\n"' in response.read().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
