"""One persistent bash process over pipes: spawn, run, interrupt, kill. No HTTP here.

Protocol (see bootstrap.sh and ../shared/notes/bash-over-pipes.md):
- the shell reads one wrapper line per run on its stdin, the daemon's private command channel;
- the user's code is written to a private file and `source`d with its own stdin, so it can neither
  read the command channel nor desynchronise it, and a syntax error is only a failed run;
- completion, `$?`, `$-` and `$PWD` come back on a FIFO in a 0700 directory, never in the output;
- stdout and stderr are separate pipes, drained at all times: by the run that reads them (as fast as
  its consumer takes them: backpressure), or into a bounded between-runs buffer when no run is on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import shlex
import shutil
import signal
import tempfile
import termios
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from execd import process
from execd.logging import get_logger

log = get_logger("execd.shell")
Stream = Literal["stdout", "stderr"]
READ_SIZE = 64 * 1024
MAX_SENDS = 3  # a run's line is sent again when the user's code broke the wrapper's alias
QUIET_S = 0.002  # how long a run may be quiet before a batching caller is told to send
PIPE_SIZE = 1024 * 1024
INTERRUPT_SIGNAL = signal.SIGUSR2  # the shell's own handler for the daemon's interrupts
_F_SETPIPE_SZ = 1031
_BOOTSTRAP = str(resources.files("execd") / "bootstrap.sh")
_BASH = shutil.which("bash") or "/bin/bash"
_NON_INTERACTIVE_DEFAULTS = {"PAGER": "cat", "GIT_PAGER": "cat", "TERM": "dumb"}
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)


class ShellError(Exception):
    """Base of the engine's failures; each maps to one contract code in the API layer."""


class ShellBusy(ShellError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"a run is already in progress ({run_id})")
        self.run_id = run_id


class NoActiveRun(ShellError):
    pass


class ShellGone(ShellError):
    """The shell has exited or was killed; nothing more can run in it."""


class ShellStartFailed(ShellError):
    pass


@dataclass(frozen=True)
class Output:
    stream: Stream
    data: bytes
    between_runs: bool = False
    dropped_bytes: int = 0


@dataclass(frozen=True)
class Completed:
    exit_code: int
    interrupted: bool
    timed_out: bool
    cwd: str
    shell_exited: bool


@dataclass(frozen=True)
class Aborted:
    """The run could not finish in a live shell. `code` is a contract error code."""

    code: str
    message: str


RunEvent = Output | Completed | Aborted


@dataclass
class RunRequest:
    code: str
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: str | None = None


@dataclass
class ShellConfig:
    session_id: str
    cwd: str
    env: Mapping[str, str]
    interrupt_grace_s: float = 2.0
    between_runs_bytes: int = 1024 * 1024
    start_timeout_s: float = 10.0
    fd_limit: int | None = None  # the soft RLIMIT_NOFILE the shell gets (the daemon's may be higher)
    base_dir: str | None = None  # where the private dir goes (one per daemon, so it is easy to sweep)


@dataclass
class _Status:
    seq: str
    exit_code: int
    flags: str
    cwd: str
    err_trap: bool

    FIELDS = 5  # as bootstrap.sh writes them, each NUL-terminated

    @classmethod
    def parse(cls, fields: list[bytes]) -> _Status:
        """`trap -p ERR` output (under `set -x`, the trace of the wrapper's first lines comes
        before it), then SEQ, STATUS, FLAGS, PWD: one write when there is no ERR trap."""
        lead, seq, code, flags, cwd = fields
        # In POSIX mode a shell with no ERR trap prints `trap -- - ERR`.
        err_trap = any(line.startswith(b"trap -- ") and line != b"trap -- - ERR" for line in lead.splitlines())
        return cls(seq.decode(), int(code), flags.decode(), cwd.decode(errors="surrogateescape"), err_trap)


def shell_environment(base: Mapping[str, str], session_id: str) -> dict[str, str]:
    """The daemon's environment minus every EXECD_* setting or secret, plus defaults and the tag."""
    env = {k: v for k, v in base.items() if not k.startswith("EXECD_") and k != "BASH_ENV"}
    for key, value in _NON_INTERACTIVE_DEFAULTS.items():
        env.setdefault(key, value)
    env[process.SESSION_TAG] = session_id
    return env


