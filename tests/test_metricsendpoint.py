"""Tests for L{primecount.metricsendpoint}: one bounded request per connection, over L{StringTransport} and
against a real twistd fed hostile scrapers."""

from __future__ import annotations

import os
import socket
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from primecount.metricsendpoint import (
    DEADLINE, HEAD_DEADLINE, HEAD_GRACE, MAX_CONNECTIONS, MOST_CONNECTIONS, RENDER_INTERVAL, MetricsSite,
)
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import slow, waitUntil
from tests.test_keepalive import _residentKiB


class Scrape:
    """One connection to a L{MetricsSite} over a L{StringTransport}."""

    def __init__(self, site: MetricsSite) -> None:
        self.transport = StringTransport()
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        """Deliver C{data}; what the site has written so far."""
        self.protocol.dataReceived(data)
        return self.transport.value()


class MetricsSiteTests(SynchronousTestCase):
    """What a scraper gets, and what a hostile client cannot make the server hold."""

    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        Counter("primecount_test", "A counter for the test.", registry=self.registry).inc(3)
        self.clock = Clock()
        self.site = MetricsSite(self.registry, self.clock)

    def test_get(self) -> None:
        """C{GET /metrics} gets the Prometheus text, with its length, and the connection closes."""
        reply = Scrape(self.site).send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = reply.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"primecount_test_total 3.0", body)
        self.assertIn(f"Content-Length: {len(body)}".encode(), head)
        self.assertIn(b"Connection: close", head)

    def test_headAndOpenMetrics(self) -> None:
        """C{HEAD} gets the head alone; an OpenMetrics C{Accept} gets OpenMetrics."""
        scrape = Scrape(self.site)
        reply = scrape.send(b"HEAD /metrics?x=1 HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        self.assertTrue(reply.endswith(b"\r\n\r\n"))
        self.assertIn(b"application/openmetrics-text", reply)
        self.assertTrue(scrape.transport.disconnecting)

    def test_refusals(self) -> None:
        """Other methods, a request body, other paths and garbage are refused at once, unread."""
        for request, status in ((b"POST /metrics HTTP/1.1\r\nContent-Length: 200000000\r\n\r\n", b"405"),
                                (b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n", b"400"),
                                (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
                                (b"GET / HTTP/1.1\r\n\r\n", b"404"), (b"hello\n\n", b"400")):
            scrape = Scrape(self.site)
            reply = scrape.send(request)
            self.assertTrue(reply.startswith(b"HTTP/1.1 " + status), request)
            self.assertTrue(scrape.transport.disconnecting, request)

    def test_pipelinedAndBodyBytesDropped(self) -> None:
        """Requests pipelined after the first, or a body sent anyway, get no second reply and are not kept;
        past a bound the connection is aborted."""
        scrape = Scrape(self.site)
        first = scrape.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        for _ in range(300):
            self.assertEqual(scrape.send(b"GET /metrics HTTP/1.1\r\n\r\n" * 10), first)
        self.assertEqual(scrape.protocol._head, b"", "nothing held")
        self.assertTrue(scrape.transport.disconnected, "aborted after the discard bound")

    def test_headTooLarge(self) -> None:
        """A head that does not end within 8 KiB is refused, not buffered."""
        scrape = Scrape(self.site)
        reply = scrape.send(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10_000)
        self.assertTrue(reply.startswith(b"HTTP/1.1 431"))

    def test_newcomerTakesTheOldestPlaceWithoutAHead(self) -> None:
        """At the cap, a newcomer takes the place of the oldest connection still without a whole head once that
        one is past its grace, and is answered; while all are young a newcomer gets a place beyond the cap, up
        to the most; past that, 503; a closed one frees its place."""
        slow = [Scrape(self.site) for _ in range(MAX_CONNECTIONS)]
        slow[0].send(b"GET /met")
        young = Scrape(self.site)  # every other one is young too: let in beyond the cap, nobody dropped
        self.assertEqual(([s.transport.disconnected for s in slow], young.transport.value()),
                         ([False] * MAX_CONNECTIONS, b""))
        self.clock.advance(HEAD_GRACE)
        newcomer = Scrape(self.site)
        self.assertEqual([s.transport.disconnected for s in slow[:2]], [True, False], "the oldest is dropped")
        slow[0].protocol.connectionLost()  # the abort, as the transport reports it
        self.assertTrue(newcomer.send(b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200"))
        for scrape in [*slow[1:], young]:
            scrape.send(b"GET /metrics HTTP/1.1\r\n\r\n")  # answered; their clients do not read yet
        flood = [Scrape(self.site) for _ in range(MOST_CONNECTIONS - MAX_CONNECTIONS - 1)]
        self.assertEqual({scrape.transport.value() for scrape in flood}, {b""}, "let in up to the most")
        over = Scrape(self.site)
        self.assertTrue(over.transport.value().startswith(b"HTTP/1.1 503"))
        over.protocol.connectionLost()
        slow[1].protocol.connectionLost()
        self.assertEqual(Scrape(self.site).transport.value(), b"")

    def test_aFloodCannotPushOutAHeadOnItsWay(self) -> None:
        """However many newcomers arrive within its grace, a connection whose head is on its way keeps its
        place, and is answered when the head comes."""
        holders = [Scrape(self.site) for _ in range(MAX_CONNECTIONS)]
        self.clock.advance(HEAD_GRACE)
        scrape = Scrape(self.site)  # takes the oldest holder's place
        for _ in range(200):
            flooder = Scrape(self.site)
            if flooder.transport.value():
                flooder.protocol.connectionLost()
            self.clock.advance(0.001)
        self.assertFalse(scrape.transport.disconnected)
        self.assertTrue(scrape.send(b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200"))
        self.assertTrue(holders[0].transport.disconnected)

    def test_deadlines(self) -> None:
        """A connection whose head is not whole within the head deadline is aborted then; one answered but
        never read is aborted at the whole deadline."""
        scrape, unread = Scrape(self.site), Scrape(self.site)
        scrape.send(b"GET /met")
        unread.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        self.clock.advance(HEAD_DEADLINE - 0.1)
        self.assertFalse(scrape.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(scrape.transport.disconnected)
        self.clock.advance(DEADLINE - HEAD_DEADLINE - 0.1)
        self.assertFalse(unread.transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(unread.transport.disconnected)

    def test_renderedOncePerInterval(self) -> None:
        """However many scrapes come, the registry is rendered at most once per interval (per format)."""
        collected = []

        class Counting:
            """A collector that counts how often it is read."""

            def collect(self):  # type: ignore[no-untyped-def]
                collected.append(self)
                return iter(())

        self.registry.register(Counting())

        def scrape(request: bytes = b"GET /metrics HTTP/1.1\r\n\r\n") -> bytes:
            one = Scrape(self.site)
            reply = one.send(request)
            one.protocol.connectionLost()
            return reply

        first = scrape()
        for _ in range(50):
            self.assertEqual(scrape(), first)
        self.assertEqual(len(collected), 1)
        self.clock.advance(RENDER_INTERVAL)
        scrape()
        scrape(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n")
        self.assertEqual(len(collected), 3)


class HostileScrapersOverTCPTests(SynchronousTestCase):
    """A real twistd's metrics endpoint under clients that send without reading."""

    @slow
    def test_memoryFlat(self) -> None:
        """Two clients pipelining C{GET /metrics} without reading and one posting a 200 MB body leave the
        server's memory flat, and a scrape still works."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        port = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        before = _residentKiB(server.process.pid)
        pushed = 0
        for payload in (b"GET /metrics HTTP/1.1\r\n\r\n" * 4000, b"GET /metrics HTTP/1.1\r\n\r\n" * 4000,
                        b"POST /metrics HTTP/1.1\r\nContent-Length: 200000000\r\n\r\n" + b"x" * 100_000):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.setblocking(False)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        pushed += client.send(payload)
                    except BlockingIOError:
                        time.sleep(0.01)
                    except OSError:
                        break  # the server closed it
                else:
                    self.fail("the server kept reading a client that sends without end")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            self.assertIn(b"primecount_requests_total", response.read())
        self.assertLess(_residentKiB(server.process.pid) - before, 8192, f"memory flat after {pushed} bytes")
        self.assertEqual(server.stop(), 0, server.log)


class ScrapesBesideHostileClientsOverTCPTests(SynchronousTestCase):
    """A real twistd's metrics endpoint while clients hold every place without sending, and keep coming."""

    @slow
    def test_scrapesSucceed(self) -> None:
        """While a thread keeps 60 silent connections open to the metrics port (replacing each one dropped, so
        that the places keep changing hands), real scrapes one after another for three seconds all succeed,
        each within the 10 s a Prometheus scrape allows."""
        import threading

        server = ServerProcess(os.path.abspath(self.mktemp()), "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        port = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        stop, held, opened = threading.Event(), [], [0]

        def holdPlaces() -> None:
            while not stop.is_set():
                for connection in list(held):
                    connection.setblocking(False)
                    try:
                        gone = connection.recv(1) == b""
                    except BlockingIOError:
                        gone = False
                    except OSError:
                        gone = True
                    if gone:
                        held.remove(connection)
                        connection.close()
                while len(held) < 60 and not stop.is_set():
                    held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
                    opened[0] += 1
                time.sleep(0.01)

        holder = threading.Thread(target=holdPlaces)
        holder.start()
        try:
            waitUntil(lambda: opened[0] >= 60, what="the hostile clients to be in place")
            scrapes, until = 0, time.monotonic() + HEAD_DEADLINE + 1  # past the head deadline: places change hands
            while time.monotonic() < until or scrapes < 20:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                    self.assertEqual(response.status, 200)
                    self.assertIn(b"primecount_requests_total", response.read())
                scrapes += 1
        finally:
            stop.set()
            holder.join(30)
            for connection in held:
                connection.close()
        self.assertGreater(opened[0], 60, "the hostile clients were dropped and came back")
        self.assertEqual(server.stop(), 0, server.log)
