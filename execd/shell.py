"""One persistent bash process over pipes, and the runs it drives to their end. No HTTP here.

Protocol (see bootstrap.sh and docs/architecture.md):
- the shell reads one wrapper line per run on its stdin, the daemon's private command channel;
- the user's code is written to a private file and `source`d with its own stdin, so it can neither
  read the command channel nor desynchronise it, and a syntax error is only a failed run;
- completion, `$?`, `$-` and `$PWD` come back on a FIFO in a 0700 directory, never in the output;
- stdout and stderr are separate pipes, drained at all times: into the run in progress (as fast as
  its log has room), or into a bounded between-runs buffer when no run is on.

A run is driven by the shell alone: output goes into the run's log as it is read, and the run ends
when its status arrives (or the shell dies), whether or not anyone reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Protocol

from execd import identity, ladder, process
from execd.cgroups import SessionCgroups
from execd.logging import get_logger
from execd.pipes import OutputPipes, Status, StatusChannel, StdinStream, Stream
from execd.run import Aborted, Completed, Outcome, Run
from execd.target import Target

log = get_logger("execd.shell")
MAX_SENDS = 3  # a run's line is sent again when the user's code broke the wrapper's alias
INTERRUPT_SIGNAL = signal.SIGUSR2  # the shell's own handler for the daemon's interrupts
ENV_FD = 3  # where the spawner reads the shell's environment in sidecar mode
BOOTSTRAP = str(resources.files("execd") / "bootstrap.sh")
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
    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # of the system call that failed, if one did


class RunEvents(Protocol):
    """Who hears of a run's interrupts and escalations (the daemon's metrics): told, never asked."""

    def run_interrupted(self, cause: str) -> None: ...

    def sigkill_escalated(self) -> None: ...


@dataclass
class ShellConfig:
    session_id: str
    cwd: str
    env: Mapping[str, str]
    timings: ladder.Timings = field(default_factory=ladder.Timings)
    between_runs_bytes: int = 1024 * 1024
    start_timeout_s: float = 10.0
    fd_limit: int | None = None  # the soft RLIMIT_NOFILE the shell gets (the daemon's may be higher)
    base_dir: str | None = None  # where the private dir goes (one per daemon, so it is easy to sweep)
    bootstrap: str = BOOTSTRAP  # a copy the shell's user can read (the package may sit in /root)
    user: identity.Identity | None = None  # whom the shell runs as; None: the daemon's own user
    max_processes: int = 0  # RLIMIT_NPROC of a shell that runs as a user other than root
    allow_privilege_escalation: bool = False  # setuid binaries may elevate a switched shell
    cgroups: SessionCgroups | None = None  # where each session gets a cgroup of its own
    events: RunEvents | None = None
    target: Target | None = None  # sidecar mode: start in this process's container (cwd "": its cwd)


def shell_environment(base: Mapping[str, str], session_id: str) -> dict[str, str]:
    """The daemon's environment (or the target's) minus every EXECD_* setting or secret and every
    name of the wrapper's own, plus defaults and the tag."""
    env = {
        k: v
        for k, v in base.items()
        if not k.startswith("EXECD_") and k != "BASH_ENV" and not k.upper().startswith("__EXECD")
    }
    for key, value in _NON_INTERACTIVE_DEFAULTS.items():
        env.setdefault(key, value)
    env[process.SESSION_TAG] = session_id
    return env


class _Current:
    """What the shell keeps about the run in progress."""

    __slots__ = ("line", "reported", "run", "sent", "seq", "stdin", "timer")

    def __init__(self, run: Run) -> None:
        self.run = run
        # The run's name on the status channel: unguessable, so a background job of an earlier
        # run cannot end a later one with a forged record (the run's own code can end its own).
        self.seq = secrets.token_hex(4)
        self.line = b""  # what was written to the command pipe to start the run
        self.sent = 1
        self.reported = False
        self.stdin: StdinStream | None = None
        self.timer: asyncio.TimerHandle | None = None