class _Run:
    """Book-keeping of the run in progress."""

    def __init__(self, run_id: str, seq: int) -> None:
        self.run_id = run_id
        self.seq = str(seq)
        self.started = process.now()
        self.ended: process.Moment | None = None
        self.interrupt_signal: signal.Signals | None = None
        self.reported = False  # the shell has said the code finished (the reader may lag behind)
        self.line = b""  # what was written to the shell's command pipe to start the run
        self.sent = 1
        self.timed_out = False
        self.escalations: list[asyncio.TimerHandle] = []


class Shell:
    """A live `bash --noprofile --norc` in its own session and process group."""

    def __init__(self, config: ShellConfig) -> None:
        self.config = config
        self.pid = 0
        self.cwd = config.cwd
        self.returncode: int | None = None  # waitpid status as Popen reports it: -N for signal N
        self.on_exit: Callable[[Shell], None] | None = None
        self.abort: Aborted | None = None  # why the daemon killed the shell, if it did
        self._loop = asyncio.get_running_loop()
        self._dir = ""
        self._fds: dict[str, int] = {}
        self._statuses: collections.deque[_Status] = collections.deque()
        self._status_buffer = b""
        self._waiters: set[asyncio.Future[None]] = set()
        self._run: _Run | None = None
        self._seq = 0
        self._last_exit_code = 0
        self._flags = ""
        self._err_trap = False
        self._between: collections.deque[tuple[Stream, bytes]] = collections.deque()
        self._between_size = 0
        self._between_dropped = 0
        self._streams: dict[int, Stream] = {}
        self._paused: set[int] = set()  # output fds whose reader is off until someone waits for them
        self._streams_at_eof: set[int] = set()
        self._closing: asyncio.Task[None] | None = None

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn bash and wait until it has run the bootstrap."""
        try:
            self._spawn()
            await asyncio.wait_for(self._next_status(), self.config.start_timeout_s)
        except (TimeoutError, OSError, ShellGone) as exc:
            await self.close(Aborted("SESSION_DIED", "the shell could not start"))
            raise ShellStartFailed(f"the shell could not start: {exc}") from exc
        status = self._statuses.popleft()
        self.cwd, self._flags, self._err_trap = status.cwd, status.flags, status.err_trap

    def _spawn(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="session-", dir=self.config.base_dir)
        fifo = os.path.join(self._dir, "status")
        os.mkfifo(fifo, 0o600)
        os.mkfifo(os.path.join(self._dir, "scratch"), 0o600)  # the wrapper's, to read trap texts
        # O_RDWR: opening never blocks and the FIFO never reads EOF while the shell reopens it.
        self._fds["status"] = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds["code"] = os.open(os.path.join(self._dir, "code"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        stdin_r, self._fds["stdin"] = os.pipe2(os.O_CLOEXEC)
        self._fds["stdout"], stdout_w = os.pipe2(os.O_CLOEXEC)
        self._fds["stderr"], stderr_w = os.pipe2(os.O_CLOEXEC)
        for name in ("stdout", "stderr"):
            # Only our end is non-blocking: the shell's programs must block on a full pipe.
            os.set_blocking(self._fds[name], False)
            self._streams[self._fds[name]] = "stdout" if name == "stdout" else "stderr"
            try:
                fcntl.fcntl(self._fds[name], _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe is slower, not wrong
        env = shell_environment(self.config.env, self.config.session_id)
        env.update(BASH_ENV=_BOOTSTRAP, __EXECD_DIR=self._dir, __EXECD_CWD=self.config.cwd)
        if self.config.fd_limit:
            env["__EXECD_NOFILE"] = str(self.config.fd_limit)
        try:
            self.pid = os.posix_spawn(
                _BASH,
                ["bash", "--noprofile", "--norc"],
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                    (os.POSIX_SPAWN_DUP2, stderr_w, 2),
                ],
                setsid=True,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        process.owned_children.add(self.pid)
        self._fds["pidfd"] = os.pidfd_open(self.pid)
        self._loop.add_reader(self._fds["pidfd"], self._on_pidfd)
        self._loop.add_reader(self._fds["status"], self._on_status)
        for fd in self._streams:
            self._loop.add_reader(fd, self._on_output, fd)

    @property
    def alive(self) -> bool:
        return self.returncode is None and self.pid != 0

    @property
    def live_pid(self) -> int | None:
        """The shell's pid while it is ours (not yet reaped); after that the number may be reused."""
        return self.pid if self.pid and self.returncode is None else None

    def set_abort(self, reason: Aborted | None) -> None:
        """Say why the daemon is about to kill the shell: the run in progress ends with it."""
        if reason is not None and self.abort is None and self.alive:
            self.abort = reason

    async def close(self, reason: Aborted | None, *, killed: bool = False) -> None:
        """Kill the shell and every process the session started (unless the caller already has,
        for many sessions at once), reap the shell, release every fd."""
        self.set_abort(reason)
        if self.pid:
            if not killed:
                # The sweep reads /proc: off the event loop, so other sessions keep streaming.
                sessions = {self.config.session_id: self.live_pid}
                if not await asyncio.to_thread(process.kill_sessions, sessions):
                    log.warning("session_processes_survived_kill", session_id=self.config.session_id)
            if self.returncode is None:
                try:
                    await asyncio.wait_for(self._exited(), 2.0)
                except TimeoutError:
                    self._reap(block=True)
        self._release()

    def release_killed(self, reason: Aborted | None) -> None:
        """Like close, without waiting for anything, once the caller has killed the session's
        processes (a forced exit): reap the shell and release every fd."""
        self.set_abort(reason)
        if self.returncode is None and self.pid:
            self._reap(block=True)
        self._release()

    async def _exited(self) -> None:
        while self.returncode is None:
            await self._wait(())

    def _release(self) -> None:
        for name, fd in list(self._fds.items()):
            if name in ("pidfd", "status", "stdout", "stderr") and fd not in self._paused:
                self._loop.remove_reader(fd)
            os.close(fd)
        self._paused.clear()
        self._fds.clear()
        self._streams.clear()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
        if self._run:
            for handle in self._run.escalations:
                handle.cancel()
        self._wake()

    def wait_exit(self) -> None:
        """Reap a shell known to be exiting (its command channel is closed), blocking briefly."""
        if self.returncode is None and self.pid:
            self._reap(block=True)

    def _on_pidfd(self) -> None:
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 0  # someone else reaped it; it is gone all the same
        if pid == 0:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        process.owned_children.discard(self.pid)
        if "pidfd" in self._fds:
            self._loop.remove_reader(self._fds["pidfd"])
        self._wake()
        if self.on_exit:
            self._loop.call_soon(self.on_exit, self)

    # ----- status channel --------------------------------------------------------------------

    def _on_status(self) -> None:
        try:
            data = os.read(self._fds["status"], 65536)
        except BlockingIOError:
            return
        self._status_buffer += data
        fields = self._status_buffer.split(b"\0")
        complete = (len(fields) - 1) // _Status.FIELDS * _Status.FIELDS
        self._status_buffer = b"\0".join(fields[complete:])
        for i in range(0, complete, _Status.FIELDS):
            if fields[i + 2] == b"again":
                self._send_again(fields[i + 1].decode(errors="replace"))
                continue
            try:
                status = _Status.parse(fields[i : i + _Status.FIELDS])
                self._statuses.append(status)
                if self._run is not None and status.seq == self._run.seq:
                    self._run.reported = True
            except ValueError:
                # Only the wrapper writes here; a garbled record must not stop the event loop.
                log.error(
                    "status_record_invalid", session_id=self.config.session_id, record=fields[i : i + _Status.FIELDS]
                )
        self._wake()

    def _send_again(self, seq: str) -> None:
        """The user's code removed the wrapper's aliases or switched alias expansion off; the shell
        has put both back and asks for the run's line again."""
        run = self._run
        if run is None or run.seq != seq or run.reported or "stdin" not in self._fds:
            return
        run.sent += 1
        if run.sent > MAX_SENDS:
            # The aliases do not come back (say, `enable -n alias`): the shell can run nothing more.
            log.error("run_line_refused", session_id=self.config.session_id, run_id=run.run_id, sends=run.sent)
            self._give_up("the shell no longer runs the daemon's wrapper (its aliases are gone)")
            return
        try:
            _write_all(self._fds["stdin"], run.line)
        except BrokenPipeError:
            pass  # the shell has ended: its exit ends the run

    async def _next_status(self) -> None:
        while not self._statuses:
            if not self.alive:
                raise ShellGone("the shell exited")
            await self._wait(())

    # ----- waking ----------------------------------------------------------------------------

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self, fds: tuple[int, ...], timeout: float | None = None) -> bool:
        """Sleep until one of `fds` is readable, a status arrives, or the shell exits (True),
        or `timeout` passes (False)."""
        waiter = self._loop.create_future()
        self._waiters.add(waiter)
        for fd in fds:
            self._resume(fd)
        timer = self._loop.call_later(timeout, _resolve, waiter, False) if timeout is not None else None
        try:
            return await waiter is not False
        finally:
            if timer:
                timer.cancel()
            self._waiters.discard(waiter)

    # ----- output ----------------------------------------------------------------------------
    # The output fds keep their reader registered (no epoll changes for a run that prints little).
    # While a run is on, data is read by the run when its consumer asks: a reader that fires while
    # nobody waits is paused, or the loop would spin on a pipe it must not drain (backpressure).

    def _on_output(self, fd: int) -> None:
        if self._run is None:
            self._drain_idle(fd)
        elif any(not waiter.done() for waiter in self._waiters):
            self._wake()
        else:
            self._pause(fd)

    def _pause(self, fd: int) -> None:
        if fd not in self._paused and fd in self._streams:
            self._loop.remove_reader(fd)
            self._paused.add(fd)

    def _resume(self, fd: int) -> None:
        if fd in self._paused:
            self._paused.discard(fd)
            self._loop.add_reader(fd, self._on_output, fd)

    def _stop_watching(self, fd: int) -> None:
        """EOF on an output pipe: every writer is gone, and an EOF is always 'readable'."""
        self._pause(fd)
        self._paused.discard(fd)
        self._streams_at_eof.add(fd)

    def _drain_idle(self, fd: int) -> None:
        data = _read(fd, READ_SIZE)
        if not data:
            if data is not None:
                self._stop_watching(fd)
            return
        self._between.append((self._streams[fd], data))
        self._between_size += len(data)
        limit = self.config.between_runs_bytes
        while self._between_size > limit:
            stream, oldest = self._between.popleft()
            excess = self._between_size - limit
            if len(oldest) > excess:
                self._between.appendleft((stream, oldest[excess:]))
                self._between_size -= excess
                self._between_dropped += excess
            else:
                self._between_size -= len(oldest)
                self._between_dropped += len(oldest)

    def _take_between_runs(self) -> list[Output]:
        outputs = []
        for stream, data in self._between:
            outputs.append(Output(stream, data, between_runs=True, dropped_bytes=self._between_dropped))
            self._between_dropped = 0
        self._between.clear()
        self._between_size = 0
        return outputs

    # ----- runs ------------------------------------------------------------------------------

    def run(self, request: RunRequest, run_id: str) -> ShellRun:
        """Start a run now and return its events; the last one is Completed or Aborted.

        The caller iterates to the end (after an interrupt, if it no longer wants the output), so
        the shell is idle again when it stops. Cancelling one wait loses nothing: iterate on.
        """
        self._start_run(request, run_id)
        assert self._run is not None
        return ShellRun(self, self._run)

    def _start_run(self, request: RunRequest, run_id: str) -> None:
        if self._run is not None:
            raise ShellBusy(self._run.run_id)
        if not self.alive or not self._fds:
            raise ShellGone("the shell has ended")
        self._seq += 1
        run = _Run(run_id, self._seq)
        self._write_code(request.code)
        run.line = self._command_line(run, request).encode()
        try:
            _write_all(self._fds["stdin"], run.line)
        except BrokenPipeError as exc:
            raise ShellGone("the shell has ended") from exc
        self._run = run

    def _write_code(self, code: str) -> None:
        # `set -x`/`-v` are off in the wrapper and back on as the code's first words (so `source`
        # itself is not traced; the price: under `set -x` a run starts with $? = 0).
        traced = "".join(f for f in "xv" if f in self._flags)
        prefix = f"set -{traced};" if traced else ""
        # With an ERR trap, `source` must not return the code's failing status (the trap would fire
        # twice), nor under `set -e` (code ending in a failing `a && b` would end the shell, as it
        # does not at a prompt); the status travels in __execd_last instead.
        suffix = "\n{ __execd_last=$?; } 2>/dev/null\n" if self._err_trap or "e" in self._flags else ""
        data = (prefix + code + suffix).encode(errors="surrogateescape")
        fd = self._fds["code"]
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))

    def _command_line(self, run: _Run, request: RunRequest) -> str:
        prelude = "".join(f"\\__execd_setenv {k} {shlex.quote(v)}\n" for k, v in request.env.items())
        if prelude:
            _write_file(os.path.join(self._dir, "prelude"), prelude.encode())
        if request.stdin is not None:
            _write_file(os.path.join(self._dir, "stdin"), request.stdin.encode(errors="surrogateescape"))
        # Bash reads its commands from a pipe one byte at a time (~0.6 us a byte here), so the line
        # is a few assignments and an alias that bootstrap.sh defines (see there).
        line = [f"__execd_s={run.seq}"]
        if prelude:
            line.append("__execd_e=1")
        if request.stdin is not None:
            line.append("__execd_in=$__execd_dir/stdin")
        if request.cwd is not None:
            line.append(f"__execd_cd={shlex.quote(request.cwd)}")
        if self._last_exit_code:
            line.append(f"__execd_p={self._last_exit_code}")
        line.append("__execd_go1" if self._last_exit_code else "__execd_go0")
        return ";".join(line) + "\n"

    def _status_for(self, run: _Run) -> _Status | None:
        while self._statuses:
            status = self._statuses.popleft()
            if status.seq == run.seq:
                return status
        return None

    def _final_drain(self) -> list[Output]:
        """What the pipes hold now: no more, since a background job may write forever."""
        outputs = []
        for fd, stream in list(self._streams.items()):
            pending = _pending_bytes(fd)
            while pending > 0:
                data = _read(fd, min(pending, READ_SIZE))
                if not data:
                    break
                pending -= len(data)
                outputs.append(Output(stream, data))
        return outputs

    def _finish(self, run: _Run, status: _Status | None) -> Completed | Aborted:
        interrupted = run.interrupt_signal is not None
        if status is not None:
            self.cwd, self._flags, self._err_trap = status.cwd, status.flags, status.err_trap
            code = 128 + run.interrupt_signal if run.interrupt_signal else status.exit_code
            self._last_exit_code = code
            return Completed(code, interrupted, run.timed_out, self.cwd, shell_exited=False)
        if self.abort is not None:
            return self.abort
        if self.returncode is not None and self.returncode >= 0:
            return Completed(self.returncode, interrupted, run.timed_out, self.cwd, shell_exited=True)
        sig = -(self.returncode or 0)
        name = signal.Signals(sig).name if sig else "an unknown cause"
        return Aborted("SESSION_DIED", f"the shell was killed by {name}")

    def _end_run(self, run: _Run) -> None:
        self._run = None
        if run.interrupt_signal is not None:
            run.ended = process.now()  # bounds the escalation that may still be pending
            if self._dir:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self._dir, "interrupt"))
        for fd in list(self._paused):
            self._resume(fd)  # between runs, output is drained as it comes

    # ----- interrupts ------------------------------------------------------------------------

    def interrupt(
        self, sig: signal.Signals = signal.SIGINT, run_id: str | None = None, *, timed_out: bool = False
    ) -> str:
        """Ctrl-C for the run in progress: the rest of its code is skipped, the shell survives."""
        run = self._run
        if run is None or (run_id is not None and run_id != run.run_id):
            raise NoActiveRun("no run in progress" if run is None else f"run {run_id} is not in progress")
        if not self.alive or not self._fds:
            # The shell is gone (its pid may already belong to another process): the run is ending.
            raise NoActiveRun("the run is ending: its shell is gone")
        if run.reported:
            raise NoActiveRun(f"run {run.run_id} has already finished")
        if run.interrupt_signal is None:
            run.interrupt_signal = sig
            run.timed_out = timed_out
            # The file says which run the signal is for; the shell ignores it for any other run.
            _write_file(os.path.join(self._dir, "interrupt"), f"{run.seq} {sig.name[3:]}\n".encode())
            grace = self.config.interrupt_grace_s
            run.escalations.append(self._loop.call_later(grace, self._kill_run_processes, run))
            run.escalations.append(self._loop.call_later(grace * 1.5 + 0.5, self._kill_if_stuck, run))
        os.kill(self.pid, INTERRUPT_SIGNAL)
        victims = self._run_processes(run, same_group_only=sig == signal.SIGINT)
        process.signal_pids(victims, sig)
        return run.run_id

    def _run_processes(self, run: _Run, same_group_only: bool = False) -> list[int]:
        """The processes `run` started, escapees included. Older background jobs are left alone,
        and so is everything they start: a process belongs to the run when the shell's child (or the
        adopted escapee) at the top of its branch was started during the run."""
        tree = process.Tree()
        tops = [pid for pid in tree.children(self.pid) if process.started_between(pid, run.started, run.ended)]
        tops += [
            pid
            for pid in process.escapees({self.config.session_id}, {self.pid}, tree)
            if process.started_between(pid, run.started, run.ended)
        ]
        pids = []
        for pid in {member for top in tops for member in (top, *tree.subtree(top))}:
            if same_group_only:
                try:
                    if os.getpgid(pid) != self.pid:
                        continue
                except ProcessLookupError:
                    continue
            pids.append(pid)
        return pids

    def _kill_run_processes(self, run: _Run) -> None:
        if self.alive:
            process.signal_pids(self._run_processes(run), signal.SIGKILL)

    def _kill_if_stuck(self, run: _Run) -> None:
        # A run whose status has arrived is not stuck, even if a slow client has not read it yet.
        if self._run is run and not run.reported and self.alive:
            self._give_up("the shell did not come back after an interrupt")

    def _give_up(self, why: str) -> None:
        """Close a shell that can run nothing more: the run in progress ends with SESSION_DIED."""
        self._closing = self._loop.create_task(self.close(Aborted("SESSION_DIED", why)))


