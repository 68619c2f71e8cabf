#!/usr/bin/env python3
"""The long schemathesis run: every operation of a daemon's OpenAPI document, many cases each.

    .venv/bin/python scripts/schemathesis_run.py --examples 1000       # starts its own daemon
    .venv/bin/python scripts/schemathesis_run.py --url http://127.0.0.1:44772 --token-file F

Prints the cases run per operation and every failure with schemathesis's reproducer; exits 1 on
a failure.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import schemathesis_runner  # noqa: E402
from tests.helpers_control import served  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1000, help="cases per operation (default 1000)")
    parser.add_argument("--url", help="a running daemon (default: start one)")
    parser.add_argument("--token-file", help="its access token")
    args = parser.parse_args()
    started = time.monotonic()
    if args.url:
        token = Path(args.token_file).read_text().strip() if args.token_file else ""
        outcome = schemathesis_runner.run(args.url, _auth(token), args.examples)
    else:
        token = secrets.token_hex(16)
        with tempfile.NamedTemporaryFile("w", suffix=".token") as f:
            f.write(token)
            f.flush()
            run_as = ["--run-as", "nobody"] if os.geteuid() == 0 else []
            with served("--access-token-file", f.name, *schemathesis_runner.DAEMON_ARGS, *run_as) as daemon:
                outcome = schemathesis_runner.run(daemon.url, _auth(token), args.examples)
    print(f"{outcome.cases} cases over {len(outcome.calls)} operations in {time.monotonic() - started:.0f} s")
    for operation, count in sorted(outcome.calls.items()):
        print(f"  {count:6d}  {operation}")
    for operation, failure in outcome.failures.items():
        print(f"\nFAILED {operation}\n{failure}")
    return 1 if outcome.failures else 0


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


if __name__ == "__main__":
    sys.exit(main())
