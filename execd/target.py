"""Sidecar mode (`--target`): the process of the sandbox's container, whose namespaces, root,
environment and cwd every shell starts in (see execd/enter.py). Found again at every session
create, so a restarted container is followed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from execd import process

KINDS = ("pid", "pidfile", "cmdline")


class TargetNotFound(Exception):
    pass


@dataclass(frozen=True)
class Target:
    pid: int
    start: int  # ticks since boot: with the pid, names this process and no later one

    @property
    def root(self) -> str:
        """The target's root as the daemon reaches it."""
        return f"/proc/{self.pid}/root"

    @property
    def enter_spec(self) -> str:
        return f"{self.pid}:{self.start}"

    def environment(self) -> dict[str, str]:
        try:
            with open(f"/proc/{self.pid}/environ", "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise TargetNotFound(f"cannot read the environment of the target process {self.pid}: {exc}") from None
        env: dict[str, str] = {}
        for item in raw.split(b"\0"):
            name, sep, value = item.partition(b"=")
            if sep and name:
                env[name.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
        return env


@dataclass(frozen=True)
class Selector:
    """`pid:N`, `pidfile:PATH` or `cmdline:REGEX` (searched in the arguments joined by spaces; the
    oldest match wins; the daemon, its helpers and its sessions' processes never match)."""

    kind: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, sep, value = text.partition(":")
        if not sep or kind not in KINDS or not value:
            raise ValueError(f"{text!r}: expected pid:N, pidfile:PATH or cmdline:REGEX")
        if kind == "pid" and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"{text!r}: pid must be a positive number")
        if kind == "cmdline":
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{text!r}: not a regular expression: {exc}") from None
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    def find(self) -> Target:
        """The process now. The daemon's own tree (its helpers, its shells and all they started,
        escapees included: it is their subreaper) is never taken, so session code cannot pose as
        the sandbox."""
        if self.kind == "cmdline":
            return self._by_cmdline()
        pid = int(self.value) if self.kind == "pid" else _pid_in(self.value)
        start = process.start_ticks(pid)
        if start is None:
            raise TargetNotFound(f"no process {pid} (--target {self})")
        if _ours(pid):
            raise TargetNotFound(f"process {pid} is execd's own (--target {self})")
        return Target(pid, start)

    def _by_cmdline(self) -> Target:
        pattern = re.compile(self.value)
        found: list[tuple[int, int]] = []
        for pid in process.all_pids():
            line = process.command_line(pid)  # cheap first; the rest only for a match
            start = process.start_ticks(pid) if line and pattern.search(line) else None
            if start is not None:
                found.append((start, pid))
        for start, pid in sorted(found):  # the oldest that is not ours
            if not _ours(pid):
                return Target(pid, start)
        raise TargetNotFound(f"no process matches --target {self}")


def _ours(pid: int) -> bool:
    return pid == os.getpid() or process.tag_of(pid) is not None or process.descends_from(pid, os.getpid())


class Finder:
    """The selector's process, kept while it lives (the same pid and start time): a younger match
    cannot take its place, and a /healthz probe or a session create costs one stat read, not a
    scan of /proc, until it ends."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self._current: Target | None = None

    def current(self) -> Target:
        known = self._current
        if known is not None and process.start_ticks(known.pid) == known.start:
            return known
        self._current = None
        self._current = self.selector.find()
        return self._current


def _pid_in(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError) as exc:
        raise TargetNotFound(f"no pid in {path!r}: {exc}") from None