class Shell:
    """A live `bash --noprofile --norc` in its own session and process group."""

    __slots__ = (
        "_current",
        "_dir",
        "_err_trap",
        "_exit_waiter",
        "_fds",
        "_flags",
        "_foreign_records",
        "_last_exit_code",
        "_loop",
        "_owner",
        "_pipes",
        "_status",
        "_tasks",
        "abort",
        "config",
        "cwd",
        "on_exit",
        "on_run_end",
        "pid",
        "returncode",
    )

    def __init__(self, config: ShellConfig) -> None:
        self.config = config
        self.pid = 0
        self.cwd = config.cwd
        self.returncode: int | None = None  # waitpid status as Popen reports it: -N for signal N
        self.on_exit: Callable[[Shell], None] | None = None
        self.on_run_end: Callable[[Run], None] | None = None
        self.abort: Aborted | None = None  # why the daemon killed the shell, if it did
        self._loop = asyncio.get_running_loop()
        self._dir = ""
        self._owner = identity.Owner.of(config.user)
        self._fds: dict[str, int] = {}
        self._pipes = OutputPipes(self._loop, config.between_runs_bytes, config.session_id)
        self._status: StatusChannel | None = None
        self._exit_waiter: asyncio.Future[None] | None = None  # made for the first who waits
        self._current: _Current | None = None
        self._foreign_records = 0
        self._last_exit_code = 0
        self._flags = ""
        self._err_trap = False
        self._tasks: set[asyncio.Task[None]] | None = None  # the ladders climbing for its runs

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn bash and wait until it has run the bootstrap."""
        started = self._loop.create_future()
        try:
            self._spawn(started)
            exited = self._loop.create_task(self._wait_exit())
            done, _ = await asyncio.wait(
                {started, exited}, timeout=self.config.start_timeout_s, return_when="FIRST_COMPLETED"
            )
            exited.cancel()
            if started not in done:
                raise ShellGone(self._last_words() if exited in done else "it did not report in time")
        except (OSError, ShellGone) as exc:
            await self.close(Aborted("SESSION_DIED", "the shell could not start"))
            errno = exc.errno if isinstance(exc, OSError) else None
            raise ShellStartFailed(f"the shell could not start: {exc}", errno) from exc
        status = started.result()
        self.cwd, self._flags, self._err_trap = status.cwd, status.flags, status.err_trap

    def _spawn(self, started: asyncio.Future[Status]) -> None:
        self._dir = tempfile.mkdtemp(prefix="session-", dir=self.config.base_dir)
        fifo = os.path.join(self._dir, "status")
        os.mkfifo(fifo, 0o600)
        scratch = os.path.join(self._dir, "scratch")
        os.mkfifo(scratch, 0o600)  # the wrapper's, to read trap texts
        # O_RDWR: opening never blocks and the FIFO never reads EOF while the shell reopens it.
        self._fds["status"] = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._fds["code"] = os.open(os.path.join(self._dir, "code"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self._owner is not None:
            os.chmod(self._dir, 0o711)
            for owned in (self._fds["status"], self._fds["code"], scratch):
                self._owner.give(owned)
        stdin_r, self._fds["stdin"] = os.pipe2(os.O_CLOEXEC)
        stdout_w, stderr_w = self._pipes.open()
        env = shell_environment(self.config.env, self.config.session_id)
        env.update(BASH_ENV=self.config.bootstrap, __EXECD_DIR=self._dir, __EXECD_CWD=self.config.cwd)
        if self.config.fd_limit:
            env["__EXECD_NOFILE"] = str(self.config.fd_limit)
        if self.config.max_processes and self.config.user is not None and not self.config.user.is_root:
            env["__EXECD_NPROC"] = str(self.config.max_processes)  # set by the shell itself, as its user
        argv = self._command()
        fds = [stdin_r, stdout_w, stderr_w]
        actions = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        try:
            if self.config.target is not None:
                # The target's environment is the sandbox's to choose: only bash gets it (enter.py).
                fds.append(_environment_fd(env))
                actions.append((os.POSIX_SPAWN_DUP2, fds[-1], ENV_FD))
                env = {"PATH": os.environ.get("PATH", os.defpath)}
            self.pid = os.posix_spawn(
                _BASH if argv[0] == "bash" else argv[0],
                argv,
                env,
                file_actions=actions,
                setsid=True,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        finally:
            for fd in fds:
                os.close(fd)
        process.owned_children.add(self.pid)
        if self.config.cgroups is not None:
            self.config.cgroups.add(self.config.session_id, self.pid)
        self._fds["pidfd"] = os.pidfd_open(self.pid)
        self._loop.add_reader(self._fds["pidfd"], self._exited)

        def on_status(status: Status) -> None:
            if not started.done():
                started.set_result(status)
            else:
                self._on_status(status)

        self._status = StatusChannel(
            self._fds["status"], on_status, self._send_again, self._status_flooded, self.config.session_id
        )
        self._loop.add_reader(self._fds["status"], self._status.read_available)
        self._pipes.watch()

    def _last_words(self) -> str:
        """Why a shell that never reported exited: the last line it wrote on stderr, if any (the
        spawner says why it could not enter the target or switch users)."""
        said = b"".join(data for stream, data, _ in self._pipes.take_between_runs() if stream == "stderr")
        said += b"".join(data for stream, data in self._pipes.drain_now() if stream == "stderr")
        lines = said.decode(errors="replace").strip().splitlines()
        return f"the shell exited: {lines[-1][:300]}" if lines else "the shell exited"

    def _command(self) -> list[str]:
        """bash; behind setpriv (or execd's spawner, without it) when it runs as another user;
        behind the spawner, found on the target's PATH, when it starts in the target's container:
        there it always drops every capability, root included (its root is the sandbox's)."""
        user, escalate = self.config.user if self._owner is not None else None, self.config.allow_privilege_escalation
        if self.config.target is not None:
            switch = (user or identity.daemon_identity()).enter_options(escalate)
            spawner = process.helper_command("enter")
            target = ["--env-fd", str(ENV_FD), "--target", self.config.target.enter_spec]
            return [*spawner, *target, *switch, "--", "bash", "--noprofile", "--norc"]
        if user is not None:
            return [*user.spawn_prefix(escalate), _BASH, "--noprofile", "--norc"]
        return ["bash", "--noprofile", "--norc"]

    @property
    def alive(self) -> bool:
        return self.returncode is None and self.pid != 0

    @property
    def live_pid(self) -> int | None:
        """The shell's pid while it is ours (not yet reaped); after that the number may be reused."""
        return self.pid if self.pid and self.returncode is None else None

    @property
    def current_run(self) -> Run | None:
        return self._current.run if self._current else None

    def set_abort(self, reason: Aborted | None) -> None:
        """Say why the daemon is about to kill the shell: the run in progress ends with it."""
        if reason is not None and self.abort is None and self.alive:
            self.abort = reason

    async def close(self, reason: Aborted | None, *, killed: bool = False) -> None:
        """Kill the shell and every process the session started (unless the caller already has,
        for many sessions at once), await the reap, release every fd."""
        self.set_abort(reason)
        if self.pid:
            if not killed:
                sessions = {self.config.session_id: self.live_pid}
                if not await ladder.sweep_sessions(sessions, self.config.timings, self.config.cgroups):
                    log.warning("session_processes_survived_kill", session_id=self.config.session_id)
            if self.returncode is None:
                try:
                    await asyncio.wait_for(self._wait_exit(), self.config.timings.kill_wait_s)
                except TimeoutError:
                    # A blocking wait, off the event loop: other sessions keep streaming.
                    self._record_exit(await asyncio.to_thread(_wait_for_exit, self.pid))
        self._release()

    def release_killed(self, reason: Aborted | None) -> None:
        """Like close, without waiting on the event loop, once the caller has killed the session's
        processes (a forced exit): reap the shell and release every fd."""
        self.set_abort(reason)
        if self.returncode is None and self.pid:
            self._reap(block=True)
        self._release()

    def _release(self) -> None:
        for task in self._tasks or ():
            if task is not asyncio.current_task():
                task.cancel()
        if self._current is not None:  # never reached while the shell lives; belt and braces
            self._end_run(None)
        for name, fd in list(self._fds.items()):
            if name in ("pidfd", "status"):
                self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        self._pipes.close()
        self._status = None  # its callbacks are this shell's: no cycle left behind
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""
        self._set_exited()

    async def _wait_exit(self) -> None:
        if self.returncode is not None or not self._fds:
            return
        if self._exit_waiter is None:
            self._exit_waiter = self._loop.create_future()
        await asyncio.shield(self._exit_waiter)

    def _set_exited(self) -> None:
        if self._exit_waiter is not None and not self._exit_waiter.done():
            self._exit_waiter.set_result(None)

    def reap_exiting(self) -> None:
        """Reap a shell known to be exiting (its command channel is closed), blocking briefly."""
        if self.returncode is None and self.pid:
            self._reap(block=True)

    def _exited(self) -> None:
        """The shell has ended (its pidfd says so) and is not reaped yet, so its pid, and the
        process group it leads, cannot be anyone else's: kill what is left in that group first
        (a background job it left behind, tagged or not), then reap."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        """Reap the shell if it has exited (`block`: wait for it, for callers that know it is
        exiting or have killed it and may not await)."""
        if self.returncode is not None:
            return
        status = _wait_for_exit(self.pid) if block else _exit_status(self.pid)
        if status is not None:
            self._record_exit(status)

    def _record_exit(self, status: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        process.owned_children.discard(self.pid)
        if "pidfd" in self._fds:
            self._loop.remove_reader(self._fds["pidfd"])
        if self._current is not None:
            # The shell may have reported just before it died: read that first.
            if self._status is not None and "status" in self._fds:
                self._status.read_available()
            if self._current is not None:
                self._end_run(None)
        self._set_exited()
        if self.on_exit:
            self._loop.call_soon(self.on_exit, self)

    # ----- status channel --------------------------------------------------------------------

    def _on_status(self, status: Status) -> None:
        current = self._current
        if current is None or status.seq != current.seq:
            # A late record of a run already ended (say, by the shell's death), or a forged one.
            if self._foreign_records == 0:
                log.warning("status_record_ignored", session_id=self.config.session_id, seq=status.seq[:16])
            self._foreign_records += 1
            return
        current.reported = True
        self._end_run(status)

    def _status_flooded(self) -> None:
        """Something in the session wrote junk into the status channel: the shell's reports can no
        longer be told from it."""
        log.error("status_channel_flooded", session_id=self.config.session_id)
        self._give_up("the shell's status channel was flooded with junk by the session's code")

    def _send_again(self, seq: str) -> None:
        """The user's code removed the wrapper's aliases or switched alias expansion off; the shell
        has put both back and asks for the run's line again."""
        current = self._current
        if current is None or current.seq != seq or current.reported or "stdin" not in self._fds:
            return
        current.sent += 1
        if current.sent > MAX_SENDS:
            # The aliases do not come back (say, `enable -n alias`): the shell can run nothing more.
            log.error("run_line_refused", session_id=self.config.session_id, run_id=current.run.run_id)
            self._give_up("the shell no longer runs the daemon's wrapper (its aliases are gone)")
            return
        try:
            _write_all(self._fds["stdin"], current.line)
        except BrokenPipeError:
            pass  # the shell has ended: its exit ends the run

    # ----- runs ------------------------------------------------------------------------------

    def start_run(self, run: Run) -> None:
        """Start `run` now; the shell drives it to its end and calls on_run_end."""
        if self._current is not None:
            raise ShellBusy(self._current.run.run_id)
        if not self.alive or not self._fds:
            raise ShellGone("the shell has ended")
        current = _Current(run)
        request = run.request
        self._write_code(request.code)
        if request.stdin_stream:
            path = os.path.join(self._dir, f"stdin-{current.seq}")
            current.stdin = StdinStream(self._loop, path, self.pid, self._owner)
        try:
            current.line = self._command_line(current).encode()
            _write_all(self._fds["stdin"], current.line)
        except BaseException as exc:
            if current.stdin is not None:
                current.stdin.release()
            if isinstance(exc, BrokenPipeError):
                raise ShellGone("the shell has ended") from exc
            raise
        self._current = current
        for stream, data, dropped in self._pipes.take_between_runs():
            run.add_between_runs(stream, data, dropped)
        run.on_room = self._pipes.resume
        run.on_abandoned = self._abandoned
        self._pipes.sink = run.add_output
        if request.timeout_s:
            current.timer = self._loop.call_later(request.timeout_s, self._timed_out, current)

    def stdin_of(self, run: Run) -> StdinStream | None:
        current = self._current
        return current.stdin if current is not None and current.run is run else None

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

    def _command_line(self, current: _Current) -> str:
        request = current.run.request
        prelude = "".join(f"\\__execd_setenv {k} {shlex.quote(v)}\n" for k, v in request.env.items())
        if prelude:
            _write_file(os.path.join(self._dir, "prelude"), prelude.encode(), self._owner)
        if request.stdin is not None:
            _write_file(os.path.join(self._dir, "stdin"), request.stdin.encode(errors="surrogateescape"), self._owner)
        # Bash reads its commands from a pipe one byte at a time, so the line is a few assignments
        # and an alias that bootstrap.sh defines (see there).
        line = [f"__execd_s={current.seq}"]
        if prelude:
            line.append("__execd_e=1")
        if current.stdin is not None:
            line.append(f"__execd_in=$__execd_dir/stdin-{current.seq}")
        elif request.stdin is not None:
            line.append("__execd_in=$__execd_dir/stdin")
        if request.cwd is not None:
            line.append(f"__execd_cd={shlex.quote(request.cwd)}")
        if self._last_exit_code:
            line.append(f"__execd_p={self._last_exit_code}")
        line.append("__execd_go1" if self._last_exit_code else "__execd_go0")
        return ";".join(line) + "\n"

    def _end_run(self, status: Status | None) -> None:
        """The run's end, all in one step: the output the pipes hold, its terminal event, the shell
        idle again (or ended), the session told."""
        current = self._current
        assert current is not None
        run = current.run
        for stream, data in self._pipes.drain_now():
            run.add_output(stream, data)
        outcome = self._outcome(run, status)
        self._current = None
        self._pipes.sink = None
        run.on_room = run.on_abandoned = None
        if run.interrupt_signal is not None:
            run.ended = process.now()  # bounds the escalation that may still be pending
        if current.timer is not None:
            current.timer.cancel()
        if current.stdin is not None:
            current.stdin.release()
        if run.interrupt_signal is not None and self._dir:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self._dir, "interrupt"))
        run.finish(outcome)
        self._pipes.resume()  # between runs, output is drained as it comes
        if self.on_run_end is not None:
            self.on_run_end(run)

    def _outcome(self, run: Run, status: Status | None) -> Outcome:
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

    # ----- interrupts: the first rungs of the ladder -----------------------------------------

    def interrupt(
        self, sig: signal.Signals = signal.SIGINT, run_id: str | None = None, *, cause: str = "request"
    ) -> str:
        """Ctrl-C for the run in progress: the rest of its code is skipped, the shell survives."""
        current = self._current
        if current is None or (run_id is not None and run_id != current.run.run_id):
            raise NoActiveRun("no run in progress" if current is None else f"run {run_id} is not in progress")
        if not self.alive or not self._fds:
            # The shell is gone (its pid may already belong to another process): the run is ending.
            raise NoActiveRun("the run is ending: its shell is gone")
        run = current.run
        if run.interrupt_signal is None:
            run.interrupt_signal = sig
            run.timed_out = cause == "timeout"
            # The file says which run the signal is for; the shell ignores it for any other run.
            notice = f"{current.seq} {sig.name[3:]}\n".encode()
            _write_file(os.path.join(self._dir, "interrupt"), notice, self._owner)
            self._spawn_task(
                ladder.climb_for_run(
                    run.wait_end,
                    self.config.timings,
                    lambda: self._kill_run_processes(run),
                    lambda: self._give_up_if_stuck(current),
                )
            )
        if current.stdin is not None:
            current.stdin.close()  # a `read` of it must return, or the shell cannot come back
        os.kill(self.pid, INTERRUPT_SIGNAL)
        process.signal_pids(self._run_processes(run, same_group_only=sig == signal.SIGINT), sig)
        if self.config.events is not None:
            self.config.events.run_interrupted(cause)
        log.info("run_interrupted", session_id=self.config.session_id, run_id=run.run_id, signal=sig.name, cause=cause)
        return run.run_id

    def _timed_out(self, current: _Current) -> None:
        if self._current is current:
            with contextlib.suppress(NoActiveRun):
                self.interrupt(signal.SIGINT, current.run.run_id, cause="timeout")

    def _abandoned(self, run: Run) -> None:
        """The run belongs to its readers, and the last one left (past the grace)."""
        with contextlib.suppress(NoActiveRun):
            self.interrupt(signal.SIGINT, run.run_id, cause="client_gone")

    def _run_processes(self, run: Run, same_group_only: bool = False) -> list[int]:
        return process.processes_started_between(
            self.pid, self.config.session_id, run.started, run.ended, same_group_only=same_group_only
        )

    def _kill_run_processes(self, run: Run) -> None:
        """The ladder's SIGKILL rung, the grace after an interrupt: an escalation only if
        something of the run is still there to kill."""
        if not self.alive:
            return
        pids = self._run_processes(run)
        if pids:
            process.signal_pids(pids, signal.SIGKILL)
            if self.config.events is not None:
                self.config.events.sigkill_escalated()

    async def _give_up_if_stuck(self, current: _Current) -> None:
        # A run whose status has arrived is not stuck.
        if self._current is current and not current.reported and self.alive:
            await self._close_stuck("the shell did not come back after an interrupt")

    def _give_up(self, why: str) -> None:
        """Close a shell that can run nothing more: the run in progress ends with SESSION_DIED.
        Once: a flood may trip the status channel's cap again within one read."""
        if self.abort is None:
            self.set_abort(Aborted("SESSION_DIED", why))
            self._spawn_task(self._close_stuck(why))

    async def _close_stuck(self, why: str) -> None:
        await self.close(Aborted("SESSION_DIED", why))

    def _spawn_task(self, work: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._loop.create_task(work)  # type: ignore[arg-type]
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _environment_fd(env: Mapping[str, str]) -> int:
    """A memfd holding `env` as NUL-terminated NAME=VALUE records, for the spawner to read."""
    fd = os.memfd_create("execd-env", os.MFD_CLOEXEC)
    try:
        _write_all(fd, b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items()))
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _exit_status(pid: int) -> int | None:
    """The wait status of an exited child, None while it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0  # someone else reaped it; it is gone all the same
    return status if done else None


def _wait_for_exit(pid: int) -> int:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return 0


def _write_all(fd: int, data: bytes) -> None:
    """The command channel is blocking and the line is short; bash reads it at once."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_file(path: str, data: bytes, owner: identity.Owner | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if owner is not None:
            owner.give(fd)
        _write_all(fd, data)
    finally:
        os.close(fd)


__all__ = ["Aborted", "Completed", "Run", "Stream"]
