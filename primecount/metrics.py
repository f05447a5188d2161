"""Service metrics: the server reports events to a L{Metrics}; L{NoMetrics} (the default) drops them at no cost,
L{PrometheusMetrics} keeps them in a registry that L{primecount.metricsendpoint} serves."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from primecount import __version__

OUTCOMES = ("ok", "empty_message", "invalid_utf8", "line_too_long", "timeout", "storage_unavailable",
            "internal_error", "busy")
WITHOUT_REQUEST = ("empty", "health_check", "untrusted", "malformed", "incomplete", "timeout")
ABORTED = ("send_timeout", "handshake_timeout", "close_timeout")
# The kinds of records-store incident: the file's failing write, fsync or lock and its slow fsync; the table's
# database unavailable or slow.
INCIDENTS = ("write", "fsync", "lock", "slow_fsync", "database", "slow_commit")


class NoMetrics:
    """Accepts every metrics event and keeps nothing: the cost when C{--metrics} is off."""

    def connectionOpened(self) -> None:
        """A client connected."""

    def connectionClosed(self, requests: int) -> None:
        """A client connection that carried C{requests} requests is gone."""

    def requestFinished(self, outcome: str, seconds: float) -> None:
        """A reply went out: C{ok} or an error reason, C{seconds} after the request began."""

    def connectionWithoutRequest(self, reason: str) -> None:
        """A connection closed before sending a request: C{empty} (connect and close), or, behind a proxy,
        C{health_check}, C{untrusted}, C{malformed}, C{incomplete}, C{timeout} (its PROXY header)."""

    def busyRefusal(self, limit: str) -> None:
        """A connection got C{ERROR busy} for being over C{limit}: C{total} or C{per_address} (connections), or
        C{buffered} (the request bytes held in all)."""

    def connectionAborted(self, reason: str) -> None:
        """A connection was aborted (reset) instead of closed: C{send_timeout}, its output made no progress;
        C{handshake_timeout}, its TLS handshake did not finish within the request deadline; C{close_timeout}, its
        TLS close was not over within the linger time."""

    def recordsWritten(self, count: int) -> None:
        """C{count} records reached the records file."""

    def recordWriteFailed(self, count: int) -> None:
        """C{count} records could not be written."""

    def fsyncObserved(self, seconds: float) -> None:
        """An fsync of the records file took C{seconds}."""

    def storeIncident(self, kind: str) -> None:
        """An incident of the records store began (one of L{INCIDENTS}): logged once, then it lasts until the store
        works again."""

    def commitObserved(self, seconds: float) -> None:
        """A batch of records was stored in C{seconds}: its append (the file) or its transaction (the table)."""

    def watchHealth(self, health: Any) -> None:
        """Report the readiness of C{health} (a L{primecount.health.ProcessHealth}) and its store's health."""

    def watchBufferBudget(self, budget: Any) -> None:
        """Report how many request bytes C{budget} (a L{primecount.connection.BufferBudget}) holds."""


