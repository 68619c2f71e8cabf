"""A tiny process that outlives the daemon for one purpose: if the daemon dies, kill its sessions.

The daemon starts it in a session of its own (so a kill of the daemon's process group spares it)
with the daemon's base dir and the ladder's kill wait as arguments, and writes `+ID` / `-ID` lines
on its stdin as sessions open and close. When the pipe reaches EOF, the daemon is gone, cleanly or
not: the last rung of the termination ladder runs for every open session (every process whose
environment carries one of their ids is SIGKILLed, until a sweep finds none and their exits are
seen), and the base dir (the sessions' private files) is removed. It imports only the /proc
toolkit and the standard library, so it starts fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys

from execd import process


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the daemon's terminal is not for us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    base_dir = sys.argv[1] if len(sys.argv) > 1 else ""
    kill_wait_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    session_ids: set[str] = set()
    for raw in sys.stdin.buffer:
        line = raw.strip().decode(errors="replace")
        if line.startswith("+"):
            session_ids.add(line[1:])
        elif line.startswith("-"):
            session_ids.discard(line[1:])
    if session_ids:
        # The shells' pids are not ours to trust any more (the daemon is gone): by tag only.
        process.kill_sessions(dict.fromkeys(session_ids), timeout_s=kill_wait_s)
    if os.path.basename(base_dir).startswith("execd-"):
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
