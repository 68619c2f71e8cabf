"""A cgroup (v2) per session, where the daemon may make them: closing a session kills its cgroup,
so even a process that left the shell's tree, its process group and its tag (`env -i setsid`)
dies with it (what systemd's `KillMode=control-group` guarantees). Without a delegated cgroup v2
tree, the daemon falls back to the tag sweep alone (see process.kill_sessions).

Only the core files are used (`cgroup.procs`, `cgroup.kill`): no controller is enabled, so the
daemon may stay in the cgroup above its sessions' ones.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time


class SessionCgroups:
    """`<the daemon's cgroup>/execd-<pid>/<session id>`, one directory per session."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._emptied: list[str] = []  # killed and empty: removed later, off the answer's path
        self._lock = threading.Lock()  # kill paths run in threads

    @classmethod
    def create(cls) -> SessionCgroups | None:
        """Make the daemon's cgroup of sessions; None where cgroup v2 with `cgroup.kill` (Linux
        5.14) is not writable here."""
        mount, own = _v2_mount(), _own_cgroup()
        if mount is None or own is None:
            return None
        root = os.path.join(mount + own, f"execd-{os.getpid()}")
        try:
            os.mkdir(root, 0o755)
        except FileExistsError:
            pass
        except OSError:
            return None
        if not os.path.exists(os.path.join(root, "cgroup.kill")):
            with contextlib.suppress(OSError):
                os.rmdir(root)
            return None
        return cls(root)

    def path(self, session_id: str) -> str:
        """The session's cgroup ("" names the daemon's cgroup of sessions itself)."""
        return os.path.join(self.root, session_id) if session_id else self.root

    def add(self, session_id: str, pid: int) -> None:
        """Put a new shell in a cgroup of its own (before it has run any code)."""
        path = self.path(session_id)
        os.mkdir(path, 0o755)
        _write(os.path.join(path, "cgroup.procs"), str(pid))

    def kill(self, session_ids: list[str]) -> list[str]:
        """SIGKILL every process in these sessions' cgroups; the ones that had a cgroup."""
        killed = []
        for session_id in session_ids:
            with contextlib.suppress(FileNotFoundError):
                _write(os.path.join(self.path(session_id), "cgroup.kill"), "1")
                killed.append(session_id)
        return killed

    def wait_empty(self, session_ids: list[str], deadline: float) -> bool:
        """Wait until these cgroups hold no process (a process leaves at its exit, before it is
        reaped), woken by the kernel's notice on `cgroup.events`."""
        watched: list[int] = []
        poller = select.poll()
        pending = 0
        try:
            for session_id in session_ids:
                try:
                    fd = os.open(os.path.join(self.path(session_id), "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                watched.append(fd)
                if _populated(fd):  # a cgroup once emptied is not populated again: counted once
                    poller.register(fd, select.POLLPRI)
                    pending += 1
            while pending:
                left_ms = (deadline - time.monotonic()) * 1000
                if left_ms <= 0:
                    return False
                for fd, _ in poller.poll(left_ms):
                    if not _populated(fd):
                        poller.unregister(fd)
                        pending -= 1
            return True
        finally:
            for fd in watched:
                os.close(fd)

    def retire(self, session_ids: list[str]) -> None:
        """These cgroups are empty and done with: `remove_retired` removes them (an rmdir costs
        more than the rest of a DELETE)."""
        with self._lock:
            self._emptied.extend(session_ids)

    @property
    def has_retired(self) -> bool:
        return bool(self._emptied)

    def remove_retired(self) -> None:
        with self._lock:
            batch, self._emptied = self._emptied, []
        for session_id in batch:
            self.remove(session_id)

    def remove(self, session_id: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.path(session_id))

    def remove_all(self) -> None:
        """The whole tree, once nothing is left in it (at the daemon's or the watchdog's end)."""
        with contextlib.suppress(OSError):
            for entry in os.scandir(self.root):
                if entry.is_dir():
                    self.remove(entry.name)
            os.rmdir(self.root)

    def kill_all(self, timeout_s: float) -> bool:
        """Every session's processes, at once; whether they were gone within `timeout_s`."""
        with contextlib.suppress(OSError):
            _write(os.path.join(self.root, "cgroup.kill"), "1")
        return self.wait_empty([""], time.monotonic() + timeout_s)


def _populated(events_fd: int) -> bool:
    """Whether a process is left in the cgroup or below it (reading also re-arms the poll)."""
    try:
        return b"populated 1" in os.pread(events_fd, 512, 0)
    except OSError:
        return False


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _v2_mount() -> str | None:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or .../unified in hybrid mode."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        pass
    return None


def _own_cgroup() -> str | None:
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip().rstrip("/") or ""
    except OSError:
        pass
    return None