class ShellRun:
    """The events of one run, pulled one at a time: the pipes are read only as fast as the caller
    asks (backpressure). An async iterator object, not a generator, so that a cancelled wait
    (a client gone) leaves the run intact for whoever finishes it."""

    def __init__(self, shell: Shell, run: _Run) -> None:
        self._shell = shell
        self._run = run
        self._queue: collections.deque[RunEvent] = collections.deque(shell._take_between_runs())
        self._fds = [fd for fd in shell._streams if fd not in shell._streams_at_eof]
        self._turn = 0
        self._quiet_told = False
        self.finished = False

    @property
    def run_id(self) -> str:
        return self._run.run_id

    def __aiter__(self) -> ShellRun:
        return self

    async def __anext__(self) -> RunEvent:
        if self.finished:
            raise StopAsyncIteration
        event = await self.next_event()
        self.finished = isinstance(event, (Completed, Aborted))
        return event

    async def next_event(self, on_quiet: Callable[[], Awaitable[None]] | None = None) -> RunEvent:
        """The next event. `on_quiet` is awaited once the run has been quiet for QUIET_S since the
        last event: the moment for a caller that batches writes to send what it holds."""
        shell, run = self._shell, self._run
        while True:
            if self._queue:
                self._quiet_told = False
                return self._queue.popleft()
            status = shell._status_for(run)
            if status is None and not shell.alive and shell._fds:
                shell._on_status()  # the shell may have reported just before it died
                status = shell._status_for(run)
            if status is not None or not shell.alive or not shell._fds:
                self._queue.extend(shell._final_drain())
                self._queue.append(shell._finish(run, status))
                shell._end_run(run)
                continue
            output = self._read_some()
            if output is not None:
                self._quiet_told = False
                return output
            if on_quiet is None or self._quiet_told:
                await shell._wait(tuple(self._fds))
            elif not await shell._wait(tuple(self._fds), QUIET_S):
                self._quiet_told = True
                await on_quiet()

    def _read_some(self) -> Output | None:
        """One chunk from whichever stream has data, alternating so neither starves the other."""
        count = len(self._fds)
        for i in range(count):
            fd = self._fds[(self._turn + i) % count]
            data = _read(fd, READ_SIZE)
            if data:
                self._turn = (self._turn + i + 1) % count
                return Output(self._shell._streams[fd], data)
            if data is not None:  # EOF: no writer is left on this stream
                self._fds.remove(fd)
                self._shell._stop_watching(fd)
                return None
        return None


def _resolve(future: asyncio.Future[object], value: object) -> None:
    if not future.done():
        future.set_result(value)


def _read(fd: int, size: int) -> bytes | None:
    """Read without blocking: bytes, b"" at EOF, None when nothing is there now."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return b""
        raise


def _pending_bytes(fd: int) -> int:
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def _write_all(fd: int, data: bytes) -> None:
    """The command channel is blocking and the line is short; bash reads it at once."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
