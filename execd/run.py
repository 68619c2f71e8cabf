"""A run: one piece of code in a session's shell, as an object of its own.

The shell drives it (output in, then its end); its events go into its log, which readers follow.
Whether a run belongs to its readers (`on_disconnect: "interrupt"`) or to nobody decides both the
backpressure of its log and what happens when its last reader goes away. No HTTP here.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from execd import process
from execd.runlog import Reader, RunLog
from execd.sse import EventEncoder

Stream = Literal["stdout", "stderr"]
OnDisconnect = Literal["interrupt", "continue"]


class RunState(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


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


Outcome = Completed | Aborted


@dataclass
class RunRequest:
    code: str
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: str | None = None
    stdin_stream: bool = False
    timeout_s: float | None = None
    background: bool = False
    on_disconnect: OnDisconnect = "interrupt"
    disconnect_grace_s: float = 0.0


@dataclass(frozen=True)
class RunLimits:
    log_bytes: int = 1024 * 1024
    max_output_bytes: int = 256 * 1024 * 1024
    max_readers: int = 8


class TooManyReaders(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"this run already has {limit} readers, the most it may have")


def rfc3339(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_fields(code: str, message: str) -> dict[str, Any]:
    """An `error` event's fields; `error` is the shape OpenSandbox clients read."""
    return {"code": code, "message": message, "error": {"ename": code, "evalue": message, "traceback": []}}


