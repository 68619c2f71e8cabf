"""A run's event log: its SSE frames by seq, a bounded window of them, and readers as cursors.

The engine appends; readers (HTTP streams) read after their cursor and wait for more. `init` and
the terminal event are never dropped. A log whose run belongs to its readers keeps every event an
attached reader has not been sent, and tells the engine to stop reading the run's pipes while the
slowest reader is a window behind (backpressure); otherwise the oldest events are dropped and
counted. Cumulative offsets per seq make any gap's size exact without keeping the dropped events.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from array import array
from collections.abc import Callable
from typing import NamedTuple

from execd.sse import Frame, frame_size, gap_frame

NO_CURSOR = -1  # a reader that wants everything, init included
UNREAD_LIMIT = 256 * 1024
# A run may emit events for days: offsets are exact for its newest OFFSETS_EXACT events (and any
# attached reader's), and kept for every COARSE_STEP-th seq before them (1 MiB per 8M events).
OFFSETS_EXACT = 1 << 17
RETIRED_EXACT = 1024  # an older run's log: exact for its last 1,024 events only
COARSE_STEP = 64


class Slice(NamedTuple):
    """What a reader gets after its cursor: frames up to `last_seq`, with a `gap` event where
    events were dropped."""

    frames: list[Frame]
    last_seq: int


class Reader:
    """A cursor on a log: the seq of the last event sent to its client."""

    __slots__ = ("cursor", "log")

    def __init__(self, log: RunLog, cursor: int) -> None:
        self.log = log
        self.cursor = cursor

    def sent(self, last_seq: int) -> None:
        self.log.advance(self, last_seq)

    def detach(self) -> None:
        self.log.detach(self)


class RunLog:
    __slots__ = (
        "_base",
        "_coarse",
        "_first_kept",
        "_frames",
        "_init",
        "_next_seq",
        "_offsets",
        "_paused",
        "_retired",
        "_size",
        "_terminal",
        "_unread_limit",
        "_waiters",
        "dropped_bytes",
        "keep_unsent",
        "on_readers_changed",
        "on_room",
        "readers",
        "run_id",
        "sent_upto",
        "window_bytes",
    )

    def __init__(self, run_id: str, window_bytes: int, keep_unsent: bool) -> None:
        self.run_id = run_id
        self.window_bytes = window_bytes
        # How far the slowest reader may fall behind before the engine stops reading: less than a
        # window, so a stalled client holds little memory (the pipe holds the rest).
        self._unread_limit = min(window_bytes, UNREAD_LIMIT)
        self.keep_unsent = keep_unsent  # the run belongs to its readers: backpressure, no drops
        self.on_room: Callable[[], None] | None = None  # readers caught up after a pause
        self.on_readers_changed: Callable[[int], None] | None = None
        self.readers: set[Reader] = set()
        self.dropped_bytes = 0  # wire bytes dropped before any reader was sent them
        self.sent_upto = NO_CURSOR  # the furthest seq any reader was sent
        self._init: Frame | None = None
        self._terminal: Frame | None = None
        self._frames: collections.deque[Frame] = collections.deque()  # seq first_kept.. in order
        self._first_kept = 1
        self._next_seq = 0
        self._offsets = array("q", [0])  # wire bytes of every event before seq _base + i
        self._base = 0
        self._coarse = array("q")  # the same at seq k * COARSE_STEP, for seqs before _base
        self._size = 0  # bytes of the kept frames between init and the terminal event
        self._paused = False  # the engine stopped reading for want of room
        self._retired = False
        self._waiters: set[asyncio.Future[bool]] = set()

    # ----- the engine's side -----------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    @property
    def finished(self) -> bool:
        return self._terminal is not None

    def append(self, frame: Frame) -> None:
        self._record(frame)
        if self._init is None:
            self._init = frame
            self._first_kept = self._next_seq
        else:
            self._frames.append(frame)
            self._size += self._offsets[-1] - self._offsets[-2]
            if self._size > self.window_bytes:
                self._trim()
        self._wake()

    def finish(self, frame: Frame) -> None:
        """The terminal event: never dropped, and the last one."""
        self._record(frame)
        self._terminal = frame
        self._wake()

    def _record(self, frame: Frame) -> None:
        self._next_seq += 1
        self._offsets.append(self._offsets[-1] + frame_size(frame))
        if len(self._offsets) > 2 * OFFSETS_EXACT:
            self._compact()

    def _offset(self, seq: int) -> int:
        """Wire bytes of every event before `seq`; before the exact range, those before the next
        checkpoint (a gap from so old a cursor undercounts by at most COARSE_STEP - 1 events)."""
        if seq >= self._base:
            return self._offsets[seq - self._base]
        if seq <= 1:  # before and after init: a full replay's gap is always exact
            return frame_size(self._init) if seq == 1 and self._init is not None else 0
        checkpoint = -(-seq // COARSE_STEP)
        return self._coarse[checkpoint] if checkpoint < len(self._coarse) else self._offsets[0]

    def _compact(self, exact: int = OFFSETS_EXACT) -> None:
        keep_from = min(self._next_seq - exact, self._first_kept)
        if self.readers:
            keep_from = min(keep_from, min(reader.cursor for reader in self.readers) + 1)
        if keep_from <= self._base:
            return
        first = -(-self._base // COARSE_STEP) * COARSE_STEP
        self._coarse.extend(self._offsets[seq - self._base] for seq in range(first, keep_from, COARSE_STEP))
        del self._offsets[: keep_from - self._base]
        self._base = keep_from

    def has_room(self) -> bool:
        """Whether the engine may read more of the run's output now (always, unless the run belongs
        to its readers and the slowest of them is a window behind)."""
        if not self.keep_unsent:
            return True
        room = self._unread() < self._unread_limit
        self._paused = not room
        return room

    def _unread(self) -> int:
        return self._offsets[-1] - self._offset(self._protected_from() + 1)

    def _protected_from(self) -> int:
        """Events after this seq are kept for readers: the slowest attached one, else the furthest
        any reader got (so a client that comes back within its grace misses nothing)."""
        if self.readers:
            return min(reader.cursor for reader in self.readers)
        return self.last_seq if self._retired else self.sent_upto

    def _trim(self) -> None:
        keep_after = self._protected_from() if self.keep_unsent else None
        while self._size > self.window_bytes and self._frames:
            seq = self._first_kept
            if keep_after is not None and seq > keep_after:
                return
            self._frames.popleft()
            size = self._offset(seq + 1) - self._offset(seq)
            self._size -= size
            self._first_kept += 1
            if seq > self.sent_upto:
                self.dropped_bytes += size

    def retire(self) -> None:
        """A newer run started: keep init and the terminal event, and what attached readers have
        not read yet."""
        self.window_bytes = 0
        self.keep_unsent = True
        self._retired = True
        self._trim()
        if len(self._offsets) > RETIRED_EXACT:
            self._compact(RETIRED_EXACT)

    # ----- the readers' side -----------------------------------------------------------------

    def attach(self, cursor: int) -> Reader:
        reader = Reader(self, cursor)
        self.readers.add(reader)
        self._readers_changed()
        return reader

    def detach(self, reader: Reader) -> None:
        if reader in self.readers:
            self.readers.discard(reader)
            self._readers_changed()
            self._check_room()

    def _readers_changed(self) -> None:
        if self.on_readers_changed is not None:
            self.on_readers_changed(len(self.readers))

    def advance(self, reader: Reader, last_seq: int) -> None:
        reader.cursor = last_seq
        if last_seq > self.sent_upto:
            self.sent_upto = last_seq
        if self.keep_unsent and self._size > self.window_bytes:
            self._trim()
        self._check_room()

    def _check_room(self) -> None:
        # Resume at half a window, not at the first free byte: fewer pause/resume turns.
        if self._paused and self._unread() <= self._unread_limit // 2:
            self._paused = False
            if self.on_room is not None:
                self.on_room()

    def after(self, cursor: int) -> Slice:
        """The kept events after `cursor`, with a gap first where events were dropped."""
        frames: list[Frame] = []
        if cursor < 0 and self._init is not None:
            frames.append(self._init)
            cursor = 0
        terminal_seq = self._next_seq - 1 if self._terminal is not None else None
        next_kept = self._first_kept if self._frames or terminal_seq is None else terminal_seq
        if cursor + 1 < next_kept and cursor < self.last_seq:
            dropped = self._offset(next_kept) - self._offset(cursor + 1)
            frames.append((gap_frame(self.run_id, cursor, next_kept, dropped),))
            cursor = next_kept - 1
        start = cursor + 1 - self._first_kept
        if 0 <= start < len(self._frames):
            frames.extend(itertools.islice(self._frames, start, None))
        if self._terminal is not None and cursor < terminal_seq:  # type: ignore[operator]
            frames.append(self._terminal)
        return Slice(frames, self.last_seq)

    async def wait(self, cursor: int, timeout: float | None) -> bool:
        """Until there is an event after `cursor` (True) or `timeout` passes (False)."""
        if self.last_seq > cursor:
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.add(waiter)
        timer = loop.call_later(timeout, _resolve, waiter, False) if timeout is not None else None
        try:
            return await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            _resolve(waiter, True)


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)
