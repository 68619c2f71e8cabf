"""The `execd` command: `serve` (the daemon, execd/serve.py), the client's commands (`run`,
`sessions`, `attach`, `close`: execd/cli_client.py) and `mcp` (execd/mcp_server.py). Each loads
only what it needs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from execd import __version__, cli_client
from execd.config import add_flags


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="execd", description="Persistent bash sessions over HTTP + SSE.")
    parser.add_argument("--version", action="version", version=f"execd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon", usage="%(prog)s [flags] [-- COMMAND [ARGS...]]")
    add_flags(serve)
    serve.add_argument(
        "command",
        nargs="*",
        metavar="-- COMMAND",
        help="run COMMAND beside the daemon (a container's entrypoint): signals passed on, its exit ends the daemon",
    )
    mcp = commands.add_parser("mcp", help="an MCP server for agents, talking to a daemon (the `mcp` extra)")
    mcp.add_argument("--url", help="the daemon (default: $EXECD_URL, else http://127.0.0.1:44772)")
    mcp.add_argument("--token-file", help="a file holding the daemon's access token (default: $EXECD_TOKEN_FILE)")
    mcp.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    mcp.add_argument("--port", type=int, default=8000, help="streamable-http's port, on 127.0.0.1")
    for name, summary in cli_client.COMMANDS.items():
        # Listed for `execd --help`; main() hands their arguments to cli_client before parsing.
        commands.add_parser(name, help=summary, add_help=False)
    return parser.parse_args(argv)


# The daemon's own helper processes (execd/watchdog.py, execd/enter.py), started by a bundle's
# binary as hidden commands (process.helper_command); never for users.
HELPERS = ("_watchdog", "_enter")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in HELPERS:
        return run_helper(argv[0][1:], argv[1:])
    if argv and argv[0] in cli_client.COMMANDS:
        return cli_client.main(argv)
    args = parse_args(argv)
    if args.command == "mcp":
        return run_mcp(args)
    from execd import serve

    return serve.main(args)


def run_helper(name: str, args: Sequence[str]) -> int:
    import importlib

    importlib.import_module(f"execd.{name}").main(args)
    return 0


def run_mcp(args: argparse.Namespace) -> int:
    """`execd mcp`: imported only here, so that `execd serve` never loads the `mcp` SDK."""
    try:
        from execd import mcp_server
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ("mcp", "pydantic"):
            raise
        print("execd mcp: needs the `mcp` extra: pip install 'execd[mcp]'", file=sys.stderr)
        return 2
    return mcp_server.main(args)
