"""`execd run` and `execd attach`: a run's events written to the terminal as they arrive, and
Ctrl-C turned into interrupts of the run.

The client resumes a cut stream by itself (each event once), so nothing here deals with the
network: a run's stdout goes to our stdout and its stderr to our stderr, byte for byte and flushed
per event, and the exit status is the run's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, BinaryIO

import aiohttp

from execd.cli_client import FAILED, INTERRUPTED, fail
from execd.client import AsyncClient, AsyncSession, Event, ExecdError, NoActiveRun, SessionEnded, SessionNotFound

# Ctrl-C and its kin: a process manager's SIGTERM, a closed terminal's SIGHUP. Each is a "press".
PRESSES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ESCALATION = ("SIGINT", "SIGKILL")  # what the first and second press send to the run
CLOSE_WAIT_S = 10.0  # closing our own session at the end; past it the daemon is not answering


async def run(client: AsyncClient, args: argparse.Namespace) -> int:
    """Run `args.code` in a session (a new one unless --session), closed at the end if it is ours."""
    # Chosen here, not by the daemon: a Ctrl-C that comes before the run's first event still knows
    # which run to interrupt, and never interrupts someone else's.
    run_id = f"cli-{secrets.token_hex(8)}"
    out = Output(args.json)
    with Keys(run_id) as keys:
        owned = args.session is None
        session = await client.create_session() if owned else client.session(args.session)
        keys.session = session
        try:
            events = session.stream(args.code, timeout_ms=args.timeout_ms, cwd=args.cwd, run_id=run_id)
            finished = await follow(events, out, keys)
        finally:
            if owned:
                await _close_quietly(session)
    if not finished:
        note(f"stopped waiting for run {run_id}", always=True)
        return INTERRUPTED
    return out.finish(session.id, run_id)


async def attach(client: AsyncClient, args: argparse.Namespace) -> int:
    """Follow an existing run to its end. Ctrl-C detaches: the run is left alone."""
    session = client.session(args.session)
    out = Output(args.json)
    with Keys(None) as keys:
        finished = await follow(session.attach(args.run, after=args.after), out, keys)
    if not finished:
        cursor = out.last_seq if out.last_seq is not None else args.after
        resume = f" --after {cursor}" if cursor is not None else ""
        note(f"detached; the run goes on: execd attach {session.id} {args.run}{resume}", always=True)
        return INTERRUPTED
    if out.outcome is None:
        # The cursor was the run's last event (the daemon answers 204): its outcome is in its object.
        out.outcome_of(await session.get_run(args.run))
    return out.finish(session.id, args.run)


async def follow(events: AsyncIterator[Event], out: Output, keys: Keys) -> bool:
    """Write the events until the terminal one; False when the user stopped waiting first."""
    pump = asyncio.ensure_future(_pump(events, out, keys))
    keys.pump = pump
    try:
        await asyncio.wait({pump})
    finally:
        keys.pump = None
        pump.cancel()  # a no-op once it is done; stops it when we are cancelled ourselves
    if pump.cancelled():
        return False
    pump.result()  # its error, if it had one
    return True


async def _pump(events: AsyncIterator[Event], out: Output, keys: Keys) -> None:
    async for event in events:
        if event.type == "init":
            keys.started.set()
        out.write(event)


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await asyncio.wait_for(session.close(), CLOSE_WAIT_S)
    except (ExecdError, aiohttp.ClientError, TimeoutError) as exc:
        note(f"could not close session {session.id}: {exc}", always=True)


class Keys:
    """Ctrl-C while a run streams. With a `run_id` (execd run) the first press interrupts the run
    with SIGINT, the second with SIGKILL, and the run's end then ends the command; a third stops
    waiting. Without one (execd attach) a press stops waiting and leaves the run alone.

    The signal handler only counts presses; one task sends the interrupts, in order, once the
    run has started (the daemon refuses an interrupt of a run that has not).
    """

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.session: AsyncSession | None = None
        self.pump: asyncio.Future[None] | None = None
        self.started = asyncio.Event()
        self.presses = 0
        self._signals: asyncio.Queue[str] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()  # given up on by a last press while no stream is open yet

    def __enter__(self) -> Keys:
        for signum in PRESSES:
            self._loop.add_signal_handler(signum, self._press)
        if self.run_id is not None:
            self._sender = self._loop.create_task(self._send())
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum in PRESSES:
            self._loop.remove_signal_handler(signum)
        if self._sender is not None:
            self._sender.cancel()

    def _press(self) -> None:
        self.presses += 1
        if self.run_id is not None and self.presses <= len(ESCALATION):
            self._signals.put_nowait(ESCALATION[self.presses - 1])
        elif self.pump is not None:
            self.pump.cancel()
        elif self._main is not None:
            self._main.cancel()

    async def _send(self) -> None:
        while True:
            name = await self._signals.get()
            await self.started.wait()
            assert self.session is not None  # set before the run starts
            try:
                await self.session.interrupt(name, run_id=self.run_id)
            except (NoActiveRun, SessionEnded, SessionNotFound):
                pass  # it ended (or its session did) meanwhile: the stream says how
            except (ExecdError, aiohttp.ClientError) as exc:
                note(f"could not interrupt run {self.run_id}: {exc}", always=True)


class Output:
    """A run's events as they come: its stdout and stderr to ours, or every event as one JSON line
    (--json, then a summary line); and how the run ended."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.outcome: dict[str, Any] | None = None  # the terminal event's data
        self.last_seq: int | None = None

    def write(self, event: Event) -> None:
        if event.seq is not None:
            self.last_seq = event.seq
        if event.terminal:
            self.outcome = event.data
        if self.as_json:
            _write(sys.stdout.buffer, json.dumps(event.data, ensure_ascii=False) + "\n")
        elif event.type in ("stdout", "stderr"):
            _write(sys.stdout.buffer if event.type == "stdout" else sys.stderr.buffer, event.text)
        elif event.type == "gap":
            dropped = event.data.get("dropped_bytes", 0)
            note(f"{dropped} bytes of output were dropped from the run's log before they were read", always=True)
        elif event.type == "execution_complete":
            self._describe(event.data)
        if event.type == "error":
            fail(str(event.data.get("code")), str(event.data.get("message")))

    def outcome_of(self, run: dict[str, Any]) -> None:
        """The outcome from a run object, for a run whose terminal event was not streamed to us."""
        if run.get("error"):
            self.outcome = {"type": "error", **run["error"]}
            return
        fields = ("exit_code", "interrupted", "timed_out", "shell_exited")
        self.outcome = {"type": "execution_complete", **{k: run.get(k) for k in fields}}

    def finish(self, session_id: str, run_id: str) -> int:
        """Our exit status: the run's exit code; 1 when it ended with an error (or not at all)."""
        if self.outcome is None:
            fail("STREAM_ENDED", "the stream ended before the run did")
        end = self.outcome or {}
        completed = end.get("type") == "execution_complete"
        error = None if completed else {"code": end.get("code", "STREAM_ENDED"), "message": end.get("message")}
        if self.as_json:
            summary = {
                "type": "summary",
                "session_id": session_id,
                "run_id": run_id,
                "exit_code": end.get("exit_code"),
                "interrupted": bool(end.get("interrupted")),
                "timed_out": bool(end.get("timed_out")),
                "output_truncated": bool(end.get("output_truncated")),
                "error": error,
                "last_seq": self.last_seq,
            }
            _write(sys.stdout.buffer, json.dumps(summary, ensure_ascii=False) + "\n")
        return int(end["exit_code"]) if completed else FAILED

    def _describe(self, end: dict[str, Any]) -> None:
        # For a person at a terminal only: a script reads the exit status (or --json).
        if end.get("timed_out"):
            note(f"timed out; exit code {end.get('exit_code')}")
        elif end.get("interrupted"):
            note(f"interrupted; exit code {end.get('exit_code')}")
        if end.get("output_truncated"):
            note("output past the daemon's limit was not sent")
        if end.get("shell_exited"):
            note("the code ended the session's shell")


def _write(stream: BinaryIO, text: str) -> None:
    stream.write(text.encode("utf-8", "replace"))
    stream.flush()


def note(message: str, always: bool = False) -> None:
    """A line for a person on stderr; `always` for what a script must see too (lost output)."""
    if always or sys.stderr.isatty():
        with contextlib.suppress(OSError):
            print(f"execd: {message}", file=sys.stderr, flush=True)
