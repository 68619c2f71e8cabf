"""The one owner of a run's wire format: SSE framing, event JSON, text chunks, the gap event.

Each event is `id: SEQ`, `event: TYPE` and one `data:` line of JSON that repeats type, seq, run_id
and timestamp. Output text never splits a UTF-8 character (invalid bytes become U+FFFD) and is
counted against the run's output limit as encoded. A run's events are encoded once, when they
happen, and kept in its log as frames; every reader sends the same bytes. No HTTP here.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from typing import Any

PING = b": ping\n\n"
TERMINAL_EVENTS = frozenset({"execution_complete", "error"})
# Printable ASCII except the two characters JSON escapes: such text goes out as it is.
_JSON_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# Made once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """JSON text that is always valid UTF-8: a lone surrogate (a path's undecodable byte) is U+FFFD."""
    text = _ENCODER.encode(value)
    if text.isascii():
        return text
    return _LONE_SURROGATE.sub("\ufffd", text)


def json_string(text: str) -> bytes:
    """A JSON string literal of text known to be valid Unicode (decoded output, ids, keys)."""
    return _ENCODER.encode(text).encode()


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

    __slots__ = ("_decoder", "_pending")

    def __init__(self) -> None:
        self._decoder: codecs.IncrementalDecoder | None = None  # made for the first non-ASCII byte
        self._pending = False  # the decoder holds the start of a character

    @property
    def holds_partial_character(self) -> bool:
        return self._pending

    def feed(self, data: bytes, final: bool = False) -> bytes | str:
        """ASCII comes back as bytes (the fast path), anything else as decoded text."""
        if not self._pending and data.isascii() and not final:
            return data
        if self._decoder is None:
            self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = self._decoder.decode(data, final)
        self._pending = bool(self._decoder.getstate()[0])
        return text


_BOOL = {True: b"true", False: b"false"}
Frame = tuple[bytes, ...]  # one event's bytes, in parts: a big output chunk is copied only when sent


def frame_size(frame: Frame) -> int:
    return sum(len(part) for part in frame)


def gap_frame(run_id: str, after: int, next_seq: int, dropped_bytes: int) -> bytes:
    """Events were dropped from the log between `after` and `next_seq`: no `id:` line, so a
    browser's Last-Event-ID stays at the last event it really got."""
    data = dumps(
        {"type": "gap", "run_id": run_id, "after": after, "next_seq": next_seq, "dropped_bytes": dropped_bytes}
    )
    return b"event: gap\ndata: %s\n\n" % data.encode()


class EventEncoder:
    """Encodes one run's events as frames: seq numbering, text chunks, the output limit."""

    __slots__ = ("_budget", "_chunkers", "_head", "_run_id", "next_seq", "output_truncated", "run_id")

    def __init__(self, run_id: str, max_output_bytes: int) -> None:
        self.run_id = run_id
        self.next_seq = 0
        self._run_id = json_string(run_id)[1:-1]
        self._head = b',"run_id":"%s"' % self._run_id
        self._budget = max_output_bytes
        self.output_truncated = False
        self._chunkers: dict[str, TextChunker] = {}  # made for a stream's first output

    def _chunker(self, stream: str) -> TextChunker:
        chunker = self._chunkers.get(stream)
        if chunker is None:
            chunker = self._chunkers[stream] = TextChunker()
        return chunker

    def _event_start(self, event: str) -> bytes:
        """An event's frame up to the end of its common fields: `id`, `event`, and the `data`
        JSON object's type, seq, run_id and timestamp; the event's own fields, `}` and the blank
        line that ends the frame follow."""
        seq = self.next_seq
        self.next_seq += 1
        kind = event.encode()
        return b'id: %d\nevent: %s\ndata: {"type":"%s","seq":%d%s,"timestamp":%d' % (
            seq,
            kind,
            kind,
            seq,
            self._head,
            int(time.time() * 1000),
        )

    def event(self, event: str, **fields: Any) -> Frame:
        return (self._event_start(event) + _fields_json(fields) + b"}\n\n",)

    # The two events every run has, formatted directly: the same bytes as `event`, without a
    # JSON encoder's pass over a dict on every run.

    def init(self, session_id: str) -> Frame:
        """`init`: ids are hex or ^[A-Za-z0-9._-]+$, nothing in them needs escaping."""
        return (
            self._event_start("init") + b',"session_id":"%s","text":"%s"}\n\n' % (session_id.encode(), self._run_id),
        )

    def complete(
        self, exit_code: int, execution_time: int, interrupted: bool, timed_out: bool, cwd: str, shell_exited: bool
    ) -> Frame:
        """`execution_complete`, with what the encoder knows (output_truncated) filled in."""
        return (
            self._event_start("execution_complete")
            + b',"exit_code":%d,"execution_time":%d,"interrupted":%s,"timed_out":%s,"output_truncated":%s,'
            b'"cwd":%s,"shell_exited":%s}\n\n'
            % (
                exit_code,
                execution_time,
                _BOOL[interrupted],
                _BOOL[timed_out],
                _BOOL[self.output_truncated],
                dumps(cwd).encode(),
                _BOOL[shell_exited],
            ),
        )

    def output(
        self, stream: str, data: bytes, *, final: bool = False, between_runs: bool = False, **fields: Any
    ) -> Frame | None:
        """A chunk of output as a `stdout`/`stderr` frame, within what the output limit leaves
        (None when nothing of it is sent). Output from between runs is whole and not counted."""
        chunk = self._chunker(stream).feed(data, final)
        if not chunk:
            return None
        if between_runs:
            fields = {"between_runs": True, **fields}
            text: bytes | None = _escaped(chunk)
        else:
            text = self._limit(chunk)
        if text is None:
            return None
        return (self._event_start(stream) + b',"text":"', text, b'"%s}\n\n' % _fields_json(fields))

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

    def flush_text(self) -> list[Frame]:
        """At the end of a run: what an incomplete UTF-8 sequence left behind becomes U+FFFD."""
        frames = []
        for stream, chunker in self._chunkers.items():
            if chunker.holds_partial_character:
                frame = self.output(stream, b"", final=True)
                if frame is not None:
                    frames.append(frame)
        return frames
