"""The daemon's Prometheus metrics: plain counters bumped where things happen, turned into metric
families only when someone scrapes.

Why not prometheus_client's Counter and Histogram on the hot path: each `.labels(...).inc()` takes
a lock and a few dict lookups, per run and per request; a run `true` is a millisecond, and the
bench holds it to within 5 %. Here an event is an int or a dict entry incremented on the event
loop, and a custom collector reads them at scrape time (also on the event loop: no locks needed).

Each daemon owns a private CollectorRegistry: the test suite runs many daemons in one process, and
the global REGISTRY would mix them. No label value ever carries an id: every label has a small,
fixed set of values (the HTTP route is its template, never the path).

A leaf module: only the standard library and prometheus_client.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

SESSION_STATES = ("starting", "idle", "running", "closing", "closed", "exited", "failed")
CLOSE_REASONS = ("deleted", "idle_timeout", "shutdown", "exited", "failed", "start_failed")
RUN_OUTCOMES = ("completed", "interrupted", "timed_out")  # and "aborted", by error code
ABORT_CODES = ("SESSION_CLOSED", "SESSION_DIED", "SHUTTING_DOWN")
INTERRUPT_CAUSES = ("request", "timeout", "client_gone")
STREAMS = ("stdout", "stderr")
# From a quick `true` to an hour-long build: runs span six orders of magnitude.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
CLIENT_GONE_STATUS = 499  # a request whose client went away before its answer (nginx's convention)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# What generate_latest writes, named as the contract names it: prometheus_client's own
# CONTENT_TYPE_LATEST says 1.0.0 since 0.22, a format whose name escaping we do not negotiate.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

__all__ = ["CONTENT_TYPE", "Metrics"]


class Metrics:
    """What one daemon counts. `sessions_by_state` and `readers` are asked at scrape time (a
    gauge of what is, not of what happened), so they cost nothing between scrapes."""

    def __init__(
        self,
        sessions_by_state: Callable[[], Mapping[str, int]] = dict,
        readers: Callable[[], int] = int,
    ) -> None:
        self.sessions_by_state = sessions_by_state
        self.readers = readers
        self.sessions_created = 0
        self.sessions_closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.runs_started = 0
        # Every known label set from the start, at 0: a rate over a series that appears later
        # misses its first increment.
        self.runs_finished = {(outcome, ""): 0 for outcome in RUN_OUTCOMES}
        self.runs_finished.update({("aborted", code): 0 for code in ABORT_CODES})
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket, not cumulative; +Inf last
        self.duration_sum = 0.0
        self.output_bytes = dict.fromkeys(STREAMS, 0)
        self.dropped_bytes = 0
        self.interrupts = dict.fromkeys(INTERRUPT_CAUSES, 0)
        self.sigkill_escalations = 0
        self.http_requests: dict[tuple[str, str, int], int] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    # ----- events: each one a few increments -------------------------------------------------

    def session_created(self) -> None:
        self.sessions_created += 1

    def session_closed(self, reason: str) -> None:
        self.sessions_closed[reason] = self.sessions_closed.get(reason, 0) + 1

    def run_started(self) -> None:
        self.runs_started += 1

    def run_finished(
        self, outcome: str, code: str, duration_s: float, stdout_bytes: int, stderr_bytes: int, dropped_bytes: int
    ) -> None:
        key = (outcome, code)
        self.runs_finished[key] = self.runs_finished.get(key, 0) + 1
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS, duration_s)] += 1
        self.duration_sum += duration_s
        output = self.output_bytes
        output["stdout"] += stdout_bytes
        output["stderr"] += stderr_bytes
        self.dropped_bytes += dropped_bytes

    def run_interrupted(self, cause: str) -> None:
        self.interrupts[cause] = self.interrupts.get(cause, 0) + 1

    def sigkill_escalated(self) -> None:
        self.sigkill_escalations += 1

    def http_request(self, route: str, method: str, status: int) -> None:
        """`route` is the route's template (or "other"), never a path: a path holds ids."""
        if method not in _METHODS:
            method = "other"  # any token is a method to HTTP: the label set must stay small
        key = (route, method, status)
        requests = self.http_requests
        requests[key] = requests.get(key, 0) + 1

    # ----- scraping --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The Prometheus text format (CONTENT_TYPE) of every family."""
        return generate_latest(self.registry)


class _Collector(Collector):
    """Turns the plain counters into metric families, at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield from self._sessions(m)
        yield from self._runs(m)
        yield _counter("execd_interrupts", "Interrupts of runs, by cause.", ["cause"], m.interrupts)
        escalations = CounterMetricFamily(
            "execd_sigkill_escalations", "Runs whose processes outlived the interrupt grace and were sent SIGKILL."
        )
        escalations.add_metric([], m.sigkill_escalations)
        yield escalations
        requests = CounterMetricFamily(
            "execd_http_requests",
            "HTTP requests answered, by route template, method and status (499: the client went away).",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in m.http_requests.items():
            requests.add_metric([route, method, str(status)], count)
        yield requests

    @staticmethod
    def _sessions(m: Metrics) -> Iterator[Metric]:
        states = GaugeMetricFamily("execd_sessions", "Sessions the daemon holds, by state.", labels=["state"])
        counts = m.sessions_by_state()
        for state in SESSION_STATES:
            states.add_metric([state], counts.get(state, 0))
        yield states
        created = CounterMetricFamily(
            "execd_sessions_created", "Sessions created (including those that failed to start)."
        )
        created.add_metric([], m.sessions_created)
        yield created
        yield _counter("execd_sessions_closed", "Sessions ended, by reason.", ["reason"], m.sessions_closed)

    @staticmethod
    def _runs(m: Metrics) -> Iterator[Metric]:
        started = CounterMetricFamily("execd_runs_started", "Runs started.")
        started.add_metric([], m.runs_started)
        yield started
        finished = CounterMetricFamily(
            "execd_runs_finished",
            "Runs ended, by outcome; `code` is the error code of an aborted run, else empty.",
            labels=["outcome", "code"],
        )
        for (outcome, code), count in m.runs_finished.items():
            finished.add_metric([outcome, code], count)
        yield finished
        yield _duration_histogram(m)
        yield _counter(
            "execd_output_bytes", "Bytes of output the runs' commands wrote, by stream.", ["stream"], m.output_bytes
        )
        dropped = CounterMetricFamily(
            "execd_dropped_bytes", "Wire bytes of run events dropped from a run's log before any reader was sent them."
        )
        dropped.add_metric([], m.dropped_bytes)
        yield dropped
        readers = GaugeMetricFamily("execd_readers", "Streams attached to runs' event logs now.")
        readers.add_metric([], m.readers())
        yield readers


def _counter(name: str, documentation: str, labels: list[str], values: Mapping[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for value, count in values.items():
        family.add_metric([value], count)
    return family


def _duration_histogram(m: Metrics) -> HistogramMetricFamily:
    cumulative: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*DURATION_BUCKETS, float("inf")), m.duration_counts, strict=True):
        total += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
    family = HistogramMetricFamily("execd_run_duration_seconds", "Runs' durations, start to terminal event.")
    family.add_metric([], cumulative, m.duration_sum)
    return family
