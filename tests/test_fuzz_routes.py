"""Property-based fuzz of every route and method of a live daemon started with an access token
(issue 11). The strategies, the raw-socket client and the checks are in tests/fuzzing.py, shared
with scripts/fuzz.py (the long run).

Properties of every answer: no 5xx; every non-2xx answer is JSON with string `code` and `message`;
every SSE stream (a run's POST, a GET of its events) carries exactly one terminal event, last, and
then ends. After the fuzz: every session was deleted and no process of theirs is left.

What the fuzz found, each now a test here that would fail again: aiohttp's parser answered a
malformed request (an invalid method, header byte, Content-Length or chunk size, a duplicate
singleton header, `br` without Brotli, an asterisk-form target) with text/plain (test_protocol_errors;
execd/api/server.py answers JSON now); `Expect` is answered before any middleware, an unknown value
as a text/plain 417 and a non-ASCII one as a 500 (test_any_header; now a JSON 417).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import fuzzing
from tests.fuzzing import Case, Outcome, Target
from tests.helpers_control import kill_tagged, served, session_ids_alive

FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One daemon for the whole file, with a token (from a file) and a pool of sessions."""
    folder = tmp_path_factory.mktemp("fuzz")
    token_file = folder / "token"
    token_file.write_text(fuzzing.TOKEN, encoding="utf-8")
    args = ("--access-token-file", str(token_file), *fuzzing.DAEMON_ARGS)
    with (folder / "daemon.log").open("wb") as log, served(*args, output=log) as daemon:
        fuzz = Target("127.0.0.1", daemon.port)
        fuzz.set_up()
        try:
            yield fuzz
        finally:
            left = kill_tagged(fuzz.seen_sessions)  # a last resort: the final test proves it found nothing
    assert not left, f"processes of fuzzed sessions outlived the daemon: {left}"


def assert_good(outcome: Outcome) -> None:
    """One assert per kind of problem: Hypothesis then reports each kind as a bug of its own."""
    kinds = {fuzzing.kind_of(problem) for problem in outcome.problems}
    where = "\n".join([*outcome.problems, outcome.reproducer()])
    assert fuzzing.FIVE_XX not in kinds, where
    assert fuzzing.PROTOCOL_TEXT not in kinds, where
    assert fuzzing.NOT_JSON not in kinds, where
    assert fuzzing.BAD_STREAM not in kinds, where
    assert fuzzing.NO_ANSWER not in kinds, where


@settings(FUZZ, max_examples=150)
@given(fuzzing.cases())
def test_any_route_and_method(target: Target, case: Case) -> None:
    """Every route and method, unknown ones too, with any body, encoding, query, token and ids."""
    assert_good(target.run_case(case))


@settings(FUZZ, max_examples=40)
@given(st.sampled_from([route for route, _ in fuzzing.ROUTES]).flatmap(lambda route: fuzzing.cases(route=route)))
def test_each_route_with_its_own_bodies(target: Target, case: Case) -> None:
    """The routes drawn evenly, each with its documented method and bodies built from its fields."""
    assert_good(target.run_case(case))


@settings(FUZZ, max_examples=70)
@given(fuzzing.run_cases())
def test_runs_stream_one_terminal_event(target: Target, case: Case) -> None:
    """Runs with valid-looking bodies: every stream ends with exactly one terminal event."""
    assert_good(target.run_case(case))


@settings(FUZZ, max_examples=40)
@given(fuzzing.live_run_cases())
def test_stdin_interrupt_and_events_of_a_live_run(target: Target, case: Case) -> None:
    """stdin, interrupt and events of a background run that is still reading its stdin."""
    assert_good(target.run_case(case))


@settings(FUZZ, max_examples=50)
@given(fuzzing.cases(headers=True))
def test_any_header(target: Target, case: Case) -> None:
    """Any header name with any printable latin-1 value, `Expect` included."""
    assert_good(target.run_case(case))


@settings(FUZZ, max_examples=60)
@given(fuzzing.cases(protocol=True))
def test_protocol_errors(target: Target, case: Case) -> None:
    """Requests that aiohttp's parser refuses itself: their 400s must be JSON too."""
    assert_good(target.run_case(case))


def test_zz_after_the_fuzz_every_session_is_deleted_and_no_process_is_left(target: Target) -> None:
    """Runs last in this file (pytest keeps the file's order)."""
    assert target.cases > 0, "the fuzz ran no case"
    assert target.tear_down() == []
    # DELETE kills a session's processes before it answers; a killed one may take a moment to go.
    deadline = time.monotonic() + 30
    while (alive := session_ids_alive(target.seen_sessions)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes of deleted sessions are alive: {alive}"
