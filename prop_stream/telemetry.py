"""The service's Prometheus metrics (``GET /metrics``), without a cost per tick.

Counters the components keep anyway (the loop's :class:`LoopStats`, the source's
dead letters, the job worker's stats, the supervisor's restarts) are read when
Prometheus scrapes, through a custom collector, so judging a tick costs nothing
more. Only two things are observed per batch: its duration (a histogram) and its
new breaches by rule and severity. Store-wide numbers (purchases by status, the
outbox's depth and oldest pending job) are queried at scrape time.

Each service builds its own :class:`ServiceMetrics` with its own
``CollectorRegistry`` (no module-level registry), so tests can run several.
``docs/operations.md`` lists every metric.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import polars as pl
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

#: The content type of the text exposition format.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Why the engine skips a deal (``Evaluation.deal_counts`` has one count each).
DEAL_SKIP_REASONS: Final = ("late", "duplicate", "unknown", "inactive", "invalid")

#: Batch durations, seconds: a batch is typically 1 ms (few ticks) to 1 s.
BATCH_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
#: HTTP request durations, seconds.
HTTP_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


@dataclass(slots=True)
class Probes:
    """Where the collector reads at scrape time; each is optional.

    Attributes:
        loop_stats: The evaluator's cumulative counters (a ``LoopStats``).
        dead_letters: Dead letters by reason (the Kafka source).
        lag: Consumer lag by partition (the Kafka source).
        jobs_stats: The job worker's cumulative counters (a ``WorkerStats``).
        checks: Each component's readiness (``Supervisor.checks``).
        restarts: Each component's restarts (``Supervisor.restarts``).
        store: Store-wide numbers: ``{"purchases": {status: n}, "outbox_pending":
            n, "outbox_oldest_age_s": s}``.
    """

    loop_stats: Callable[[], Any] | None = None
    dead_letters: Callable[[], Mapping[str, int]] | None = None
    lag: Callable[[], Mapping[int, int]] | None = None
    jobs_stats: Callable[[], Any] | None = None
    checks: Callable[[], Mapping[str, str]] | None = None
    restarts: Callable[[], Mapping[str, int]] | None = None
    store: Callable[[], Mapping[str, Any]] | None = None


class ServiceMetrics:
    """The metrics of one service process.

    Args:
        probes: What to read at scrape time (may be filled in later).
    """

    def __init__(self, probes: Probes | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.probes = probes if probes is not None else Probes()
        self.batch_seconds = Histogram(
            "prop_stream_batch_duration_seconds",
            "Seconds from a batch's poll to its commit (engine and store).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.breaches = Counter(
            "prop_stream_breaches",
            "New breaches and warnings judged, by rule and severity (a replay "
            "after a restart judges its batches again).",
            ["rule", "severity"],
            registry=self.registry,
        )
        self.http = HttpStats()
        self.registry.register(_ScrapeCollector(self))

    def observe_batch(self, evaluation: Any, seconds: float) -> None:
        """Record one committed batch (the loop's ``on_batch``).

        Args:
            evaluation: The batch's ``Evaluation``.
            seconds: Its duration.
        """
        self.batch_seconds.observe(seconds)
        breaches: pl.DataFrame = evaluation.breaches
        if not breaches.height:
            return
        new = breaches.filter(~pl.col("resolved"))
        if not new.height:
            return
        for (rule, severity), n in _pairs(new):
            self.breaches.labels(rule, severity).inc(n)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)


class HttpStats:
    """HTTP requests by (method, route, status) and their durations, kept cheaply.

    The request path calls :meth:`observe` once per request from the event
    loop's thread: a dict increment and a bisect, no lock (prometheus-client's
    labelled children take a lock per counter, and a histogram one per bucket
    and sum, which cost a measurable share of a hot read). Scrapes read
    snapshots of the dicts through :func:`_http_metrics`.
    """

    def __init__(self, buckets: tuple[float, ...] = HTTP_BUCKETS) -> None:
        self.buckets = buckets
        self.counts: dict[tuple[str, str, int], int] = {}
        #: (method, route) -> [count per bucket..., +Inf count, sum of seconds]
        self.durations: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        key = (method, route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        cells = self.durations.get((method, route))
        if cells is None:
            cells = [0.0] * (len(self.buckets) + 2)
            self.durations[(method, route)] = cells
        cells[bisect.bisect_left(self.buckets, seconds)] += 1
        cells[-1] += seconds


def _http_metrics(http: HttpStats) -> Iterator[Metric]:
    requests = CounterMetricFamily(
        "prop_stream_http_requests",
        "HTTP requests answered, by method, route template and status.",
        labels=["method", "route", "status"],
    )
    for (method, route, status), n in sorted(dict(http.counts).items()):
        requests.add_metric([method, route, str(status)], n)
    yield requests
    seconds = HistogramMetricFamily(
        "prop_stream_http_request_duration_seconds",
        "Seconds to answer an HTTP request, by method and route template.",
        labels=["method", "route"],
    )
    bounds = [*(str(b) for b in http.buckets), "+Inf"]
    for (method, route), live in sorted(dict(http.durations).items()):
        cells = list(live)
        cumulative: list[tuple[str, float]] = []
        running = 0.0
        for bound, in_bucket in zip(bounds, cells[:-1], strict=True):
            running += in_bucket
            cumulative.append((bound, running))
        seconds.add_metric([method, route], cumulative, sum_value=cells[-1])
    yield seconds


def _pairs(frame: pl.DataFrame) -> Iterator[tuple[tuple[str, str], int]]:
    counts = frame.group_by("rule", "severity").len()
    for rule, severity, n in counts.iter_rows():
        yield (str(rule), str(severity)), int(n)


class _ScrapeCollector(Collector):
    """Reads the components' own counters when Prometheus scrapes."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        probes = self._metrics.probes
        yield from _guarded("loop", probes.loop_stats, _loop_metrics)
        yield from _guarded("dead letters", probes.dead_letters, _dead_letter_metrics)
        yield from _guarded("lag", probes.lag, _lag_metrics)
        yield from _guarded("jobs", probes.jobs_stats, _jobs_metrics)
        yield from _guarded("checks", probes.checks, _check_metrics)
        yield from _guarded("restarts", probes.restarts, _restart_metrics)
        yield from _guarded("store", probes.store, _store_metrics)
        yield from _guarded("http", lambda: self._metrics.http, _http_metrics)


