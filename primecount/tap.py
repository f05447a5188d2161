"""The twistd plugin's service, C{twistd -n primecount --port 5050}: the services of one process, or of a
supervisor of C{--workers}, built from the L{Options} of L{primecount.options}."""

from __future__ import annotations

import os
import platform
from functools import partial
from typing import Any, Optional

from twisted.application.service import IService, IServiceCollection
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from primecount import __version__
from primecount.connection import BufferBudget
from primecount.factory import PrimeCountFactory
from primecount.health import ProcessHealth, WorkersHealth
from primecount.lifecycle import Drain, HealthWatch, Listener, ProcessSignals, SequentialMultiService
from primecount.limits import descriptorLimits, enoughDescriptors
from primecount.metrics import NoMetrics, PrometheusMetrics, workersRegistry
from primecount.metricsendpoint import MetricsSite
from primecount.options import (
    DEFAULTS, PROXIED_PREFIX, Options, configuredLimits, listenedAddress, requestLimits, withBacklog,
    withoutProxyPrefix, workerArguments,
)
from primecount.protocol import BusyProtocol, PrimeCountProtocol
from primecount.proxied import LOOPBACK, ProxiedFactory, listensBeyondLoopback, parseNetworks
from primecount.readiness import Readiness
from primecount.records import openStore
from primecount.responder import Responder, replyDeadline
from primecount.startup import forgetTerminal, keepTerminal
from primecount.threads import batchScheduledPool, deferringTo
from primecount.tls import MOZILLA_INTERMEDIATE, withCiphers
from primecount.workers import MetricsDirectory, SharedSocket, SharedSocketEndpoint, SupervisorWatch, WorkerPool

__all__ = ["Options", "makeService"]
log = Logger()