class Run:
    __slots__ = (
        "_abandon_timer",
        "_encoder",
        "_ended",
        "_ended_mono",
        "_started_mono",
        "ended",
        "finished_at",
        "interrupt_signal",
        "limits",
        "log",
        "on_abandoned",
        "on_room",
        "outcome",
        "request",
        "run_id",
        "session_id",
        "started",
        "started_at",
        "state",
        "stderr_bytes",
        "stdout_bytes",
        "timed_out",
    )

    def __init__(self, run_id: str, session_id: str, request: RunRequest, limits: RunLimits) -> None:
        self.run_id = run_id
        self.session_id = session_id
        self.request = request
        self.limits = limits
        self.state = RunState.RUNNING
        self.started_at = time.time()
        self.started = process.now()  # in process-creation order: which processes are the run's
        self.ended: process.Moment | None = None
        self._started_mono = time.monotonic()
        self._ended_mono: float | None = None
        self.finished_at: float | None = None
        self.outcome: Outcome | None = None
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.interrupt_signal: int | None = None
        self.timed_out = False
        self.on_abandoned: Callable[[Run], None] | None = None  # no reader left past the grace
        self.on_room: Callable[[], None] | None = None  # the engine may read the pipes again
        self._ended: asyncio.Future[None] | None = None  # made for the first who waits for the end
        self._encoder = EventEncoder(run_id, limits.max_output_bytes)
        self.log = RunLog(run_id, limits.log_bytes, keep_unsent=self.belongs_to_readers)
        self.log.on_room = self._room
        self.log.on_readers_changed = self._readers_changed
        self._abandon_timer: asyncio.Handle | None = None
        self.log.append(self._encoder.init(session_id))

    @property
    def belongs_to_readers(self) -> bool:
        return self.request.on_disconnect == "interrupt" and not self.request.background

    @property
    def running(self) -> bool:
        return self.state == RunState.RUNNING

    @property
    def output_bytes(self) -> int:
        return self.stdout_bytes + self.stderr_bytes

    @property
    def duration_s(self) -> float:
        """From the start to the terminal event (to now, while the run is on)."""
        end = self._ended_mono if self._ended_mono is not None else time.monotonic()
        return end - self._started_mono

    @property
    def reader_count(self) -> int:
        return len(self.log.readers)

    # ----- driven by the shell ---------------------------------------------------------------

    def add_between_runs(self, stream: Stream, data: bytes, dropped_bytes: int) -> None:
        if dropped_bytes:
            frame = self._encoder.output(stream, data, between_runs=True, dropped_bytes=dropped_bytes)
        else:
            frame = self._encoder.output(stream, data, between_runs=True)
        if frame is not None:
            self.log.append(frame)

    def add_output(self, stream: Stream, data: bytes) -> bool:
        """Output of the run; False when the engine should stop reading until there is room."""
        if stream == "stdout":
            self.stdout_bytes += len(data)
        else:
            self.stderr_bytes += len(data)
        frame = self._encoder.output(stream, data)
        if frame is not None:
            self.log.append(frame)
        return self.log.has_room()

    def finish(self, outcome: Outcome) -> None:
        """The terminal event, the run's state and its end, in one step."""
        for frame in self._encoder.flush_text():
            self.log.append(frame)
        self.outcome = outcome
        self.finished_at = time.time()
        self._ended_mono = time.monotonic()
        self._cancel_abandon()
        # The log's callbacks are this run's methods: a finished run needs neither, and without
        # them run and log are no cycle (a forgotten run goes with its last reference).
        self.log.on_room = self.log.on_readers_changed = None
        if isinstance(outcome, Completed):
            self.state = RunState.COMPLETED
            terminal = self._encoder.complete(
                outcome.exit_code,
                int((self._ended_mono - self._started_mono) * 1000),
                outcome.interrupted,
                outcome.timed_out,
                outcome.cwd,
                outcome.shell_exited,
            )
        else:
            self.state = RunState.ABORTED
            terminal = self._encoder.event("error", **error_fields(outcome.code, outcome.message))
        self.log.finish(terminal)
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    async def wait_end(self) -> None:
        """Until the run's terminal event is in its log."""
        if not self.running:
            return
        if self._ended is None:
            self._ended = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._ended)

    def _room(self) -> None:
        if self.on_room is not None and self.running:
            self.on_room()

    # ----- readers ---------------------------------------------------------------------------

    def attach(self, cursor: int) -> Reader:
        if len(self.log.readers) >= self.limits.max_readers:
            raise TooManyReaders(self.limits.max_readers)
        return self.log.attach(cursor)

    def _readers_changed(self, count: int) -> None:
        if count:
            self._cancel_abandon()
        elif self.running and self.belongs_to_readers and self._abandon_timer is None:
            grace = self.request.disconnect_grace_s
            loop = asyncio.get_running_loop()
            if grace > 0:
                self._abandon_timer = loop.call_later(grace, self._abandon)
            else:
                # Not in the detaching reader's own call stack: it may be in the middle of a cancel.
                self._abandon_timer = loop.call_soon(self._abandon)

    def _abandon(self) -> None:
        self._abandon_timer = None
        if self.running and not self.log.readers and self.on_abandoned is not None:
            self.on_abandoned(self)

    def _cancel_abandon(self) -> None:
        if self._abandon_timer is not None:
            self._abandon_timer.cancel()
            self._abandon_timer = None

    # ----- the run object --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        outcome = self.outcome
        completed = outcome if isinstance(outcome, Completed) else None
        request = self.request
        return {
            "run_id": self.run_id,
            "session_id": self.session_id,
            "state": str(self.state),
            "started_at": rfc3339(self.started_at),
            "finished_at": rfc3339(self.finished_at) if self.finished_at is not None else None,
            "exit_code": completed.exit_code if completed else None,
            "interrupted": completed.interrupted if completed else self.interrupt_signal is not None,
            "timed_out": completed.timed_out if completed else self.timed_out,
            "shell_exited": completed.shell_exited if completed else False,
            "error": {"code": outcome.code, "message": outcome.message} if isinstance(outcome, Aborted) else None,
            "output_bytes": self.output_bytes,
            "dropped_bytes": self.log.dropped_bytes,
            "last_seq": self.log.last_seq,
            "readers": self.reader_count,
            "background": request.background,
            "on_disconnect": "continue" if request.background else request.on_disconnect,
            "stdin": "stream" if request.stdin_stream else ("text" if request.stdin is not None else None),
        }
