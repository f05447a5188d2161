"""Tests for L{primecount.health} and what serves it: the verdicts of one process and of a supervisor, the
readiness lines L{primecount.lifecycle.HealthWatch} logs, the drain delay, and C{/healthz} and C{/readyz}."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from primecount.health import READINESS_EVENT, ProcessHealth, Verdict, WorkersHealth, parseVerdict
from primecount.lifecycle import HealthWatch
from primecount.metricsendpoint import MetricsSite
from tests.test_metricsendpoint import Scrape


class Switches:
    """What a process's health is made of, set by the test."""

    listening = True
    storeHealthy = True


class ProcessHealthTests(SynchronousTestCase):
    """One process is ready while it listens, is not draining and its store is healthy; the first reason
    that fails is given."""

    def setUp(self) -> None:
        self.switches = Switches()
        self.health = ProcessHealth(lambda: self.switches.listening, lambda: self.switches.storeHealthy)

    def test_reasons(self) -> None:
        """Each failing part gives its own reason; draining comes first."""
        self.assertEqual(self.health.ready(), Verdict(True, "ready"))
        self.switches.storeHealthy = False
        self.assertEqual(self.health.ready(), Verdict(False, "records store unavailable"))
        self.switches.listening = False
        self.assertEqual(self.health.ready(), Verdict(False, "not listening"))
        self.health.draining = True
        self.assertEqual(self.health.ready(), Verdict(False, "draining"))
        self.assertTrue(self.health.live().ok)

    def test_linesParseBack(self) -> None:
        """What a worker logs of its verdict is what its supervisor reads back."""
        for verdict in (Verdict(True, "ready"), Verdict(False, "records store unavailable")):
            self.assertEqual(parseVerdict(" " + verdict.line()), verdict)
        self.assertIsNone(parseVerdict(" maybe"))


class WorkersHealthTests(SynchronousTestCase):
    """A supervisor is ready while at least one of its workers said it is, live while one runs."""

    def test_readyWhileOneWorkerIs(self) -> None:
        """Started workers are not ready until they say so; one ready worker makes the host ready."""
        health = WorkersHealth()
        self.assertEqual(health.live(), Verdict(False, "no worker running"))
        health.started(11)
        health.started(12)
        self.assertEqual(health.ready(), Verdict(False, "no worker ready (pid 11 starting; pid 12 starting)"))
        health.said(11, Verdict(True, "ready"))
        health.said(12, Verdict(False, "records store unavailable"))
        self.assertEqual(health.ready(), Verdict(True, "ready: 1 of 2 workers ready"))
        health.ended(11)
        self.assertEqual(health.ready(), Verdict(False, "no worker ready (pid 12 records store unavailable)"))
        health.said(11, Verdict(True, "ready"))  # a late line of a worker that is gone changes nothing
        self.assertFalse(health.ready().ok)
        self.assertEqual(health.live(), Verdict(True, "alive: 1 workers running"))
        health.said(12, Verdict(True, "ready"))
        health.draining = True
        self.assertEqual(health.ready(), Verdict(False, "draining"))


class HealthWatchTests(SynchronousTestCase):
    """The readiness is logged when it changes, and on stop the host turns unready before the drain delay."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.switches = Switches()
        self.health = ProcessHealth(lambda: self.switches.listening, lambda: self.switches.storeHealthy)
        self.events: list[dict] = []
        self.patch(HealthWatch, "log", Logger(observer=self.events.append))

    def lines(self) -> list[str]:
        """The readiness lines logged so far."""
        return [f"{event['event']} {event['verdict']}" for event in self.events if "verdict" in event]

    def test_loggedOnChangeOnly(self) -> None:
        """One line at start, one per change, none while nothing changes; within a look interval."""
        watch = HealthWatch(self.health, self.clock)
        watch.startService()
        self.clock.advance(5)
        self.switches.storeHealthy = False
        self.clock.advance(HealthWatch.LOOK_INTERVAL)
        self.clock.advance(5)
        self.switches.storeHealthy = True
        self.clock.advance(HealthWatch.LOOK_INTERVAL)
        self.assertEqual(self.lines(), [f"{READINESS_EVENT} ready",
                                        f"{READINESS_EVENT} not ready: records store unavailable",
                                        f"{READINESS_EVENT} ready"])
        watch.stopService()

    def test_stopTurnsUnreadyThenWaits(self) -> None:
        """Stopping says draining at once, and finishes only after the drain delay."""
        watch = HealthWatch(self.health, self.clock, drainDelay=3.0)
        watch.startService()
        stopped = watch.stopService()
        self.assertEqual(self.health.ready(), Verdict(False, "draining"))
        self.assertEqual(self.lines()[-1], f"{READINESS_EVENT} not ready: draining")
        self.clock.advance(2.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_noDelayStopsAtOnce(self) -> None:
        """Without a drain delay the stop is immediate."""
        watch = HealthWatch(self.health, self.clock)
        watch.startService()
        self.assertIsNone(watch.stopService())


class HealthEndpointTests(SynchronousTestCase):
    """C{/healthz} and C{/readyz} answer 200 or 503 with a one-line reason; C{HEAD} gets the status alone."""

    def setUp(self) -> None:
        self.switches = Switches()
        health = ProcessHealth(lambda: self.switches.listening, lambda: self.switches.storeHealthy)
        self.site = MetricsSite(CollectorRegistry(), Clock(), health)

    def get(self, path: str, method: str = "GET") -> tuple[bytes, bytes]:
        """The status line and the body of C{path}."""
        reply = Scrape(self.site).send(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, body = reply.split(b"\r\n\r\n", 1)
        return head.split(b"\r\n")[0], body

    def test_readyAndNot(self) -> None:
        """Ready: 200 C{ready}; store down: 503 with the reason; liveness stays 200."""
        self.assertEqual(self.get("/readyz"), (b"HTTP/1.1 200 OK", b"ready\n"))
        self.switches.storeHealthy = False
        self.assertEqual(self.get("/readyz"),
                         (b"HTTP/1.1 503 Service Unavailable", b"not ready: records store unavailable\n"))
        self.assertEqual(self.get("/healthz"), (b"HTTP/1.1 200 OK", b"alive\n"))
        self.assertEqual(self.get("/readyz", "HEAD"), (b"HTTP/1.1 503 Service Unavailable", b""))

    def test_supervisorNotLive(self) -> None:
        """A supervisor without a running worker is not live."""
        site = MetricsSite(CollectorRegistry(), Clock(), WorkersHealth())
        reply = Scrape(site).send(b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 503 "))
        self.assertTrue(reply.endswith(b"\r\n\r\nnot live: no worker running\n"))
