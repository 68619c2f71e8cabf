"""A tiny process that outlives the daemon for one purpose: if the daemon dies, kill its sessions.

The daemon starts it in a session of its own (so a kill of the daemon's process group spares it)
with the daemon's base dir, the ladder's kill wait and its cgroup of sessions (or "") as arguments,
and writes `+ID [SHELL_PID]` / `-ID` lines on its stdin as sessions open and close. When the pipe
reaches EOF, the daemon is gone, cleanly or not: the last rung of the termination ladder runs for
every open session (their cgroups are killed; each shell's process group and tree, tagged or not,
and every process whose environment carries one of their ids are SIGKILLed, until a sweep finds
none and their exits are seen), and the base dir (the sessions' private files) is removed. It
imports only the /proc toolkit and the standard library, so it starts fast.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Sequence

from execd import process
from execd.cgroups import SessionCgroups


def main(args: Sequence[str]) -> None:
    """args: the base dir, the kill wait in seconds, the cgroup root ("" for none)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the daemon's terminal is not for us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    base_dir = args[0] if args else ""
    kill_wait_s = float(args[1]) if len(args) > 1 else 1.0
    cgroups = SessionCgroups(args[2]) if len(args) > 2 and args[2] else None
    shells: dict[str, int | None] = {}
    for raw in sys.stdin.buffer:
        session_id, _, pid = raw.strip().decode(errors="replace")[1:].partition(" ")
        if raw.startswith(b"+"):
            shells[session_id] = int(pid) if pid.isdigit() else None
        elif raw.startswith(b"-"):
            shells.pop(session_id, None)
    if shells:
        # A shell's pid is trusted only while that process still carries its session's tag (the
        # daemon that reaped it is gone, so the number may be someone else's by now).
        process.kill_sessions(
            {sid: pid if pid and process.tag_of(pid) == sid else None for sid, pid in shells.items()},
            timeout_s=kill_wait_s,
            cgroups=cgroups,
        )
    if cgroups is not None:
        cgroups.kill_all(kill_wait_s)
        cgroups.remove_all()
    if os.path.basename(base_dir).startswith("execd-"):
        shutil.rmtree(base_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