def _guarded(
    what: str,
    probe: Callable[[], Any] | None,
    build: Callable[[Any], Iterator[Metric]],
) -> Iterator[Metric]:
    if probe is None:
        return
    try:
        # Built in full first: a probe that fails half-way yields nothing.
        metrics = list(build(probe()))
    except Exception as exc:  # a scrape never fails because one probe did
        logger.warning("metrics: reading %s failed: %s", what, exc)
        return
    yield from metrics


def _loop_metrics(stats: Any) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "prop_stream_ticks_polled",
        "Ticks taken from the source (good ones; dead letters are apart).",
        value=stats.ticks,
    )
    yield CounterMetricFamily(
        "prop_stream_ticks_judged", "Ticks the engine evaluated.", value=stats.evaluated
    )
    reasons = ("late", "unknown", "inactive", "invalid")
    yield _by_label(
        CounterMetricFamily,
        "prop_stream_ticks_skipped",
        "Ticks counted and skipped by the engine, by reason.",
        "reason",
        {reason: getattr(stats, reason) for reason in reasons},
    )
    # Deals have their own families (not a ``kind`` label on the tick ones):
    # their skip reasons differ (duplicate) and dashboards summing ticks stay true.
    yield CounterMetricFamily(
        "prop_stream_deals_polled",
        "Deals taken from the source (good ones; dead letters are apart).",
        value=stats.deals,
    )
    yield CounterMetricFamily(
        "prop_stream_deals_judged",
        "Deals the engine processed (unmatched closes included).",
        value=stats.deals_judged,
    )
    yield CounterMetricFamily(
        "prop_stream_deals_unmatched",
        "Processed out deals whose position was not open.",
        value=stats.deals_unmatched,
    )
    yield _by_label(
        CounterMetricFamily,
        "prop_stream_deals_skipped",
        "Deals counted and skipped by the engine, by reason.",
        "reason",
        {reason: stats.deals_skipped[reason] for reason in DEAL_SKIP_REASONS},
    )
    yield CounterMetricFamily(
        "prop_stream_batches", "Batches committed.", value=stats.batches
    )
    yield CounterMetricFamily(
        "prop_stream_transitions", "Phase transitions applied.", value=stats.transitions
    )
    yield CounterMetricFamily(
        "prop_stream_checkpoints",
        "Engine checkpoints written.",
        value=stats.checkpoints,
    )


