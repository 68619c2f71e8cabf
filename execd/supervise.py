"""Injection mode: `execd serve [flags] -- COMMAND [ARGS...]` runs the container's own entrypoint
as the daemon's child, so one container holds both. As a container's PID 1 would: the daemon's
stop signals are passed on to it, and its exit ends the daemon, with its exit status."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Mapping, Sequence

from execd import ladder, process
from execd.logging import get_logger

log = get_logger("execd.supervise")
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


class Supervised:
    """The command, in a process group of its own (so its SIGKILL rung takes what it started)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], shown: str | None = None) -> None:
        self.argv, self.env = list(argv), dict(env)
        self.shown = shown or self.argv[0]  # the command's name, not that of what switches its user
        self.pid = 0
        self.returncode: int | None = None  # as Popen reports it: -N for signal N
        self._pidfd: int | None = None
        self._exited: asyncio.Event | None = None

    def start(self, on_exit: Callable[[], None]) -> None:
        """Spawn it (OSError when it cannot start: not found, not executable)."""
        self.pid = os.posix_spawnp(
            self.argv[0], self.argv, self.env, setpgroup=0, setsigdef=_RESET_SIGNALS, setsigmask=()
        )
        process.owned_children.add(self.pid)  # the orphan reaper must leave its status to us
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(self.pid)
        loop = asyncio.get_running_loop()

        def exited() -> None:
            self._reap()
            on_exit()

        loop.add_reader(self._pidfd, exited)
        log.info("command_started", pid=self.pid, command=os.path.basename(self.shown))

    def _reap(self) -> None:
        if self._pidfd is None:
            return
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            self.returncode = 0
        process.owned_children.discard(self.pid)
        assert self._exited is not None
        self._exited.set()
        log.info("command_exited", pid=self.pid, returncode=self.returncode)

    @property
    def running(self) -> bool:
        return self.pid != 0 and self.returncode is None

    def kill_now(self) -> None:
        """A forced exit: its group goes with the daemon."""
        if self.running:
            process.signal_pids([-self.pid, self.pid], signal.SIGKILL)

    def pass_on(self, sig: int) -> None:
        if self.running:
            process.signal_pids([self.pid], sig)

    async def stop(self, grace_s: float, timings: ladder.Timings) -> None:
        """The rest of the ladder, after the polite signal: grace, then SIGKILL of its group; and
        what it left running in its group goes too (outside a container nobody else would end it)."""
        if self._exited is None or self.pid == 0:
            return
        if self.running and not await ladder.climb_for_process(self.pid, self._exited.wait, grace_s, timings):
            log.error("command_survived_kill", pid=self.pid)
        # A group outlives its leader while members remain, and its id is not reused meanwhile.
        process.signal_pids([-self.pid], signal.SIGKILL)

    @property
    def exit_status(self) -> int:
        """What the daemon exits with: the command's status, 128+N for a signal (as a shell says)."""
        code = self.returncode or 0
        return code if code >= 0 else 128 - code
