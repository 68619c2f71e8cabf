"""A tiny process that outlives the daemon for one purpose: if the daemon dies, kill its sessions.

The daemon starts it in a session of its own (so a kill of the daemon's process group spares it)
with the daemon's base dir as argument, and writes `+ID` / `-ID` lines on its stdin as sessions
open and close. When the pipe reaches EOF, the daemon is gone, cleanly or not: every process whose
environment carries one of the open session ids is killed, escapees included, and the base dir
(the sessions' private files) is removed. Only the standard library, so it starts fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

TAG = b"EXECD_SESSION_ID="


def tagged(session_ids: set[bytes]) -> list[int]:
    found = []
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        for var in environ.split(b"\0"):
            if var.startswith(TAG) and var[len(TAG) :] in session_ids:
                found.append(int(entry))
                break
    return found


def sweep(session_ids: set[bytes]) -> None:
    for _ in range(10):
        victims = tagged(session_ids)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the daemon's terminal is not for us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    session_ids: set[bytes] = set()
    for line in sys.stdin.buffer:
        line = line.strip()
        if line.startswith(b"+"):
            session_ids.add(line[1:])
        elif line.startswith(b"-"):
            session_ids.discard(line[1:])
    sweep(session_ids)
    if len(sys.argv) > 1 and os.path.basename(sys.argv[1]).startswith("execd-"):
        shutil.rmtree(sys.argv[1], ignore_errors=True)


if __name__ == "__main__":
    main()
