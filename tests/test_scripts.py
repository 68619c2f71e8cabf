"""The README's command that starts the daemon, run as a user runs it, with flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.helpers_control import free_port, served

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


def test_the_image_healthcheck_asks_the_port_in_execd_port() -> None:
    # The HEALTHCHECK line of the Dockerfile, run as Docker would, against a daemon on another port
    # (a subprocess: an in-process daemon, a subreaper, would reap the check's exit status).
    dockerfile = (REPO / "Dockerfile").read_text()
    command = dockerfile.split("HEALTHCHECK", 1)[1].split('CMD python -c "', 1)[1].split('"\n', 1)[0]

    def healthcheck(env_port: str) -> int:
        env = {**os.environ, "EXECD_PORT": env_port}
        return subprocess.run([sys.executable, "-c", command], env=env, capture_output=True, timeout=20).returncode

    with served("--log-level", "error") as daemon:
        assert healthcheck(str(daemon.port)) == 0
        assert healthcheck(str(free_port())) != 0
