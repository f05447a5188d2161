"""Real HAProxy (Debian's package, with the shipped contrib/haproxy/primecount.cfg) in front of two real
primecount instances on loopback, with clients from several loopback source addresses."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from typing import Sequence
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from primecount.records.formats import parseRecords
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import accepts, answeredUnderLoad, ask, expectedReply, requireTool, slow, waitUntil

CONFIG = Path(__file__).resolve().parents[1] / "contrib" / "haproxy" / "primecount.cfg"


def haproxyConfig(bind: str, servers: Sequence[str]) -> str:
    """The shipped configuration, listening on C{bind} (C{host:port}), in front of C{servers} instead of its
    examples: each C{host:port}, then what else its line says (C{port N}: where the /readyz check goes),
    named primecount1, primecount2, ..."""
    text = CONFIG.read_text(encoding="utf-8")
    text = re.sub(r"(?m)^    bind .*$", f"    bind {bind}", text)
    text = re.sub(r"(?m)^    server .*\n", "", text)
    return text + "".join(f"    server primecount{n} {server}\n" for n, server in enumerate(servers, 1))


def freePort() -> int:
    """A free loopback port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class HAProxy:
    """HAProxy in the foreground with the shipped configuration, bound to loopback, in front of C{servers}
    (each started with C{--metrics}, which HAProxy checks)."""

    def __init__(self, test: SynchronousTestCase, servers: list[ServerProcess]) -> None:
        self.port = freePort()
        text = haproxyConfig(f"127.0.0.1:{self.port}",
                             [f"127.0.0.1:{server.port} port {server.metricsPort}" for server in servers])
        config = Path(test.mktemp())
        config.write_text(text, encoding="utf-8")
        self.logPath = Path(test.mktemp())
        self.process = subprocess.Popen([requireTool(test, "haproxy"), "-db", "-f", str(config)],
                                        stdout=self.logPath.open("wb"), stderr=subprocess.STDOUT)
        waitUntil(self._accepts, what="HAProxy to listen")
        test.addCleanup(self.stop)

    @property
    def log(self) -> str:
        """What HAProxy has logged so far (its traffic and its servers' state changes)."""
        return self.logPath.read_text(encoding="utf-8", errors="replace")

    def _accepts(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited: {self.logPath.read_text()}")
        return accepts(self.port)

    def stop(self) -> None:
        """Stop it."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def askFrom(source: str, port: int, payload: bytes, timeout: float = 10.0, halfClose: bool = False) -> bytes:
    """Send C{payload} from the loopback address C{source} (then half-close, if asked); return all the server
    sends before closing."""
    return ask(port, payload, halfClose=halfClose, timeout=timeout, source=source)


class BehindHAProxyTests(SynchronousTestCase):
    """Records, limits and failover with the real proxy sending PROXY v2 headers."""

    def instance(self, *options: str) -> ServerProcess:
        """A primecount instance reading PROXY headers on a loopback port, stopped after the test."""
        server = ServerProcess(self.mktemp(), "--metrics", "tcp:0:interface=127.0.0.1", *options,
                               port="haproxy:tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        return server

    def recorded(self, *servers: ServerProcess) -> list[tuple[str, str]]:
        """(client, message) of every record the instances wrote."""
        pairs = []
        for server in servers:
            with open(server.records, encoding="utf-8") as file:
                pairs += [(r.client, r.message) for r in parseRecords(file)]
        return pairs

    @slow
    def test_clientAddressesReachTheRecords(self) -> None:
        """Clients from 127.0.0.2-5 through HAProxy are recorded with their own addresses on both instances."""
        first, second = self.instance("--log-requests"), self.instance("--log-requests")
        proxy = HAProxy(self, [first, second])
        sent = []
        for n in range(40):
            source = f"127.0.0.{2 + n % 4}"
            message = f"from {source} #{n}"
            self.assertEqual(askFrom(source, proxy.port, message.encode() + b"\n"), expectedReply(message))
            sent.append((source, message))
        for server in (first, second):
            self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(sorted(self.recorded(first, second)), sorted(sent))
        self.assertTrue(self.recorded(first) and self.recorded(second), "both instances served")
        peers = re.findall(r"connection from (\S+)", first.log + second.log)
        # 127.0.0.1 is HAProxy's own readiness probe from this test, sent through it once.
        self.assertEqual(sorted(set(peers) - {"127.0.0.1"}), ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"])

    @slow
    def test_perAddressLimitHitsOnlyThatAddress(self) -> None:
        """With --max-per-ip 2, a third connection from 127.0.0.5 is busy; 127.0.0.6 is still answered."""
        server = self.instance("--max-per-ip", "2", "--timeout", "30", "--quiet", "0", "--log-requests")
        proxy = HAProxy(self, [server])
        held = []
        for _ in range(2):
            connection = socket.socket()
            connection.bind(("127.0.0.5", 0))
            connection.connect(("127.0.0.1", proxy.port))
            connection.sendall(b"hel")  # a request begun, not ended: the connection stays open
            held.append(connection)
            self.addCleanup(connection.close)
        server.waitFor(rb"connection from 127\.0\.0\.5[^\n]*\n(.*\n)*.*connection from 127\.0\.0\.5")
        self.assertEqual(askFrom("127.0.0.5", proxy.port, b"third\n"), b"ERROR busy\n")
        self.assertEqual(askFrom("127.0.0.6", proxy.port, b"other\n"), expectedReply("other"))
        held[0].sendall(b"d\n")
        self.assertEqual(held[0].recv(100), expectedReply("held"))
        for connection in held:
            connection.close()
        self.assertEqual(server.stop(), 0, server.log)
        # The second held connection's close ends its "hel" as a request (EOF ends a message).
        self.assertEqual(sorted(self.recorded(server)),
                         [("127.0.0.5", "hel"), ("127.0.0.5", "held"), ("127.0.0.6", "other")])

    @slow
    def test_instanceKilledMidLoad(self) -> None:
        """kill -9 of one instance under load: every request that got an answer is in some records file."""
        first, second = self.instance(), self.instance()
        proxy = HAProxy(self, [first, second])
        answered = answeredUnderLoad(
            [f"127.0.0.{n}" for n in range(2, 6)], 3,
            lambda source, payload: askFrom(source, proxy.port, payload, timeout=5),
            meanwhile=lambda: (time.sleep(1), first.process.kill()),
        )
        self.assertEqual(second.stop(), 0, second.log)
        recorded = {message for _, message in self.recorded(first, second)}
        self.assertGreater(len(answered), 100)
        self.assertEqual(sorted(set(answered) - recorded), [])


class KeptConnectionsThroughHAProxyTests(SynchronousTestCase):
    """--keep-alive behind the proxy: one client connection carries many pipelined requests, in order."""

    @slow
    def test_pipelinedThroughTheProxy(self) -> None:
        """200 pipelined lines from 127.0.0.7 through HAProxy come back in order and are recorded as 127.0.0.7's."""
        server = ServerProcess(self.mktemp(), "--keep-alive", "--metrics", "tcp:0:interface=127.0.0.1",
                               port="haproxy:tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        proxy = HAProxy(self, [server])
        messages = [f"kept {n} through the proxy" for n in range(200)]
        reply = askFrom("127.0.0.7", proxy.port, b"".join(m.encode() + b"\n" for m in messages), halfClose=True)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertEqual(reply, b"".join(expectedReply(m) for m in messages))
        with open(server.records, encoding="utf-8") as file:
            self.assertEqual([(r.client, r.message) for r in parseRecords(file)], [("127.0.0.7", m) for m in messages])
