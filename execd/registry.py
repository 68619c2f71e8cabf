"""The sessions: lifecycle states, limits, idle reaping, shutdown. No HTTP here."""

from __future__ import annotations

import asyncio
import enum
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from execd import frozen, identity, ladder, process
from execd.cgroups import SessionCgroups
from execd.logging import get_logger
from execd.metrics import Metrics
from execd.run import Aborted, Completed, Run, RunLimits, RunRequest, rfc3339
from execd.shell import BOOTSTRAP, NoActiveRun, Shell, ShellBusy, ShellConfig, ShellGone, ShellStartFailed
from execd.target import Finder, Selector, Target, TargetNotFound

log = get_logger("execd.registry")
# How a run in progress ends when the daemon ends its session.
SESSION_CLOSED = Aborted("SESSION_CLOSED", "the session was closed")
SHUTTING_DOWN = Aborted("SHUTTING_DOWN", "the daemon is shutting down")
T = TypeVar("T")

__all__ = ["Aborted", "Completed", "NoActiveRun", "Run", "RunRequest", "ShellBusy"]


class SessionState(enum.StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"
    CLOSED = "closed"
    EXITED = "exited"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def live(self) -> bool:
        return self in (SessionState.STARTING, SessionState.IDLE, SessionState.RUNNING)


_TERMINAL = frozenset({SessionState.CLOSED, SessionState.EXITED, SessionState.FAILED})
_ENDINGS = {SessionState.CLOSING, SessionState.EXITED, SessionState.FAILED}
# Why a session was closed, as the metrics' fixed set of reasons (a reason may be free text).
_CLOSE_REASONS = {"deleted": "deleted", "idle_timeout": "idle_timeout", "shutdown": "shutdown"}
ALLOWED_TRANSITIONS: Mapping[SessionState, frozenset[SessionState]] = {
    SessionState.STARTING: frozenset({SessionState.IDLE, *_ENDINGS}),
    SessionState.IDLE: frozenset({SessionState.RUNNING, *_ENDINGS}),
    SessionState.RUNNING: frozenset({SessionState.IDLE, *_ENDINGS}),
    SessionState.CLOSING: frozenset({SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
    SessionState.EXITED: frozenset(),
    SessionState.FAILED: frozenset(),
}


class RegistryError(Exception):
    """Base of the registry's failures; each maps to one contract code in the API layer."""


class SessionNotFound(RegistryError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"no session with id {session_id!r}")


class SessionEnded(RegistryError):
    def __init__(self, session: Session) -> None:
        super().__init__(f"session {session.id} has ended ({session.state}: {session.reason})")
        self.state = session.state
        self.reason = session.reason


class TooManySessions(RegistryError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the session limit ({limit}) is reached; close a session first")


class ShuttingDown(RegistryError):
    def __init__(self) -> None:
        super().__init__("the daemon is shutting down")


class InvalidTransition(RegistryError):
    pass


class SessionStartFailed(RegistryError):
    """The session's shell could not start; the session is forgotten (its id was never given out)."""

    def __init__(self, cause: ShellStartFailed) -> None:
        super().__init__(str(cause))
        self.errno = cause.errno


class RunNotFound(RegistryError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r} in this session (unknown or forgotten)")


class StdinNotStreamed(RegistryError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f'run {run_id} was not started with stdin "stream"')


class RunFinished(RegistryError):
    def __init__(self, run_id: str, written: int | None = None) -> None:
        super().__init__(f"run {run_id} has ended" + (f" after {written} bytes were written" if written else ""))
        self.written = written


class StdinClosed(RegistryError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"the stdin of run {run_id} is closed (eof was sent, or the run was interrupted)")


class RunIdConflict(RegistryError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} exists in this session with different code")
        self.run_id = run_id


@dataclass
class RegistryConfig:
    max_sessions: int = 256
    idle_timeout_s: float = 0.0
    max_run_timeout_ms: int = 86_400_000
    timings: ladder.Timings = field(default_factory=ladder.Timings)
    between_runs_bytes: int = 1024 * 1024
    run_limits: RunLimits = field(default_factory=RunLimits)
    runs_kept: int = 16
    base_env: Mapping[str, str] = field(default_factory=frozen.original_environ)  # a bundle's own changes undone
    shell_fd_limit: int | None = None
    run_as: identity.Identity | None = None  # the shells' user unless a session names its own
    max_processes: int = 0
    allow_privilege_escalation: bool = False
    session_cgroups: bool = True
    target: Selector | None = None  # sidecar mode: the process whose container shells start in
    run_as_spec: str | None = None  # as given (sidecar mode: looked up in the target's accounts)
    state_dir: str | None = None  # where the base dir goes (None: the temp dir)


@dataclass(frozen=True)
class Place:
    """Where a new session's shell starts: this container, or (sidecar mode) the target's, whose
    root holds the accounts and paths a request names."""

    target: Target | None = None
    default_user: identity.Identity | None = None

    @property
    def root(self) -> str:
        return self.target.root if self.target is not None else "/"

    def resolve_user(self, spec: str) -> identity.Identity:
        return identity.resolve(spec, self.root)


@dataclass(frozen=True)
class SessionOptions:
    """What a new session is asked to be (each None: the daemon's default)."""

    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    idle_timeout_s: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    user: identity.Identity | None = None
    place: Place | None = None  # None: where the registry's place() says now


class Session:
    """One shell plus what the contract says about it."""

    __slots__ = (
        "closed",
        "created_at",
        "current_run_id",
        "ended_at",
        "exit_code",
        "id",
        "idle_timeout_s",
        "labels",
        "last_active",
        "last_active_at",
        "last_run_id",
        "on_ended",
        "reason",
        "run_count",
        "runs",
        "shell",
        "signal",
        "start_error",
        "state",
    )

    def __init__(self, session_id: str, shell: Shell, idle_timeout_s: float, labels: Mapping[str, str]) -> None:
        self.id = session_id
        self.shell = shell
        self.idle_timeout_s = idle_timeout_s
        self.labels = dict(labels)
        self.state = SessionState.STARTING
        self.created_at = self.last_active_at = time.time()  # formatted only when shown
        self.last_active = time.monotonic()
        self.ended_at: float | None = None
        self.run_count = 0
        self.current_run_id: str | None = None
        self.last_run_id: str | None = None
        self.runs: dict[str, Run] = {}  # the run in progress and the last finished ones, oldest first
        self.start_error: ShellStartFailed | None = None
        self.reason: str | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.closed = asyncio.Event()  # set once every process is gone and every fd released
        self.on_ended: Callable[[Session], None] | None = None  # told once, as the session stops being live

    def transition(self, new: SessionState, reason: str | None = None) -> None:
        if new == self.state:
            return
        if new not in ALLOWED_TRANSITIONS[self.state]:
            raise InvalidTransition(f"session {self.id}: {self.state} -> {new} is not allowed")
        log.debug("session_state_changed", session_id=self.id, old=str(self.state), new=str(new), reason=reason)
        self.state = new
        if reason is not None:
            self.reason = reason
        if new in _ENDINGS:
            self.ended_at = time.monotonic()
            if self.on_ended is not None:
                self.on_ended(self)

    def touch(self) -> None:
        self.last_active = time.monotonic()
        self.last_active_at = time.time()

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "state": str(self.state),
            "pid": self.shell.pid or None,
            "cwd": self.shell.cwd,
            "user": self.user.name,
            "labels": self.labels,
            "created_at": rfc3339(self.created_at),
            "last_active_at": rfc3339(self.last_active_at),
            "idle_timeout_s": self.idle_timeout_s,
            "run_count": self.run_count,
            "current_run_id": self.current_run_id,
            "last_run_id": self.last_run_id,
            "reason": self.reason,
            "exit_code": self.exit_code,
            "signal": self.signal,
        }

    @property
    def user(self) -> identity.Identity:
        return self.shell.config.user or identity.daemon_identity()

    @property
    def root(self) -> str:
        """The shell's root as the daemon reaches it (paths a run names are under it): the shell's
        own, which stays its container's when the target it started from has gone."""
        return f"/proc/{self.shell.pid}/root" if self.shell.config.target is not None else "/"

    def resources(self) -> dict[str, Any]:
        if not self.state.live:
            return {"num_processes": 0, "rss_bytes": 0, "cpu_seconds": 0.0}
        usage = process.usage(self.shell.live_pid, self.id)
        return {"num_processes": usage.num_processes, "rss_bytes": usage.rss_bytes, "cpu_seconds": usage.cpu_seconds}

    def record_shell_end(self) -> None:
        """The shell ended by itself: exited with a status, or died by a signal."""
        if not self.state.live:
            return
        code = self.shell.returncode
        if code is not None and code >= 0:
            self.exit_code = code
            self.transition(SessionState.EXITED, f"the shell exited with status {code}")
        else:
            sig = signal.Signals(-code).name if code else "SIGKILL"
            self.signal = sig
            # When the daemon killed it (a stuck shell, a lost wrapper, a flooded channel), say why.
            why = self.shell.abort.message if self.shell.abort is not None else f"the shell was killed by {sig}"
            self.transition(SessionState.FAILED, why)

    def run(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def runs_newest_first(self) -> list[Run]:
        return list(reversed(self.runs.values()))

    def keep_run(self, run: Run, runs_kept: int) -> None:
        """A new run: older ones keep only init and their terminal event; the oldest finished
        ones beyond `runs_kept` are forgotten."""
        if self.last_run_id is not None and self.last_run_id in self.runs:
            self.runs[self.last_run_id].log.retire()  # the ones before it were retired in their turn
        self.runs[run.run_id] = run
        self.forget_old_runs(runs_kept)

    def forget_old_runs(self, runs_kept: int) -> None:
        """Only the newest run can be in progress: the oldest ones are finished, forget them first."""
        newest = next(reversed(self.runs.values()), None)
        keep = runs_kept + (1 if newest is not None and newest.running else 0)
        while len(self.runs) > keep:
            del self.runs[next(iter(self.runs))]


class Registry:
    """Every session of one daemon, by id."""

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.sessions: dict[str, Session] = {}
        self.shutting_down = False
        self._cleanups: set[asyncio.Task[Any]] = set()
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._watchdog_pidfd: int | None = None
        self.watchdog_state = "ok"  # or "restarting", while a dead watchdog is being replaced
        self.base_dir: str | None = None  # holds every session's private dir
        self.bootstrap = BOOTSTRAP
        self.cgroups: SessionCgroups | None = None
        self.targets = Finder(config.target) if config.target is not None else None
        self.metrics = Metrics(self.sessions_by_state, self.readers_attached)
        self._on_session_ended = self._session_ended  # one bound method for all, not one per session

    # ----- lifecycle of the registry ---------------------------------------------------------

    def start(self) -> None:
        """Make the sessions' base dir and start the watchdog."""
        self.base_dir = tempfile.mkdtemp(prefix=f"execd-{os.getpid()}-", dir=self.config.state_dir)
        if identity.can_switch():
            os.chmod(self.base_dir, 0o711)  # shells of other users reach their own dirs, list none
        # The wrapper, where every shell's user can read it (the package may sit in a 0700 home).
        self.bootstrap = os.path.join(self.base_dir, "bootstrap.sh")
        shutil.copyfile(BOOTSTRAP, self.bootstrap)
        os.chmod(self.bootstrap, 0o644)
        self.cgroups = SessionCgroups.create() if self.config.session_cgroups else None
        log.info(
            "kill_mode",
            mode="cgroup" if self.cgroups else "tag_sweep",
            cgroup=self.cgroups.root if self.cgroups else None,
            run_as=self.config.run_as_spec or identity.daemon_identity().name,
            target=str(self.config.target) if self.config.target else None,
        )
        self._watchdog = self._spawn_watchdog()
        self._watch_watchdog()

    def _spawn_watchdog(self) -> subprocess.Popen[bytes]:
        """A separate process that kills every session's processes if this daemon dies, and
        removes the base dir; in a session of its own, so a kill of our process group spares it."""
        assert self.base_dir is not None
        watchdog = subprocess.Popen(
            [
                *process.helper_command("watchdog"),
                self.base_dir,
                str(self.config.timings.kill_wait_s),
                self.cgroups.root if self.cgroups else "",
            ],
            stdin=subprocess.PIPE,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Only what Python needs to start: no secret of the daemon's reaches it.
            env={"PATH": os.environ.get("PATH", os.defpath)},
        )
        process.owned_children.add(watchdog.pid)
        return watchdog

    def _watch_watchdog(self) -> None:
        """Its exit is noticed at once (a pidfd), so a killed watchdog is replaced."""
        assert self._watchdog is not None
        self._watchdog_pidfd = os.pidfd_open(self._watchdog.pid)
        asyncio.get_running_loop().add_reader(self._watchdog_pidfd, self._watchdog_exited)

    def _unwatch_watchdog(self) -> None:
        if self._watchdog_pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._watchdog_pidfd)
            os.close(self._watchdog_pidfd)
            self._watchdog_pidfd = None

    def _watchdog_exited(self) -> None:
        self._unwatch_watchdog()
        dead = self._watchdog
        if dead is None:
            return
        code = dead.poll()
        process.owned_children.discard(dead.pid)
        log.error("watchdog_died", pid=dead.pid, returncode=code)
        self.watchdog_state = "restarting"
        self.spawn(self._restart_watchdog())

    async def _restart_watchdog(self) -> None:
        # Off the event loop: starting a Python process takes a while.
        self._watchdog = await asyncio.to_thread(self._spawn_watchdog)
        self._watch_watchdog()
        for session in self.sessions.values():
            if not session.closed.is_set():
                self._tell_watchdog(f"+{session.id} {session.shell.live_pid or ''}")
        self.watchdog_state = "ok"
        log.info("watchdog_restarted", pid=self._watchdog.pid)

    async def stop(self) -> None:
        """After shutdown: stop the watchdog (it finds nothing left to kill) and the base dir."""
        self._unwatch_watchdog()
        await asyncio.to_thread(self._stop_watchdog_and_dir)

    def _stop_watchdog_and_dir(self) -> None:
        self.stop_watchdog()
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
        if self.cgroups is not None:
            self.cgroups.remove_all()

    def _tell_watchdog(self, line: str) -> None:
        if self._watchdog and self._watchdog.stdin:
            try:
                self._watchdog.stdin.write(line.encode() + b"\n")
                self._watchdog.stdin.flush()
            except OSError:
                pass

    def stop_watchdog(self) -> None:
        if self._watchdog:
            if self._watchdog.stdin:
                self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            process.owned_children.discard(self._watchdog.pid)
            self._watchdog = None

    # ----- sessions --------------------------------------------------------------------------

    def live_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.state.live)

    def sessions_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for session in self.sessions.values():
            counts[session.state] = counts.get(session.state, 0) + 1
        return counts

    def readers_attached(self) -> int:
        return sum(run.reader_count for session in self.sessions.values() for run in session.runs.values())

    def place(self) -> Place:
        """Where a session created now would start (sidecar mode: the target is looked for again,
        so a restarted container is followed)."""
        if self.targets is None:
            return Place(None, self.config.run_as)
        try:
            target = self.targets.current()
            spec = self.config.run_as_spec
            return Place(target, identity.resolve(spec, target.root) if spec else None)
        except (TargetNotFound, identity.UnknownIdentity) as exc:
            raise SessionStartFailed(ShellStartFailed(f"the sandbox's container: {exc}")) from None

    def target_health(self) -> dict[str, Any] | None:
        """Sidecar mode: the selector and the pid it finds now (None while none matches)."""
        if self.targets is None:
            return None
        try:
            pid: int | None = self.targets.current().pid
        except TargetNotFound:
            pid = None
        return {"selector": str(self.targets.selector), "pid": pid}

    async def create(self, options: SessionOptions) -> Session:
        if self.shutting_down:
            raise ShuttingDown()
        if self.live_count() >= self.config.max_sessions:
            raise TooManySessions(self.config.max_sessions)
        place = options.place or self.place()
        session_id = secrets.token_hex(12)
        user, cwd, env = options.user or place.default_user, options.cwd, options.env
        login = user.environment() if user is not None else {}
        if place.target is not None:
            try:
                base_env: Mapping[str, str] = place.target.environment()
            except TargetNotFound as exc:
                raise SessionStartFailed(ShellStartFailed(f"the sandbox's container: {exc}")) from None
            cwd = cwd or ""  # the target's own, found by the spawner
        else:
            base_env, cwd = self.config.base_env, cwd or identity.default_cwd(user)
        shell = Shell(
            ShellConfig(
                session_id=session_id,
                cwd=cwd,
                env={**base_env, **login, **env},
                timings=self.config.timings,
                between_runs_bytes=self.config.between_runs_bytes,
                fd_limit=self.config.shell_fd_limit,
                base_dir=self.base_dir,
                cgroups=self.cgroups,
                bootstrap=self.bootstrap,
                user=user,
                max_processes=self.config.max_processes,
                allow_privilege_escalation=self.config.allow_privilege_escalation,
                events=self.metrics,
                target=place.target,
            )
        )
        timeout = self.config.idle_timeout_s if options.idle_timeout_s is None else options.idle_timeout_s
        session = Session(session_id, shell, timeout, options.labels)
        session.on_ended = self._on_session_ended
        self.metrics.session_created()
        shell.on_exit = lambda _shell: self._on_shell_exit(session)
        shell.on_run_end = lambda run: self._on_run_end(session, run)
        self.sessions[session_id] = session
        self._tell_watchdog("+" + session_id)
        # In a task of its own: a client that goes away mid-start must not leave a half-started
        # session behind (it would count toward the limit forever).
        await asyncio.shield(self.spawn(self._start(session)))
        return session

    async def open(self, options: SessionOptions) -> Session:
        """Create a session for a client: one whose shell could not start is not kept (the client
        never learns its id) and is a SessionStartFailed."""
        session = await self.create(options)
        if session.start_error is not None:
            self.sessions.pop(session.id, None)
            self._tell_watchdog("-" + session.id)
            raise SessionStartFailed(session.start_error)
        return session

    async def _start(self, session: Session) -> None:
        try:
            await session.shell.start()
        except ShellStartFailed as exc:
            session.start_error = exc
            if session.state.live:
                session.transition(SessionState.FAILED, str(exc))
            session.closed.set()
            log.warning("session_failed_to_start", session_id=session.id, error=str(exc))
            return
        self._tell_watchdog(f"+{session.id} {session.shell.pid}")  # its tree dies with its tag
        if session.state == SessionState.STARTING:
            session.transition(SessionState.IDLE)
        log.info("session_opened", session_id=session.id, pid=session.shell.pid)
        self._forget_excess_ended()

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return session

    def start_run(self, session: Session, request: RunRequest, run_id: str | None, timeout_ms: int) -> tuple[Run, bool]:
        """Start a run, or find the one a retry names (same `run_id`, same code): (run, started)."""
        if run_id is not None and run_id in session.runs:
            kept = session.runs[run_id]
            if kept.request.code != request.code:
                raise RunIdConflict(run_id)
            return kept, False
        if self.shutting_down:
            raise ShuttingDown()
        if session.state not in (SessionState.IDLE, SessionState.RUNNING):  # RUNNING: the shell says busy
            raise SessionEnded(session)
        current = session.shell.current_run
        if current is not None:
            raise ShellBusy(current.run_id)
        limit = self.config.max_run_timeout_ms
        effective_ms = min(timeout_ms, limit) if timeout_ms > 0 else limit
        request.timeout_s = effective_ms / 1000 if effective_ms > 0 else None
        run = Run(run_id or secrets.token_hex(8), session.id, request, self.config.run_limits)
        try:
            session.shell.start_run(run)
        except ShellGone:
            # The shell died an instant ago and its exit is not processed yet: it has ended.
            session.shell.reap_exiting()
            session.record_shell_end()
            self.clean_up_later(session)
            raise SessionEnded(session) from None
        session.keep_run(run, self.config.runs_kept)
        session.transition(SessionState.RUNNING)
        session.current_run_id = session.last_run_id = run.run_id
        session.run_count += 1
        session.touch()
        self.metrics.run_started()
        log.debug("run_started", session_id=session.id, run_id=run.run_id, background=request.background)
        log.debug("run_code", session_id=session.id, run_id=run.run_id, code=request.code)
        return run, True

    def _on_run_end(self, session: Session, run: Run) -> None:
        """Called by the shell in the same step as the run's terminal event."""
        session.current_run_id = None
        session.forget_old_runs(self.config.runs_kept)
        session.touch()
        # Logged and counted once the loop is free again: the client is waiting for the end.
        asyncio.get_running_loop().call_soon(self._after_run_end, session, run)
        if session.state == SessionState.RUNNING:
            if session.shell.alive:
                session.transition(SessionState.IDLE)
            else:
                session.record_shell_end()
                self.clean_up_later(session)

    def _after_run_end(self, session: Session, run: Run) -> None:
        self._count_run_end(run)
        outcome = run.outcome
        if isinstance(outcome, Completed):
            log.info(
                "run_finished",
                session_id=session.id,
                run_id=run.run_id,
                exit_code=outcome.exit_code,
                interrupted=outcome.interrupted,
                timed_out=outcome.timed_out,
                output_bytes=run.output_bytes,
                dropped_bytes=run.log.dropped_bytes,
            )
        elif isinstance(outcome, Aborted):
            log.info("run_aborted", session_id=session.id, run_id=run.run_id, code=outcome.code)

    def _count_run_end(self, run: Run) -> None:
        outcome = run.outcome
        if isinstance(outcome, Aborted):
            kind, code = "aborted", outcome.code
        elif outcome is not None:  # a timeout is an interrupt too: the more specific word wins
            kind = "timed_out" if outcome.timed_out else "interrupted" if outcome.interrupted else "completed"
            code = ""
        else:
            return
        self.metrics.run_finished(kind, code, run.duration_s, run.stdout_bytes, run.stderr_bytes, run.log.dropped_bytes)

    async def write_stdin(self, session: Session, run_id: str, data: bytes, eof: bool) -> int:
        """Feed a run's streamed stdin; returns the bytes written once they are in the pipe."""
        run = session.run(run_id)
        if not run.request.stdin_stream:
            raise StdinNotStreamed(run_id)
        stdin = session.shell.stdin_of(run)
        if not run.running or stdin is None:
            raise RunFinished(run_id)
        if stdin.closed:
            raise StdinClosed(run_id)
        written = await stdin.write(data) if data else 0
        if written < len(data):
            if not run.running:
                raise RunFinished(run_id, written)
            raise StdinClosed(run_id)
        if eof:
            stdin.close()
        return written

    def interrupt(self, session: Session, sig: signal.Signals, run_id: str | None) -> str:
        if not session.state.live:
            raise SessionEnded(session)
        return session.shell.interrupt(sig, run_id)

    async def close(self, session: Session, reason: str) -> None:
        """Kill every process of a live session and release its fds; wait for an ended one's cleanup.

        The work runs in a task of its own: a DELETE whose client goes away (aiohttp then cancels
        the handler) must still end in `closed`, with every process killed and every fd released.
        """
        if session.state.live:
            session.transition(SessionState.CLOSING, reason)
            await asyncio.shield(self.spawn(self._close(session, reason)))
        else:
            await session.closed.wait()

    async def _close(self, session: Session, reason: str) -> None:
        await self._clean_up(session, SESSION_CLOSED)
        session.transition(SessionState.CLOSED)
        log.info("session_closed", session_id=session.id, reason=reason)

    async def delete(self, session_id: str) -> dict[str, Any]:
        session = self.get(session_id)
        # Closed and forgotten even if the client goes away meanwhile (its handler is cancelled).
        await asyncio.shield(self.spawn(self._delete(session)))
        return session.to_dict()

    async def _delete(self, session: Session) -> None:
        await self.close(session, "deleted")
        self.sessions.pop(session.id, None)

    def _session_ended(self, session: Session) -> None:
        """The session stops being live (closing, exited or failed): counted by why."""
        if session.state == SessionState.CLOSING:
            reason = _CLOSE_REASONS.get(session.reason or "", "deleted")
        elif session.state == SessionState.EXITED:
            reason = "exited"
        else:
            reason = "start_failed" if session.start_error is not None else "failed"
        self.metrics.session_closed(reason)

    def _on_shell_exit(self, session: Session) -> None:
        # With a run in progress, the run reports the end after it has read the last output; a
        # shell that dies while starting is the start's failure (`failed`), reported by _start.
        if session.state in (SessionState.IDLE, SessionState.RUNNING) and session.current_run_id is None:
            session.record_shell_end()
            log.info("session_ended", session_id=session.id, state=str(session.state), reason=session.reason)
            self.clean_up_later(session)

    def clean_up_later(self, session: Session) -> None:
        self.spawn(self._clean_up(session, None))

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A background task that shutdown waits for (and that nothing garbage-collects early)."""
        task = asyncio.get_running_loop().create_task(work)
        self._cleanups.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._cleanups.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", exc_info=task.exception())

    async def _clean_up(self, session: Session, reason: Aborted | None, *, killed: bool = False) -> None:
        if session.closed.is_set():
            return
        await session.shell.close(reason, killed=killed)
        self._tell_watchdog("-" + session.id)
        session.closed.set()
        # The shell's callbacks hold its session: let go, so both go with reference counting
        # when the session is forgotten, not at some later cycle collection.
        session.shell.on_exit = session.shell.on_run_end = None

    # ----- reaping ---------------------------------------------------------------------------

    async def reap_idle(self) -> None:
        """Close live sessions idle past their timeout; forget ended ones past theirs."""
        now = time.monotonic()
        for session in list(self.sessions.values()):
            timeout = session.idle_timeout_s
            if timeout <= 0:
                continue
            if session.state == SessionState.IDLE and now - session.last_active > timeout:
                log.info("session_idle_timeout", session_id=session.id, idle_timeout_s=timeout)
                await self.close(session, "idle_timeout")
            elif session.state.terminal and session.closed.is_set() and now - (session.ended_at or now) > timeout:
                self.sessions.pop(session.id, None)
        self._forget_excess_ended()

    def _forget_excess_ended(self) -> None:
        ended = [s for s in self.sessions.values() if s.state.terminal and s.closed.is_set()]
        excess = len(ended) - self.config.max_sessions
        if excess > 0:
            for session in sorted(ended, key=lambda s: s.ended_at or 0)[:excess]:
                self.sessions.pop(session.id, None)

    async def reaper_loop(self, max_period_s: float = 1.0, *, reap_orphans: bool = False) -> None:
        """Check every second, or more often when a timeout is short (a 0.5 s timeout is kept
        within about an eighth of a second). Also reaps orphans that exited by themselves, for
        event loops that do not let us handle SIGCHLD."""
        while True:
            timeouts = [s.idle_timeout_s for s in self.sessions.values() if s.idle_timeout_s > 0]
            await asyncio.sleep(min([max_period_s, *(max(0.05, t / 4) for t in timeouts)]))
            await self.reap_idle()
            if self.cgroups is not None and self.cgroups.has_retired:
                await asyncio.to_thread(self.cgroups.remove_retired)
            if reap_orphans:
                process.reap_zombie_children()

    # ----- shutdown --------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Stop taking work, end every run with SHUTTING_DOWN, close every session."""
        self.shutting_down = True
        live = [s for s in self.sessions.values() if s.state.live]
        if live:
            log.info("sessions_closing_for_shutdown", count=len(live))
        for session in live:
            session.transition(SessionState.CLOSING, "shutdown")
            session.shell.set_abort(SHUTTING_DOWN)
        # One sweep of /proc for all of them: closing a thousand sessions one by one takes minutes.
        sessions = {s.id: s.shell.live_pid for s in live}
        if not await ladder.sweep_sessions(sessions, self.config.timings, self.cgroups):
            log.warning("session_processes_survived_kill", sessions=len(sessions))
        await asyncio.gather(*(self._clean_up(s, SHUTTING_DOWN, killed=True) for s in live))
        for session in live:
            session.transition(SessionState.CLOSED)
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    def kill_all_now(self) -> None:
        """Last resort (a second signal): kill every shell without waiting for anything."""
        pending = [s for s in self.sessions.values() if not s.closed.is_set()]
        ladder.sweep_sessions_now({s.id: s.shell.live_pid for s in pending}, self.config.timings, self.cgroups)
        for session in pending:
            session.shell.release_killed(SHUTTING_DOWN)
