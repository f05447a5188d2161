"""End-to-end tests over real loopback sockets: the whole service in this process, and a real twistd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from functools import partial
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from primecount.connection import RequestLimits
from primecount.records.formats import parseRecords
from primecount.responder import Responder
from primecount.records.file import FileStore
from primecount.tools import serverprocess
from primecount.tools.serverprocess import TWISTD, ServerProcess
from tests.helpers import ask, expectedReply, requestFactory

MESSAGES = ["abc2a", "añoñ", "ñandú ú", "日本日", "hello world", "x", "a\\b\tb", "zzzzzzz"]


class OneShotClient(Protocol):
    """Sends one payload on connect and collects the reply until the server closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        """Send the request."""
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        """Collect the reply."""
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        """Deliver what was received."""
        self.done.callback(self.received)


class LoopbackServiceTests(TestCase):
    """The real protocol, thread pool and records file behind a real listening socket."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.records = FileStore(self.path, reactor)
        self.records.startService()
        responder = Responder(reactor, partial(deferToThreadPool, reactor, reactor.getThreadPool()), self.records)
        factory = requestFactory(RequestLimits(timeout=20), reactor, responder)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1", backlog=512)

    @inlineCallbacks
    def tearDown(self):  # type: ignore[no-untyped-def]
        yield self.port.stopListening()
        self.records.stopService()

    @inlineCallbacks
    def ask(self, payload: bytes):  # type: ignore[no-untyped-def]
        """Connect, send C{payload}, return the reply."""
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        client = yield connectProtocol(endpoint, OneShotClient(payload))
        reply = yield client.done
        return reply

    @inlineCallbacks
    def test_fiveHundredConcurrentClients(self):  # type: ignore[no-untyped-def]
        """500 clients at once all get correct replies, and the file holds exactly their 500 records."""
        messages = [f"{MESSAGES[i % len(MESSAGES)]} #{i} {MESSAGES[i % 3]}" for i in range(500)]
        replies = yield gatherResults([self.ask(m.encode() + b"\n") for m in messages])
        self.assertEqual(replies, [expectedReply(m) for m in messages])
        self.records.stopService()
        with open(self.path, encoding="utf-8") as file:
            stored = list(parseRecords(file))
        self.assertEqual(sorted(r.message for r in stored), sorted(messages))
        self.assertEqual({r.client for r in stored}, {"127.0.0.1"})

    @inlineCallbacks
    def test_errorsOverSocket(self):  # type: ignore[no-untyped-def]
        """Bad requests get their ERROR line over a real socket and leave no record."""
        replies = yield gatherResults([self.ask(b"\xff\xfe\n"), self.ask(b"   \n")])
        self.assertEqual(replies, [b"ERROR invalid UTF-8\n", b"ERROR empty message\n"])
        self.records.stopService()
        self.assertEqual(os.path.getsize(self.path), 0)


class TwistdTests(SynchronousTestCase):
    """A real C{twistd -n primecount} process, driven over TCP and stopped with signals."""

    def test_requestThenSigterm(self) -> None:
        """A request is answered, SIGTERM exits 0, and the record is on disk."""
        records = self.mktemp()
        server = ServerProcess(records)
        try:
            self.assertEqual(ask(server.port, "añoñ\n".encode()), "2 sí\n".encode())
            self.assertEqual(ask(server.port, b"abc2a", halfClose=True), "2 sí\n".encode())
            self.assertEqual(ask(server.port, b"\n"), b"ERROR empty message\n")
        finally:
            status = server.stop()
        self.assertEqual(status, 0, server.log)
        with open(records, encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["añoñ", "abc2a"])

    def test_quietGapOverSocket(self) -> None:
        """A client that sends no newline and waits is answered after the quiet gap."""
        server = ServerProcess(self.mktemp(), "--quiet", "0.1")
        try:
            self.assertEqual(ask(server.port, "日本日".encode()), "2 sí\n".encode())
        finally:
            self.assertEqual(server.stop(), 0)

    def test_timeoutOverSocket(self) -> None:
        """A silent client gets C{ERROR timeout} once the deadline passes."""
        server = ServerProcess(self.mktemp(), "--timeout", "0.5")
        try:
            self.assertEqual(ask(server.port, b""), b"ERROR timeout\n")
        finally:
            self.assertEqual(server.stop(), 0)

    def test_unwritableRecordsFailsBeforeListening(self) -> None:
        """An unwritable records path stops twistd at startup with a message naming the path."""
        import subprocess

        path = os.path.join(self.mktemp(), "missing", "records.txt")
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1", "--records", path],
            capture_output=True, timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(path.encode(), result.stdout + result.stderr)
        self.assertNotIn(b"starting on", result.stdout + result.stderr)

    def test_ipv6Loopback(self) -> None:
        """On a tcp6 endpoint bound to ::1 a client is answered and recorded with address ::1."""
        import socket

        if not socket.has_ipv6:
            raise self.skipTest("no IPv6 in this Python")
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as error:
            raise self.skipTest(f"no ::1 on this machine: {error}")
        records = self.mktemp()
        server = ServerProcess(records, port=r"tcp6:0:interface=\:\:1")
        try:
            self.assertEqual(ask(server.port, b"abc2a\n", host="::1"), "2 sí\n".encode())
        finally:
            self.assertEqual(server.stop(), 0)
        with open(records, encoding="utf-8") as file:
            self.assertEqual([(r.client, r.message) for r in parseRecords(file)], [("::1", "abc2a")])


    def test_dualStackRecordsIPv4ClientsAsIPv4(self) -> None:
        """On a dual-stack C{tcp6:} port an IPv4 client (seen as C{::ffff:127.0.0.1}) is recorded as
        C{127.0.0.1}: one name per client, as its own IPv4 port would record it."""
        records = self.mktemp()
        try:
            server = ServerProcess(records, port=r"tcp6:0:interface=\:\:")
        except RuntimeError as error:
            raise self.skipTest(f"no dual-stack IPv6 here: {error}")
        try:
            self.assertEqual(ask(server.port, b"abc2a\n", host="127.0.0.1"), "2 sí\n".encode())
        finally:
            self.assertEqual(server.stop(), 0)
        with open(records, encoding="utf-8") as file:
            self.assertEqual([r.client for r in parseRecords(file)], ["127.0.0.1"])


class ServerProcessTests(SynchronousTestCase):
    """The test harness's L{ServerProcess} leaves no twistd behind when its start fails."""

    def test_startTooSlowLeavesNoProcess(self) -> None:
        """A child that has not said it listens within the start bound is killed and reaped before the error
        reaches the test (which holds no handle on it to stop it)."""
        started: list[subprocess.Popen[bytes]] = []
        popen = subprocess.Popen

        def recording(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
            started.append(popen(*args, **kwargs))
            return started[-1]

        self.patch(serverprocess.subprocess, "Popen", recording)
        neverListens = [sys.executable, "-c", "import time; time.sleep(60)"]  # takes twistd's arguments as its own
        self.assertRaises(RuntimeError, ServerProcess, self.mktemp(), prefix=neverListens, startupSeconds=0.2)
        [process] = started
        self.assertEqual(process.returncode, -signal.SIGKILL)


    def test_waitForCountsMatches(self) -> None:
        """C{waitFor(..., count=N)} returns the Nth match of a line logged N or more times, and fails naming the
        count when there are fewer."""
        says = ("import sys, time; print('primecount listening on 127.0.0.1 port 1');"
                "[print(f'event {n}') for n in range(1, 41)]; sys.stdout.flush(); time.sleep(60)")
        server = ServerProcess(self.mktemp(), prefix=[sys.executable, "-c", says])
        self.addCleanup(server.stop, signal.SIGKILL)
        self.assertEqual(server.waitFor(rb"event (\d+)", count=40).group(1), b"40")
        self.assertEqual(server.waitFor(rb"event (\d+)", count=25).group(1), b"25")
        with self.assertRaises(RuntimeError) as caught:
            server.waitFor(rb"event \d+", seconds=0.2, count=41)
        self.assertIn("41 times in time", str(caught.exception))


class StartupErrorTests(SynchronousTestCase):
    """What a user sees when twistd primecount cannot start: one clear line, no traceback, a non-zero exit."""

    def twistd(self, *arguments: str, **kwargs: object) -> "subprocess.CompletedProcess[str]":
        """twistd with C{arguments}; its exit status and output."""
        return subprocess.run([*TWISTD, *arguments], capture_output=True, text=True, timeout=60, **kwargs)

    def test_portInUse(self) -> None:
        """A port already in use names itself in one line and exits 1."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            result = self.twistd("-n", "--pidfile=", "primecount", "--port", f"tcp:{port}:interface=127.0.0.1",
                              "--records", os.path.abspath(self.mktemp()))
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"primecount: --port: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.", output)
        self.assertNotIn("Traceback", output)

    def test_unixSocketPeer(self) -> None:
        """Over C{--port unix:PATH} a request is answered and recorded with an empty client field (the peer has no
        address), which C{stats} does not count as a client."""
        import socket

        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="pc-")  # short: a UNIX socket's path holds at most 107 bytes
        self.addCleanup(shutil.rmtree, folder, True)
        path, records = os.path.join(folder, "pc.sock"), os.path.join(folder, "records.txt")
        server = ServerProcess(records, "--log-requests", port=f"unix:{path}")
        self.addCleanup(server.stop)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(path)
            client.sendall(b"abc2a\n")
            self.assertEqual(client.makefile("rb").read(), expectedReply("abc2a"))
        self.assertEqual(server.stop(), 0)
        self.assertIn("connection from a UNIX-socket peer", server.log)
        with open(records, encoding="utf-8") as lines:
            self.assertEqual([(r.client, r.message) for r in parseRecords(lines)], [("", "abc2a")])
        stats = subprocess.run([sys.executable, "-m", "primecount.records", "stats", records], capture_output=True,
                               text=True, timeout=60).stdout
        self.assertIn("records      1\n", stats)
        self.assertIn("clients      0\n", stats)

    def test_metricsPortInUse(self) -> None:
        """A --metrics port already in use is one line naming --metrics, exit 1, with or without --workers."""
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            for workers in ("1", "2"):
                result = self.twistd("-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1",
                                     "--metrics", str(port), "--workers", workers,
                                     "--records", os.path.abspath(self.mktemp()))
                output = result.stdout + result.stderr
                self.assertEqual(result.returncode, 1, output)
                self.assertIn(f"primecount: --metrics: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address "
                              "already in use.", output)
                self.assertNotIn("Traceback", output)
                self.assertNotIn("started worker", output)

    def test_endpointsThatCannotBeUsed(self) -> None:
        """A UNIX socket in a folder that does not exist, and systemd's socket outside systemd: one line naming
        --port and what is wrong, exit 1."""
        for port, said in (("unix:/missing/folder/pc.sock", "--port: cannot listen on /missing/folder/pc.sock: no "
                                                            "such folder /missing/folder"),
                           ("systemd:domain=INET:name=primecount", "--port: 'systemd:domain=INET:name=primecount' "
                                                                   "names an inherited socket this process was not "
                                                                   "given")):
            result = self.twistd("-n", "--pidfile=", "primecount", "--port", port,
                                 "--records", os.path.abspath(self.mktemp()))
            self.assertEqual((result.returncode, result.stderr.count("\n")), (1, 1), result.stdout + result.stderr)
            self.assertIn(said, result.stderr)

    def test_version(self) -> None:
        """C{twistd primecount --version} prints primecount's version, not only Twisted's."""
        from primecount import __version__

        result = self.twistd("primecount", "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith(f"primecount {__version__} (Twisted "), result.stdout)

    def test_recordsFileHonoursUmask(self) -> None:
        """A records file created by a daemon with twistd's default umask (0077) is private: mode 0600."""
        import signal
        import stat
        import time

        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        records, pidfile = os.path.join(base, "records.txt"), os.path.join(base, "twistd.pid")
        result = self.twistd(f"--pidfile={pidfile}", f"--logfile={base}/twistd.log", "primecount",
                          "--port", "tcp:0:interface=127.0.0.1", "--records", records)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        deadline = time.monotonic() + 20
        while not (os.path.exists(records) and os.path.exists(pidfile)) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGTERM)
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(stat.S_IMODE(os.stat(records).st_mode), 0o600)