def _by_label(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    documentation: str,
    label: str,
    values: Mapping[Any, float],
) -> Metric:
    """One family with a sample per key of ``values``, in key order."""
    family = kind(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([str(key)], value)
    return family


def _dead_letter_metrics(counts: Mapping[str, int]) -> Iterator[Metric]:
    yield _by_label(
        CounterMetricFamily,
        "prop_stream_dead_letters",
        "Messages sent to the dead-letter topic, by reason.",
        "reason",
        counts,
    )


def _lag_metrics(lag: Mapping[int, int]) -> Iterator[Metric]:
    yield _by_label(
        GaugeMetricFamily,
        "prop_stream_consumer_lag",
        "Messages in the tick topic not judged yet, by partition.",
        "partition",
        lag,
    )


def _jobs_metrics(stats: Any) -> Iterator[Metric]:
    results = ("applied", "already_applied", "failed", "cancelled", "errors")
    yield _by_label(
        CounterMetricFamily,
        "prop_stream_jobs",
        "Outbox jobs handled by this process, by result.",
        "result",
        {result: getattr(stats, result) for result in results},
    )


def _check_metrics(checks: Mapping[str, str]) -> Iterator[Metric]:
    yield _by_label(
        GaugeMetricFamily,
        "prop_stream_component_ready",
        "1 when a component (or what it needs: kafka, topic) is ready, else 0.",
        "component",
        {name: 1.0 if state == "ok" else 0.0 for name, state in checks.items()},
    )


def _restart_metrics(restarts: Mapping[str, int]) -> Iterator[Metric]:
    yield _by_label(
        CounterMetricFamily,
        "prop_stream_component_restarts",
        "Times a component was rebuilt after a transient fault.",
        "component",
        restarts,
    )


def _store_metrics(store: Mapping[str, Any]) -> Iterator[Metric]:
    yield _by_label(
        GaugeMetricFamily,
        "prop_stream_purchases",
        "Purchases in the store, by status.",
        "status",
        store.get("purchases", {}),
    )
    yield GaugeMetricFamily(
        "prop_stream_outbox_pending_jobs",
        "Outbox jobs waiting to be applied.",
        value=store.get("outbox_pending", 0),
    )
    yield GaugeMetricFamily(
        "prop_stream_outbox_oldest_pending_age_seconds",
        "Age of the oldest pending outbox job (0 when none waits).",
        value=store.get("outbox_oldest_age_s", 0.0),
    )
    yield GaugeMetricFamily(
        "prop_stream_archive_staged_ticks",
        "Judged ticks staged in the store, not yet moved to the tick archive.",
        value=store.get("archive_staged", 0),
    )
    yield GaugeMetricFamily(
        "prop_stream_archive_staged_deals",
        "Judged deals staged in the store, not yet moved to the archive.",
        value=store.get("archive_staged_deals", 0),
    )
