"""The one owner of the run stream's wire format: SSE framing, event JSON, text chunks, pings.

Each event is `id: SEQ`, `event: TYPE` and one `data:` line of JSON that repeats type, seq, run_id
and timestamp. Output text never splits a UTF-8 character (invalid bytes become U+FFFD) and is
counted against the run's output limit as sent.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import re
import time
from typing import Any, Protocol

PING = b": ping\n\n"
TERMINAL_EVENTS = frozenset({"execution_complete", "error"})
# Printable ASCII except the two characters JSON escapes: such text goes out as it is.
_JSON_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


class Writer(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def write_eof(self, data: bytes = b"") -> None: ...


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def dumps(value: Any) -> str:
    """JSON text that is always valid UTF-8: a lone surrogate (a path's undecodable byte) is U+FFFD."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if text.isascii():
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def json_string(text: str) -> bytes:
    """A JSON string literal of text known to be valid Unicode (decoded output, ids, keys)."""
    return json.dumps(text, ensure_ascii=False).encode()


def escape_ascii(data: bytes) -> bytes:
    """What goes between the quotes of a JSON string of ASCII bytes: the bytes themselves when they
    need no escape (no copy: output is often megabytes), else bytes.replace or json.dumps."""
    special = data.translate(None, _JSON_PLAIN)
    if not special:
        return data
    # Only newlines and tabs to escape, and not too many of them (replace pays per occurrence).
    if len(special) < len(data) >> 5 and not special.translate(None, b"\n\t"):
        return data.replace(b"\n", b"\\n").replace(b"\t", b"\\t")
    return json_string(data.decode("ascii"))[1:-1]


def _fields_json(fields: dict[str, Any]) -> bytes:
    """An event's own fields, to follow its common ones: one dumps of them, `{"a":1}` -> `,"a":1`."""
    return b"," + dumps(fields).encode()[1:-1] if fields else b""


def _escaped(chunk: bytes | str) -> bytes:
    """What goes between the quotes of a JSON string of a TextChunker chunk (bytes are ASCII)."""
    return escape_ascii(chunk) if isinstance(chunk, bytes) else json_string(chunk)[1:-1]


class TextChunker:
    """Turns one stream's bytes into text chunks that never split a UTF-8 character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = False  # the decoder holds the start of a character

    @property
    def holds_partial_character(self) -> bool:
        return self._pending

    def feed(self, data: bytes, final: bool = False) -> bytes | str:
        """ASCII comes back as bytes (the fast path), anything else as decoded text."""
        if not self._pending and data.isascii() and not final:
            return data
        text = self._decoder.decode(data, final)
        self._pending = bool(self._decoder.getstate()[0])
        return text


FLUSH_BYTES = 64 * 1024
# Output that never pauses long enough for a quiet flush still goes out this often: live, not
# held until 64 KiB have piled up.
FLUSH_DELAY_S = 0.005


class RunStream:
    """Writes one run's events: seq numbering, the output limit, pings while quiet.

    Events are batched: they go out when 64 KiB are waiting, when the oldest has waited 5 ms, when
    the caller says the run has gone quiet (`flush`), and at the end, so a short run costs one
    write instead of three.
    """

    def __init__(self, writer: Writer, run_id: str, max_output_bytes: int, ping_s: float) -> None:
        self._writer = writer
        self.run_id = run_id
        self._seq = 0
        self._head = b',"run_id":%s' % json_string(run_id)
        self._budget = max_output_bytes
        self.output_truncated = False
        self.terminal_sent = False
        self._chunkers = {"stdout": TextChunker(), "stderr": TextChunker()}
        self._ping_s = ping_s
        self._last_write = time.monotonic()
        self._pinger: asyncio.Task[None] | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._pending_since = 0.0  # when the oldest batched event was written

    # ----- pings -----------------------------------------------------------------------------

    # A timer, not a task per run: most runs end long before their first ping is due.

    def start_pings(self) -> None:
        if self._ping_s > 0:
            self._arm_ping(self._ping_s)

    def stop_pings(self) -> None:
        if self._ping_timer:
            self._ping_timer.cancel()
            self._ping_timer = None
        if self._pinger:
            self._pinger.cancel()
            self._pinger = None

    def _arm_ping(self, delay: float) -> None:
        self._ping_timer = asyncio.get_running_loop().call_later(delay, self._on_ping_timer)

    def _on_ping_timer(self) -> None:
        quiet_for = time.monotonic() - self._last_write
        if quiet_for < self._ping_s:
            self._arm_ping(self._ping_s - quiet_for)
            return
        self._pinger = asyncio.get_running_loop().create_task(self._ping())
        self._arm_ping(self._ping_s)

    async def _ping(self) -> None:
        # A client gone mid-ping is the handler's to notice (it is cancelled); nothing to report here.
        with contextlib.suppress(ConnectionError):
            await self._write(PING)
            await self.flush()

    # ----- events ----------------------------------------------------------------------------

    async def _write(self, *parts: bytes) -> None:
        """Batch one event, in parts: a big output chunk is copied once, when the batch is joined."""
        now = time.monotonic()
        if not self._pending:
            self._pending_since = now
        self._last_write = now
        for part in parts:
            self._pending.append(part)
            self._pending_size += len(part)
        if self._pending_size >= FLUSH_BYTES or now - self._pending_since >= FLUSH_DELAY_S:
            await self.flush()

    def _take_pending(self) -> bytes:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        return data

    async def flush(self) -> None:
        """Send what is batched. Awaiting the write is the backpressure: a slow client slows us."""
        if self._pending:
            await self._writer.write(self._take_pending())

    async def close(self) -> None:
        """Send what is left and end the response, in one write."""
        self.stop_pings()
        await self._writer.write_eof(self._take_pending())

    def _event_start(self, event: str) -> bytes:
        """An event's frame up to the end of its common fields: `id`, `event`, and the `data`
        JSON object's type, seq, run_id and timestamp; the event's own fields, `}` and the blank
        line that ends the frame follow."""
        seq = self._seq
        self._seq += 1
        kind = event.encode()
        return b'id: %d\nevent: %s\ndata: {"type":"%s","seq":%d%s,"timestamp":%d' % (
            seq,
            kind,
            kind,
            seq,
            self._head,
            int(time.time() * 1000),
        )

    async def send(self, event: str, **fields: Any) -> None:
        await self._write(self._event_start(event) + _fields_json(fields) + b"}\n\n")
        if event in TERMINAL_EVENTS:
            self.terminal_sent = True

    async def send_output(
        self, stream: str, data: bytes, *, final: bool = False, between_runs: bool = False, **fields: Any
    ) -> None:
        """Send a chunk of output as `stdout`/`stderr`, within what the output limit leaves.

        Output that arrived between runs is sent whole and does not count toward the limit.
        """
        chunk = self._chunkers[stream].feed(data, final)
        if not chunk:
            return
        if between_runs:
            fields = {"between_runs": True, **fields}
            text: bytes | None = _escaped(chunk)
        else:
            text = self._limit(chunk)
        if text is None:
            return
        # The text stays a part of its own until the batch is joined: output chunks are big.
        await self._write(self._event_start(stream) + b',"text":"', text, b'"%s}\n\n' % _fields_json(fields))

    def _limit(self, chunk: bytes | str) -> bytes | None:
        """What may still be sent of `chunk`, cut on a character boundary, escaped for JSON."""
        raw = chunk if isinstance(chunk, bytes) else chunk.encode()
        if len(raw) > self._budget:
            self.output_truncated = True
            cut = raw[: self._budget]
            chunk = cut if isinstance(chunk, bytes) else cut.decode("utf-8", "ignore")
            # What is sent stays a prefix of the output: nothing after the cut, even if it would fit.
            self._budget = 0
        else:
            self._budget -= len(raw)
        return _escaped(chunk) if chunk else None

    async def flush_text(self) -> None:
        """At the end of a run: what an incomplete UTF-8 sequence left behind becomes U+FFFD."""
        for stream, chunker in self._chunkers.items():
            if chunker.holds_partial_character:
                await self.send_output(stream, b"", final=True)
