"""schemathesis over every operation of a live daemon, shared by tests/test_openapi.py (a bounded
run in the suite) and scripts/schemathesis_run.py (the long run)."""

from __future__ import annotations

import dataclasses
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

# "Every schema-valid body is accepted" cannot hold here: a body's validity also depends on the
# machine (a cwd that exists and its user may enter, a user that exists, a run in progress).
NOT_FOR_THIS_API = [positive_data_acceptance]
# Daemon flags that keep whatever code schemathesis makes up short-lived and small.
DAEMON_ARGS = ("--max-run-timeout-ms", "2000", "--interrupt-grace-ms", "200", "--max-body-bytes", "65536")


@dataclasses.dataclass
class Outcome:
    calls: dict[str, int] = dataclasses.field(default_factory=dict)  # operation -> cases run
    failures: dict[str, str] = dataclasses.field(default_factory=dict)  # operation -> first failure

    @property
    def cases(self) -> int:
        return sum(self.calls.values())


def run(url: str, headers: dict[str, str], examples: int) -> Outcome:
    """Every operation of the document the daemon serves, schemathesis's default checks, up to
    `examples` cases each; each operation's first failure is kept and the others still run."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", headers=headers)
    outcome = Outcome()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            outcome.calls[case.operation.label] = outcome.calls.get(case.operation.label, 0) + 1
            case.call_and_validate(base_url=url, headers=headers, timeout=30, excluded_checks=NOT_FOR_THIS_API)

        try:
            check()
        except Exception as exc:
            outcome.failures[operation.label] = str(exc)[:4000]
    return outcome
