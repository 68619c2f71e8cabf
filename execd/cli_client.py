"""`execd run`, `execd sessions`, `execd attach`, `execd close`: the command line of a client.

`execd serve` imports this module for its `--help`, so only the standard library is imported at
the top: the client (and aiohttp with it) is imported when a client command runs, and the
daemon's start pays nothing for it.

Exit statuses: a run's own exit code for `run` and `attach`; 1 for an error (one line on stderr,
`execd: CODE: message`, CODE being the daemon's contract code); 2 for bad usage; 130 when Ctrl-C
ended the wait (`attach`) or gave it up (`run`, third Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from execd.client import AsyncClient

COMMANDS = {
    "run": "run code in a session, streaming its output; exits with the run's exit code",
    "sessions": "list the daemon's sessions",
    "attach": "stream a run's output (from its log, then live); exits with the run's exit code",
    "close": "close a session, killing every process it started",
}
DEFAULT_URL = "http://127.0.0.1:44772"
FAILED, USAGE, INTERRUPTED, BROKEN_PIPE = 1, 2, 130, 141


class _Parser(argparse.ArgumentParser):
    """A usage error is one line on stderr and status 2, like every other error of the client."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"execd: usage: {message} (see {self.prog} --help)\n")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="execd", description="A client of an execd daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_flags()
    run = commands.add_parser("run", parents=[common], help=COMMANDS["run"], description=COMMANDS["run"])
    run.add_argument("--session", metavar="ID", help="run in this session (default: a new one, closed at the end)")
    run.add_argument("--timeout-ms", type=_non_negative, default=0, metavar="N", help="interrupt the run after N ms")
    run.add_argument("--cwd", metavar="DIR", help="the run's directory (relative to the session's)")
    run.add_argument("code", nargs="*", metavar="CODE", help="bash code, after `--`; read from stdin when absent")
    sessions = commands.add_parser("sessions", parents=[common], help=COMMANDS["sessions"])
    del sessions  # nothing of its own beyond the common flags
    attach = commands.add_parser("attach", parents=[common], help=COMMANDS["attach"], description=COMMANDS["attach"])
    attach.add_argument("session", metavar="SESSION")
    attach.add_argument("run", metavar="RUN")
    attach.add_argument("--after", type=_non_negative, metavar="N", help="start after the event with id N")
    close = commands.add_parser("close", parents=[common], help=COMMANDS["close"])
    close.add_argument("session", metavar="SESSION")
    return parser.parse_args(argv)


def _common_flags() -> _Parser:
    common = _Parser(add_help=False)
    url = os.environ.get("EXECD_URL") or DEFAULT_URL
    common.add_argument("--url", default=url, help=f"the daemon (default $EXECD_URL or {DEFAULT_URL})")
    # A file, never the token itself: any local user can read a command line in `ps`.
    common.add_argument(
        "--token-file",
        default=os.environ.get("EXECD_TOKEN_FILE"),
        metavar="FILE",
        help="a file holding the access token (default $EXECD_TOKEN_FILE)",
    )
    common.add_argument("--json", action="store_true", help="JSON for scripts instead of text for people")
    return common


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        token = _read_token(args.token_file)
        if args.command == "run":
            args.code = " ".join(args.code) if args.code else _code_from_stdin()
        return asyncio.run(_command(args, token))
    except _UsageError as exc:
        return fail("usage", str(exc), USAGE)
    except (KeyboardInterrupt, asyncio.CancelledError):
        return INTERRUPTED  # Ctrl-C before a run had started, or while nothing answered
    except BrokenPipeError:
        # Whoever read our output has gone (`execd run ... | head`); say nothing, as `cat` would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


class _UsageError(Exception):
    pass


def _read_token(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise _UsageError(f"the token file {path} is empty")
    return token


def _code_from_stdin() -> str:
    try:
        return sys.stdin.buffer.read().decode("utf-8")
    except UnicodeDecodeError:
        raise _UsageError("the code on stdin is not UTF-8") from None


async def _command(args: argparse.Namespace, token: str | None) -> int:
    import aiohttp

    from execd import cli_stream
    from execd.client import AsyncClient, ExecdError, Unreachable

    handlers: dict[str, Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]] = {
        "run": cli_stream.run,
        "attach": cli_stream.attach,
        "sessions": _sessions,
        "close": _close,
    }
    try:
        async with AsyncClient(args.url, token) as client:
            return await handlers[args.command](client, args)
    except ExecdError as exc:
        return fail(exc.code, exc.message)
    except aiohttp.ClientError as exc:
        return fail(Unreachable.CODE, f"{args.url}: {exc}")


def fail(code: str, message: str, status: int = FAILED) -> int:
    print(f"execd: {code}: {message}", file=sys.stderr, flush=True)
    return status


# ----- sessions and close ------------------------------------------------------------------------


async def _sessions(client: AsyncClient, args: argparse.Namespace) -> int:
    sessions = await client.list_sessions()
    if args.json:
        print_json({"sessions": sessions})
    else:
        print(sessions_table(sessions), flush=True)
    return 0


async def _close(client: AsyncClient, args: argparse.Namespace) -> int:
    final = await client.delete_session(args.session)
    if args.json:
        print_json(final)
    else:
        print(f"closed {final.get('session_id', args.session)} ({_outcome(final)})", flush=True)
    return 0


def sessions_table(sessions: list[dict[str, Any]]) -> str:
    """Aligned columns, one session a line, oldest first (the daemon's order)."""
    rows = [("ID", "STATE", "USER", "CWD", "RUNS", "LABELS")]
    for s in sessions:
        labels = ",".join(f"{k}={v}" for k, v in sorted((s.get("labels") or {}).items()))
        rows.append((s["session_id"], s["state"], str(s.get("user") or "-"), str(s.get("cwd") or "-"),
                     str(s.get("run_count", 0)), labels or "-"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _outcome(session: dict[str, Any]) -> str:
    """What a closed session's object says about its end: `closed`, or how its shell ended first."""
    state = str(session.get("state"))
    reason = session.get("reason")
    return f"{state}: {reason}" if reason and reason != "deleted" else state


def print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)
