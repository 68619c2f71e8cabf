"""structlog set-up: one event per line, console in a terminal, JSON with EXECD_LOG_FORMAT=json.

Logs of the standard library's loggers (asyncio, aiohttp) and of the event loop's exception
handler go through the same renderer, so a JSON log stays JSON; a storm of identical loop errors
(a full fd table makes every accept fail) is logged once a second with a count.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import structlog

_REPEAT_S = 1.0


def configure(log_format: str = "auto", level: str = "info") -> None:
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),  # print() costs ~6 us more a line
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(StdlibRepeats())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[structlog.stdlib.add_log_level, stamp, structlog.processors.format_exc_info],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.getLevelName(level.upper()), logging.WARNING))


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]


class RateLimit:
    """One log line per kind of event per second: `allow` says whether this one may be logged,
    and how many of its kind were folded since the last that was."""

    def __init__(self, interval_s: float = _REPEAT_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._folded: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) < self.interval_s:
            self._folded[kind] = self._folded.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._folded.pop(kind, 0)


class LoopErrors:
    """The event loop's exception handler, rate-limited."""

    def __init__(self) -> None:
        self._log = get_logger("execd.loop")
        self._limit = RateLimit()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        exc = context.get("exception")
        folded = self._limit.allow(f"{message}:{type(exc).__name__}:{getattr(exc, 'errno', '')}")
        if folded is not None:
            self._log.error("event_loop_error", message=message, repeated_since_last=folded, exc_info=exc)


_CLIENTS_FAULTS = frozenset({"RequestPayloadError"})


class StdlibRepeats(logging.Filter):
    """The same for the standard library's loggers (aiohttp logs a traceback for each body that
    does not decode: any client could fill the log with them)."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = RateLimit()

    def filter(self, record: logging.LogRecord) -> bool:
        exc_type = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        if exc_type in _CLIENTS_FAULTS:
            # A body the client sent that does not decode: its answer was a 400; a line, no traceback.
            record.msg = f"{record.msg}: {record.exc_info[1] if record.exc_info else ''}"
            record.exc_info, record.exc_text, record.levelno, record.levelname = None, None, logging.INFO, "INFO"
        folded = self._limit.allow(f"{record.name}:{record.msg}:{exc_type}")
        if folded:
            record.msg = f"{record.msg} (and {folded} more like it since the last line)"
        return folded is not None