def makeService(options: Options, reactor: Optional[Any] = None) -> IService:
    """The services of one process. They start in this order and stop in the reverse, each once the one after
    it has stopped: signals, (a worker's watch on its supervisor), records, metrics, drain, listener, health,
    readiness. So on stop systemd is told first, then C{/readyz} turns unready (for C{--drain-delay}), the
    listener closes, open connections are drained (bounded by C{--timeout}), the metrics endpoint closes, and
    the records are flushed and closed last."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    log.info("primecount {version} on {python} {pythonVersion}", version=__version__,
             python=platform.python_implementation(), pythonVersion=platform.python_version())
    keepTerminal()  # for a start that fails after twistd has become a daemon (primecount.startup)
    reactor.callWhenRunning(forgetTerminal)
    if options["workers"] > 1:
        return supervisor(options, reactor)
    limits = descriptorLimits(options["max-connections"], options["max-per-ip"])
    reactor.suggestThreadPoolSize(options["threads"])
    threadPool = batchScheduledPool(reactor.getThreadPool())
    runInThread = deferringTo(reactor, threadPool)
    metrics: NoMetrics = NoMetrics()
    if options["metrics"] or options["worker-metrics"]:
        metrics = PrometheusMetrics(threadPool, worker=bool(options["worker-metrics"]),
                                    limits=configuredLimits(options, limits.maxTotal))
    records = openStore(options, reactor, runInThread, metrics)
    budget = BufferBudget(options["max-buffered"])
    metrics.watchBufferBudget(budget)
    responder = Responder(reactor, runInThread, records, replyDeadline(options))
    factory = PrimeCountFactory(requestLimits(options), reactor, responder, metrics, limits, bufferBudget=budget,
                                protocol=PrimeCountProtocol, busyProtocol=BusyProtocol)
    signals = ProcessSignals(reactor, onHangUp=records.reopen)
    worker = options["worker-fd"] is not None
    listener = Listener(*_listening(options, reactor, factory, metrics), reactor)
    health = ProcessHealth(lambda: listener.listening, records.healthy)
    metrics.watchHealth(health)
    return _inOrder(
        signals,
        SupervisorWatch(reactor, signals.stop) if worker else None,
        records,
        _metricsListener(options, reactor, MetricsSite(metrics.registry, reactor, health))
        if options["metrics"] else None,
        # Every request ends within --timeout of its connect, an ERROR's lingering close within the linger
        # after that; the extra second covers analysis and the record.
        Drain(factory, reactor, grace=options["timeout"] + factory.limits.linger + 1),
        listener,
        HealthWatch(health, reactor, options["drain-delay"]),
        None if worker else Readiness(reactor),  # a worker's readiness is its supervisor's business
    )


def supervisor(options: Options, reactor: Any) -> IService:
    """C{--workers N}: the shared socket, N supervised workers, and the summed metrics; see L{primecount.workers}.
    Stops in reverse order: every worker drains and exits, then the socket closes, then the metrics endpoint."""
    fileLimit = enoughDescriptors()  # every worker's limit is the supervisor's: said now, not by each worker
    environ = dict(os.environ)
    folder = MetricsDirectory(environ, options["workers"]) if options["metrics"] else None
    shared = SharedSocket(_portEndpoint(options, reactor), reactor)
    health = WorkersHealth(options["workers"])
    # Each worker drains within its own grace (--timeout, the linger, a second); then it is killed.
    pool = WorkerPool(reactor, options["workers"], partial(workerArguments, options), shared, environ,
                      grace=options["timeout"] + DEFAULTS.linger + 5,
                      onEnded=folder.workerEnded if folder is not None else lambda pid: None, health=health)
    metrics = None
    if folder is not None:
        limits = configuredLimits(options, options["max-connections"]
                                  or fileLimit.defaultMaxConnections * options["workers"])
        registry = workersRegistry(folder, limits, health, lambda: pool.restarts)
        metrics = _metricsListener(options, reactor, MetricsSite(registry, reactor, health))
    log.info("supervising {count} workers on one listening socket", count=options["workers"])
    return _inOrder(ProcessSignals(reactor, onHangUp=pool.hangUp, onReplace=pool.replaceAll), folder, metrics,
                    shared, pool, HealthWatch(health, reactor, options["drain-delay"]),
                    Readiness(reactor, pool.allListening))


def _metricsListener(options: Options, reactor: Any, site: MetricsSite) -> Listener:
    """The metrics endpoint's listener: one that cannot listen (its port in use) stops the start with one line
    naming C{--metrics}."""
    return Listener(serverFromString(reactor, options["metrics"]), site, reactor, option="metrics", announce=False)


def _inOrder(*services: Optional[IService]) -> IServiceCollection:
    """The services given (not the C{None}s), started in this order and stopped in the reverse, one at a time."""
    top = SequentialMultiService()
    for service in services:
        if service is not None:
            service.setServiceParent(top)
    return top


def _listening(options: Options, reactor: Any, factory: PrimeCountFactory, metrics: NoMetrics) -> tuple[Any, Any]:
    """The endpoint to listen on and the factory for it: behind a C{haproxy:} prefix, the PROXY-header reader
    (trusting only C{--proxy-from}) in front of the request factory."""
    if options["worker-fd"] is not None:
        endpoint: Any = SharedSocketEndpoint(reactor, options["worker-fd"])
    else:
        endpoint = _portEndpoint(options, reactor)
    if not options["port"].startswith(PROXIED_PREFIX):
        return endpoint, factory
    return endpoint, ProxiedFactory(factory, options["proxy-from"], reactor, options["timeout"], metrics)


def _portEndpoint(options: Options, reactor: Any) -> Any:
    """The endpoint C{--port} describes, under any C{haproxy:} prefix (warning if its proxies are unlisted)."""
    description = withoutProxyPrefix(options["port"])
    endpoint = serverFromString(reactor, withBacklog(description))
    if description.startswith("ssl:"):
        endpoint = withCiphers(endpoint, options["tls-ciphers"] or MOZILLA_INTERMEDIATE)
    address = listenedAddress(description)
    if (options["port"].startswith(PROXIED_PREFIX) and options["proxy-from"] == parseNetworks(LOOPBACK)
            and listensBeyondLoopback(address[0] if address else "")):
        log.warn("--port {port} takes PROXY headers on every interface, but only proxies on this host are trusted "
                 "(--proxy-from {trusted}); connections from proxies elsewhere will be refused: list them with "
                 "--proxy-from", port=options["port"], trusted=LOOPBACK)
    return endpoint