class PrometheusMetrics(NoMetrics):
    """Keeps the metrics in a private Prometheus registry, including the thread pool's state at scrape time."""

    def __init__(self, threadPool: Any = None, worker: bool = False, limits: Mapping[str, float] = {}) -> None:
        """With C{worker}, values go to C{PROMETHEUS_MULTIPROC_DIR} for the supervisor to sum; the gauges read
        from this process at scrape time (thread pool, process, build, limits) are then the supervisor's."""
        self.registry = CollectorRegistry()
        self._requests = Counter("primecount_requests", "Requests answered, by outcome (ok or the ERROR reason).",
                                 ["outcome"], registry=self.registry)
        self._duration = Histogram(
            "primecount_request_duration_seconds",
            "Time from a request's first byte (a connection's first request: from connect) to its reply.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry)
        self._connections = Gauge("primecount_open_connections", "Client connections open now.",
                                  multiprocess_mode="livesum", registry=self.registry)
        self._connectionsTotal = Counter("primecount_connections", "Client connections accepted and served "
                                         "(not those refused with ERROR busy).", registry=self.registry)
        self._requestsPerConnection = Histogram(
            "primecount_connection_requests", "Requests carried by each closed connection (1 in one-shot mode).",
            buckets=(0, 1, 2, 5, 10, 100, 1000, 10000, 100000), registry=self.registry)
        self._busy = Counter("primecount_busy_refusals", "Connections answered ERROR busy, by the limit they were "
                             "over (total: --max-connections, per_address: --max-per-ip, buffered: --max-buffered).", ["limit"],
                             registry=self.registry)
        self._withoutRequest = Counter(
            "primecount_connections_without_request", "Connections closed before sending a request, by reason "
            "(empty: connect and close; behind a proxy: health_check, untrusted, malformed, incomplete, timeout).",
            ["reason"], registry=self.registry)
        self._aborted = Counter(
            "primecount_connections_aborted", "Connections aborted instead of closed, by reason (send_timeout: "
            "their queued output made no progress for --send-timeout seconds; handshake_timeout: their TLS "
            "handshake did not finish within --timeout; close_timeout: their TLS close was not over within the "
            "linger time).", ["reason"], registry=self.registry)
        self._written = Counter("primecount_records_written", "Records appended to the records file.",
                                registry=self.registry)
        self._writeErrors = Counter("primecount_record_write_errors",
                                    "Records that could not be written (their clients got ERROR storage unavailable).",
                                    registry=self.registry)
        self._incidents = Counter(
            "primecount_records_incidents", "Records-store incidents that began, by kind (write, fsync, lock: the "
            "records file's operation failed; slow_fsync: an fsync took over a second; database: the records "
            "database failed; slow_commit: a commit outlived --records-timeout).", ["kind"], registry=self.registry)
        self._fsync = Histogram("primecount_fsync_duration_seconds", "Duration of fsyncs of the records file.",
                                buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
                                registry=self.registry)
        self._commit = Histogram(
            "primecount_records_commit_duration_seconds", "Time to store a batch of records: its append to the "
            "records file, or its transaction in the records table.",
            buckets=(0.00005, 0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry)
        # Every series exists from the start, at 0, so rates and alerts work before the first such event.
        for outcome in OUTCOMES:
            self._requests.labels(outcome)
        for limit in ("total", "per_address", "buffered"):
            self._busy.labels(limit)
        for reason in WITHOUT_REQUEST:
            self._withoutRequest.labels(reason)
        for reason in ABORTED:
            self._aborted.labels(reason)
        for kind in INCIDENTS:
            self._incidents.labels(kind)
        self._worker = worker
        if not worker:
            registerProcessCollectors(self.registry, limits)
            if threadPool is not None:
                self.registry.register(_ThreadPoolCollector(threadPool))

    def watchBufferBudget(self, budget: Any) -> None:
        """Read the bytes held at scrape time (in a single process; workers' values are not summed)."""
        if not self._worker:
            self.registry.register(_BufferCollector(budget))

    def connectionOpened(self) -> None:
        """A client connected."""
        self._connections.inc()
        self._connectionsTotal.inc()

    def connectionClosed(self, requests: int) -> None:
        """A client connection is gone."""
        self._connections.dec()
        self._requestsPerConnection.observe(requests)

    def requestFinished(self, outcome: str, seconds: float) -> None:
        """A reply went out."""
        self._requests.labels(outcome).inc()
        self._duration.observe(seconds)

    def connectionWithoutRequest(self, reason: str) -> None:
        """A connection closed without a request."""
        self._withoutRequest.labels(reason).inc()

    def busyRefusal(self, limit: str) -> None:
        """A connection was refused with ERROR busy."""
        self._busy.labels(limit).inc()

    def connectionAborted(self, reason: str) -> None:
        """A connection was aborted."""
        self._aborted.labels(reason).inc()

    def recordsWritten(self, count: int) -> None:
        """Records reached the file."""
        self._written.inc(count)

    def recordWriteFailed(self, count: int) -> None:
        """Records could not be written."""
        self._writeErrors.inc(count)

    def fsyncObserved(self, seconds: float) -> None:
        """An fsync finished."""
        self._fsync.observe(seconds)

    def storeIncident(self, kind: str) -> None:
        """A records-store incident began."""
        self._incidents.labels(kind).inc()

    def commitObserved(self, seconds: float) -> None:
        """A batch was stored."""
        self._commit.observe(seconds)

    def watchHealth(self, health: Any) -> None:
        """Read the readiness at scrape time (in a single process; a supervisor reports its workers')."""
        if not self._worker:
            self.registry.register(HealthCollector(health))


class _ThreadPoolCollector:
    """Reads the analysis thread pool's queue depth and busy threads when Prometheus scrapes."""

    def __init__(self, threadPool: Any) -> None:
        self._pool = threadPool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The two gauges, as of now."""
        yield GaugeMetricFamily("primecount_threadpool_queue_depth",
                                "Work items waiting for a thread of the analysis pool.", value=self._pool.q.qsize())
        yield GaugeMetricFamily("primecount_threadpool_busy_threads",
                                "Threads of the analysis pool running work now.", value=len(self._pool.working))


class _BufferCollector:
    """Reads the request bytes held by every connection (the buffer budget's use) when Prometheus scrapes."""

    def __init__(self, budget: Any) -> None:
        self._budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauge, as of now."""
        yield GaugeMetricFamily("primecount_buffered_request_bytes", "Request bytes held by every connection "
                                "(lines not yet ended), against --max-buffered.", value=self._budget.held)


class HealthCollector:
    """Reads, when Prometheus scrapes, what C{/readyz} would answer (C{primecount_ready}) and what makes it: in
    one process, its records store's health; in a supervisor, its workers running and ready, and how many times
    one died and was started again (C{restarts})."""

    def __init__(self, health: Any, restarts: Any = None) -> None:
        self._health = health
        self._restarts = restarts

    def collect(self) -> Iterator[Any]:
        """The gauges, as of now."""
        yield GaugeMetricFamily("primecount_ready", "1 while /readyz answers 200 (listening, not draining, the "
                                "records store healthy; with --workers: one worker ready), else 0.",
                                value=int(self._health.ready().ok))
        if hasattr(self._health, "storeHealthy"):
            yield GaugeMetricFamily("primecount_records_store_healthy", "1 while the records store is expected to "
                                    "store a batch (no incident going on), else 0.",
                                    value=int(self._health.storeHealthy()))
        if hasattr(self._health, "counts"):
            workers = GaugeMetricFamily("primecount_workers", "Worker processes, by state (running, ready).",
                                        labels=["state"])
            running, ready = self._health.counts()
            workers.add_metric(["running"], running)
            workers.add_metric(["ready"], ready)
            yield workers
        if self._restarts is not None:
            yield CounterMetricFamily("primecount_worker_restarts", "Workers that died and were started again.",
                                      value=self._restarts())


def registerProcessCollectors(registry: CollectorRegistry, limits: Mapping[str, float]) -> None:
    """The conventional process and platform metrics, the build, and the configured limits."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(_ConstantCollector(limits))


def workersRegistry(workers: Any, limits: Mapping[str, float] = {}, health: Any = None,
                    restarts: Any = None) -> CollectorRegistry:
    """The supervisor's registry: C{workers} (a collector summing what every worker wrote), the workers' health
    and restarts, this process, the build and the limits."""
    registry = CollectorRegistry()
    registry.register(workers)
    if health is not None:
        registry.register(HealthCollector(health, restarts))
    registerProcessCollectors(registry, limits)
    return registry


class _ConstantCollector:
    """C{primecount_build_info{version=...} 1} and one C{primecount_limit{name=...}} gauge per configured limit."""

    def __init__(self, limits: Mapping[str, float]) -> None:
        self._limits = dict(limits)

    def collect(self) -> Iterator[Any]:
        """The two families."""
        build = GaugeMetricFamily("primecount_build_info", "The running primecount's version (value 1).",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        limits = GaugeMetricFamily("primecount_limit", "Configured limits: max_connections, max_per_ip (0: none), "
                                   "timeout_seconds, threads, workers, ...", labels=["name"])
        for name, value in sorted(self._limits.items()):
            limits.add_metric([name], value)
        yield limits
