"""The shell's pipes and channels, each with a small interface: its output pipes (with the
between-runs buffer), its status channel, and a run's streamed stdin. No HTTP, no runs here."""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import os
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from execd import identity
from execd.logging import get_logger

log = get_logger("execd.pipes")
Stream = Literal["stdout", "stderr"]
READ_SIZE = 64 * 1024
READS_PER_WAKE = 8
PIPE_SIZE = 1024 * 1024
_F_SETPIPE_SZ = 1031
OutputSink = Callable[[Stream, bytes], bool]  # False: stop reading until told there is room


class OutputPipes:
    """stdout and stderr of a shell, read at all times: into the sink (the run in progress) or,
    with no sink, into a bounded buffer of what arrived between runs."""

    __slots__ = (
        "_between",
        "_between_dropped",
        "_between_size",
        "_fds",
        "_limit",
        "_loop",
        "_paused",
        "_session_id",
        "sink",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, between_runs_bytes: int, session_id: str) -> None:
        self._loop = loop
        self._limit = between_runs_bytes
        self._session_id = session_id
        self._fds: dict[int, Stream] = {}
        self._paused: set[int] = set()
        self.sink: OutputSink | None = None
        self._between: collections.deque[tuple[Stream, bytes]] = collections.deque()
        self._between_size = 0
        self._between_dropped = 0

    def open(self) -> tuple[int, int]:
        """Make both pipes; returns their write ends, for the shell (the caller closes them)."""
        writers = []
        streams: tuple[Stream, Stream] = ("stdout", "stderr")
        for stream in streams:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            # Only our end is non-blocking: the shell's programs must block on a full pipe.
            os.set_blocking(read_end, False)
            try:
                fcntl.fcntl(read_end, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # a smaller pipe is slower, not wrong
            self._fds[read_end] = stream
            writers.append(write_end)
        return writers[0], writers[1]

    def watch(self) -> None:
        for fd in self._fds:
            self._loop.add_reader(fd, self._on_readable, fd)

    def _on_readable(self, fd: int) -> None:
        # Up to READS_PER_WAKE chunks while the pipe stays full: one turn of the event loop per
        # chunk is what a fast writer would otherwise cost.
        stream = self._fds[fd]
        for _ in range(READS_PER_WAKE):
            data = _read(fd, READ_SIZE)
            if not data:
                if data is not None:  # EOF: every writer is gone, and an EOF is always 'readable'
                    self._forget(fd)
                return
            if self.sink is None:
                self._keep_between_runs(stream, data)
            elif not self.sink(stream, data):
                self._pause()
                return
            if len(data) < READ_SIZE:
                return

    def _pause(self) -> None:
        for fd in self._fds:
            if fd not in self._paused:
                self._loop.remove_reader(fd)
                self._paused.add(fd)

    def resume(self) -> None:
        for fd in list(self._paused):
            self._paused.discard(fd)
            self._loop.add_reader(fd, self._on_readable, fd)

    def _forget(self, fd: int) -> None:
        if fd not in self._paused:
            self._loop.remove_reader(fd)
        self._paused.discard(fd)
        del self._fds[fd]
        os.close(fd)

    def drain_now(self) -> list[tuple[Stream, bytes]]:
        """What the pipes hold now: no more, since a background job may write forever."""
        chunks: list[tuple[Stream, bytes]] = []
        for fd, stream in list(self._fds.items()):
            pending = _pending_bytes(fd)
            while pending > 0:
                data = _read(fd, min(pending, READ_SIZE))
                if not data:
                    break
                pending -= len(data)
                chunks.append((stream, data))
        return chunks

    def _keep_between_runs(self, stream: Stream, data: bytes) -> None:
        self._between.append((stream, data))
        self._between_size += len(data)
        while self._between_size > self._limit:
            oldest_stream, oldest = self._between.popleft()
            excess = self._between_size - self._limit
            if len(oldest) > excess:
                self._between.appendleft((oldest_stream, oldest[excess:]))
                self._between_size -= excess
                self._between_dropped += excess
            else:
                self._between_size -= len(oldest)
                self._between_dropped += len(oldest)

    def take_between_runs(self) -> list[tuple[Stream, bytes, int]]:
        """What arrived between runs, each chunk with the bytes dropped before it (first only)."""
        chunks = []
        for stream, data in self._between:
            chunks.append((stream, data, self._between_dropped))
            self._between_dropped = 0
        self._between.clear()
        self._between_size = 0
        return chunks

    def close(self) -> None:
        for fd in list(self._fds):
            self._forget(fd)
        self._between.clear()
        self.sink = None


@dataclass(frozen=True)
class Status:
    seq: str
    exit_code: int
    flags: str
    cwd: str
    err_trap: bool

    @classmethod
    def parse(cls, fields: list[bytes]) -> Status:
        """`trap -p ERR` output (under `set -x`, the trace of the wrapper's first lines comes
        before it), then SEQ, STATUS, FLAGS, PWD: one write when there is no ERR trap."""
        lead, seq, code, flags, cwd = fields
        # In POSIX mode a shell with no ERR trap prints `trap -- - ERR`.
        err_trap = any(line.startswith(b"trap -- ") and line != b"trap -- - ERR" for line in lead.splitlines())
        return cls(seq.decode(), int(code), flags.decode(), cwd.decode(errors="surrogateescape"), err_trap)


class StatusChannel:
    """The FIFO the wrapper reports on: NUL-terminated fields, five to a record (see bootstrap.sh).
    Parsed in one pass over what arrives, so junk written into it costs linear time."""

    FIELDS = 5
    MAX_FIELD = 64 * 1024  # a trap text and a trace fit; a longer field is junk

    __slots__ = ("_fields", "_invalid", "_on_again", "_on_flood", "_on_status", "_partial", "_session_id", "fd")

    def __init__(
        self,
        fd: int,
        on_status: Callable[[Status], None],
        on_again: Callable[[str], None],
        on_flood: Callable[[], None],
        session_id: str,
    ) -> None:
        self.fd = fd
        self._on_status = on_status
        self._on_again = on_again
        self._on_flood = on_flood
        self._session_id = session_id
        self._partial = bytearray()
        self._fields: list[bytes] = []
        self._invalid = 0

    def read_available(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, OSError):
                return
            if not data:
                return
            self._feed(data)
            if len(data) < 65536:
                return

    def _feed(self, data: bytes) -> None:
        *complete, rest = data.split(b"\0")
        if complete and self._partial:
            complete[0] = bytes(self._partial) + complete[0]
            self._partial.clear()
        self._partial += rest
        if len(self._partial) > self.MAX_FIELD:
            self._partial.clear()
            self._on_flood()
        if not complete:
            return
        fields = self._fields + complete if self._fields else complete
        whole = len(fields) - len(fields) % self.FIELDS
        for i in range(0, whole, self.FIELDS):
            self._record(fields[i : i + self.FIELDS])
        self._fields = fields[whole:]

    def _record(self, fields: list[bytes]) -> None:
        if fields[2] == b"again":
            self._on_again(fields[1].decode(errors="replace"))
            return
        try:
            status = Status.parse(fields)
        except ValueError:
            # Only the wrapper writes here; a garbled record must not stop the event loop, nor a
            # flood of them the log (the first and every 1000th are logged).
            if self._invalid % 1000 == 0:
                log.error("status_record_invalid", session_id=self._session_id, record=fields, seen=self._invalid + 1)
            self._invalid += 1
            return
        self._on_status(status)


class StdinStream:
    """A run's streamed stdin: a FIFO the shell opens for the code, fed by writes until `eof`.

    The daemon holds the FIFO read-write from the start, so the shell's open never blocks and data
    written before it is kept; at eof or an interrupt the daemon lets go of it only once the shell
    has opened it (its fd 0 is the FIFO), or the shell's open would wait forever for a writer.
    """

    CHECK_S = 0.002

    def __init__(
        self, loop: asyncio.AbstractEventLoop, path: str, shell_pid: int, owner: identity.Owner | None = None
    ) -> None:
        self._loop = loop
        self._path = path
        self._shell_pid = shell_pid
        os.mkfifo(path, 0o600)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        if owner is not None:
            owner.give(self._fd)
        self._inode = os.fstat(self._fd).st_ino
        self.closed = False  # no more data may be written (eof, interrupt, end of the run)
        self._lock = asyncio.Lock()
        self._check: asyncio.TimerHandle | None = None

    async def write(self, data: bytes) -> int:
        """Write all of `data`, waiting while the pipe is full; returns the bytes written, fewer
        when the stream was closed meanwhile."""
        written = 0
        async with self._lock:
            view = memoryview(data)
            while written < len(data):
                if self.closed or self._fd is None:
                    break
                try:
                    written += os.write(self._fd, view[written:])
                except BlockingIOError:
                    await self._writable()
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EBADF):
                        break
                    raise
        return written

    async def _writable(self) -> None:
        fd = self._fd
        if fd is None:
            return
        ready: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(fd, _resolve, ready)
        try:
            # Wake up now and then: the stream may be closed while the pipe stays full.
            await asyncio.wait_for(asyncio.shield(ready), 0.05)
        except TimeoutError:
            pass
        finally:
            if self._fd == fd:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        """EOF for the code, once the shell has the FIFO open."""
        self.closed = True
        self._close_when_opened()

    def _close_when_opened(self) -> None:
        self._check = None
        if self._fd is None:
            return
        try:
            opened = os.stat(f"/proc/{self._shell_pid}/fd/0").st_ino == self._inode
        except OSError:
            opened = True  # the shell is gone: nobody will open it
        if opened:
            self.release()
        else:
            self._check = self._loop.call_later(self.CHECK_S, self._close_when_opened)

    def release(self) -> None:
        """The run has ended: let go of everything."""
        self.closed = True
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._fd is not None:
            self._loop.remove_writer(self._fd)
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
