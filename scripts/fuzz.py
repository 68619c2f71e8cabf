#!/usr/bin/env python3
"""Long property-based fuzz of every route of a daemon: the strategies and checks of
tests/test_fuzz_routes.py (tests/fuzzing.py), for as many cases as asked, without shrinking.

    .venv/bin/python scripts/fuzz.py --examples 10000            # starts its own daemon
    .venv/bin/python scripts/fuzz.py --url http://127.0.0.1:44772 --token-file /run/execd.token

Prints the count of cases, a histogram of statuses, and every problem (5xx, non-JSON error,
protocol-level text/plain 400, bad stream, no answer) by kind with a reproducer; with its own
daemon, also the distinct tracebacks the daemon logged. Exits 1 when it found a problem.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from tests import fuzzing  # noqa: E402
from tests.fuzzing import Case, Target  # noqa: E402
from tests.helpers_control import kill_tagged, served  # noqa: E402

SHOWN_PER_KIND = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="cases to send (default 10000)")
    parser.add_argument("--url", help="a running daemon (default: start one, with the fuzz's settings)")
    parser.add_argument("--token-file", help="the running daemon's access token (default: the fuzz's own)")
    parser.add_argument("--seed", type=int, help="Hypothesis seed, to repeat a run")
    parser.add_argument("--log", help="where the daemon this script starts logs (default: a temporary file)")
    return parser.parse_args(argv)


@contextmanager
def daemon(args: argparse.Namespace) -> Iterator[tuple[str, int, str, Path | None]]:
    """(host, port, token, log path or None) of the daemon to fuzz."""
    if args.url:
        parts = urlsplit(args.url)
        token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else fuzzing.TOKEN
        yield parts.hostname or "127.0.0.1", parts.port or 80, token, None
        return
    with tempfile.TemporaryDirectory(prefix="execd-fuzz-") as folder:
        token_file = Path(folder) / "token"
        token_file.write_text(fuzzing.TOKEN, encoding="utf-8")
        log_path = Path(args.log) if args.log else Path(folder) / "daemon.log"
        with (
            log_path.open("wb") as log,
            served("--access-token-file", str(token_file), *fuzzing.DAEMON_ARGS, output=log) as d,
        ):
            yield "127.0.0.1", d.port, fuzzing.TOKEN, log_path
            if args.log is None:
                print(f"(the daemon's log: {log_path}, removed at exit)")


def tracebacks(log_path: Path) -> dict[str, tuple[int, str]]:
    """The daemon's logged exceptions by event and last line: (count, the first in full)."""
    found: dict[str, tuple[int, str]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("exception"):
            text = str(record["exception"]).strip()
            lines = text.splitlines()
            # The exception's own line (the last not indented) and the first line of its message.
            at = max(i for i, line in enumerate(lines) if line and not line[0].isspace())
            key = " ".join(line.strip() for line in lines[at : at + 2])
            key = re.sub(r"\\udc[0-9a-f]{2}|\d+", "#", key)  # one entry per kind, not per position or byte
            count, first = found.get(key, (0, text))
            found[key] = (count + 1, first)
    return found


def first_line(problem: str) -> str:
    """A problem's first line, up to the first line of the answer's own text: one per kind."""
    return problem.split("\n", 1)[0].split("\\n", 1)[0][:120]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problems: dict[str, list[str]] = defaultdict(list)
    routes: Counter[str] = Counter()
    started = time.monotonic()
    with daemon(args) as (host, port, token, log_path):
        target = Target(host, port, token)
        target.set_up()

        @settings(
            max_examples=args.examples,
            deadline=None,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(fuzzing.all_cases())
        def fuzz(case: Case) -> None:
            routes[f"{case.method.decode(errors='replace')} {case.path}"] += 1
            try:
                outcome = target.run_case(case)
            except AssertionError as exc:  # the harness's own requests (pool, clean-up) went wrong
                problems["harness"].append(f"{exc}\ncase: {case!r}")
                return
            for problem in outcome.problems:
                problems[fuzzing.kind_of(problem)].append(f"{problem}\n{outcome.reproducer()}")
            if target.cases % 1000 == 0:
                print(f"... {target.cases} cases, {time.monotonic() - started:.0f} s", flush=True)

        if args.seed is not None:
            fuzz = hypothesis_seed(args.seed)(fuzz)
        fuzz()
        left = target.tear_down()
        logged = tracebacks(log_path) if log_path else {}
    leftovers = kill_tagged(target.seen_sessions)

    print(f"\ncases: {target.cases} in {time.monotonic() - started:.0f} s, sessions used: {len(target.seen_sessions)}")
    print(f"statuses: {fuzzing.histogram(target.statuses)}")
    print(f"requests by method and route (top 25 of {len(routes)}):")
    for route, count in routes.most_common(25):
        print(f"  {count:6d}  {route}")
    print(f"sessions listed after the clean-up: {len(left)}; processes of fuzzed sessions left: {len(leftovers)}")
    if logged:
        print("exceptions the daemon logged (by event and last line):")
        for line, (count, _) in sorted(logged.items(), key=lambda item: -item[1][0]):
            print(f"  {count:6d}  {line[:200]}")
    if not problems:
        print("problems: none")
    for kind, found in sorted(problems.items()):
        distinct = Counter(first_line(text) for text in found)
        print(f"\n== {kind}: {len(found)} case(s), {len(distinct)} distinct first line(s)")
        for line, count in distinct.most_common(10):
            print(f"  {count:6d}  {line}")
        shown: set[str] = set()
        for text in found:
            key = first_line(text)
            if key in shown or len(shown) >= SHOWN_PER_KIND:
                continue
            shown.add(key)
            print("  --- reproducer ---\n  " + text.replace("\n", "\n  "))
    for line, (_, first) in logged.items():
        if "BadHttpMessage" not in line and "BadHttpMethod" not in line:  # the parser's refusals are above
            print(f"\n== the daemon logged {line[:120]}; the first in full:\n{first}")
    return 1 if problems or left or leftovers else 0


if __name__ == "__main__":
    sys.exit(main())
