"""L{primecount.internals} against the Twisted installed: these fail if what they reach under Twisted moves."""

from __future__ import annotations

import os
import select
import socket
import stat
import struct

from twisted.internet import reactor, task, threads
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from primecount.internals import (
    acceptQueued, closeNow, parseServerEndpoint, proxyV2Parser, queuedBytes, readWaiting, sendNow, stopAccepting,
    withContextFactory,
)
from tests.helpers import HalfCloseTransport, waitUntil


class QueuedBytesTests(SynchronousTestCase):
    """L{queuedBytes} reads Twisted's write buffers right; this fails if Twisted changes under it."""

    def test_fileDescriptorBuffers(self) -> None:
        """Bytes written to a Twisted descriptor count until its writes hand them to the kernel."""
        taken: list[int] = [2]

        class Descriptor(FileDescriptor):
            """A descriptor whose kernel takes C{taken[0]} bytes a write."""

            def writeSomeData(self, data: bytes) -> int:
                return min(taken[0], len(data))

        descriptor = Descriptor(MemoryReactor())
        descriptor.connected = True
        descriptor.write(b"hello")
        descriptor.write(b" world")
        self.assertEqual(queuedBytes(descriptor), 11)
        descriptor.doWrite()
        self.assertEqual(queuedBytes(descriptor), 9)
        taken[0] = 100
        descriptor.doWrite()
        self.assertEqual(queuedBytes(descriptor), 0)

    def test_throughWrappers(self) -> None:
        """A wrapping layer (C{.transport}) is looked through; a TLS layer's cleartext waiting counts too."""

        class Layer:
            """A wrapper holding cleartext, over another transport."""

            def __init__(self, transport: object) -> None:
                self.transport = transport
                self._appSendBuffer = [b"abc"]

        descriptor = FileDescriptor(MemoryReactor())
        descriptor.connected = True
        descriptor.write(b"12345")
        self.assertEqual(queuedBytes(Layer(descriptor)), 8)
        self.assertEqual(queuedBytes(HalfCloseTransport()), 0)


def loopbackPair(test: TestCase, server: type[Protocol] = Protocol, before: bytes = b"",
                 reset: bool = False) -> Deferred[tuple[Protocol, socket.socket]]:
    """A Twisted connection with a C{server} protocol on loopback and the plain client socket at its other end,
    once the protocol's C{connectionMade} has run; the client sends C{before} at once, so it is in the server's
    socket before the reactor runs again to accept, and with C{reset} it then resets the connection (a linger
    of 0 and a close) before that accept too."""
    made: Deferred[Protocol] = Deferred()

    class Accepted(server):  # type: ignore[valid-type, misc]
        def connectionMade(self) -> None:
            super().connectionMade()
            made.callback(self)

    port = reactor.listenTCP(0, Factory.forProtocol(Accepted), interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.settimeout(10)
    test.addCleanup(client.close)
    client.sendall(before)
    if reset:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    return made.addCallback(lambda protocol: (protocol, client))


class SendNowTests(TestCase):
    """L{sendNow} sends in the call on a real TCP connection with nothing queued, and keeps order otherwise."""

    def connected(self) -> Deferred[tuple[Protocol, socket.socket]]:
        """A Twisted server connection on loopback (aborted at the end) and the plain client at its other end."""

        def both(pair: tuple[Protocol, socket.socket]) -> tuple[Protocol, socket.socket]:
            self.addCleanup(pair[0].transport.abortConnection)
            return pair

        return loopbackPair(self).addCallback(both)

    def receive(self, client: socket.socket, size: int) -> bytes:
        """Read exactly C{size} bytes from C{client}."""
        data = b""
        while len(data) < size:
            data += client.recv(size - len(data))
        return data

    def test_sentInTheCall(self) -> None:
        """With nothing queued, the bytes leave Twisted in the call itself: its write buffers stay empty and the
        client reads them before the reactor runs again."""

        def check(both: tuple[Protocol, socket.socket]) -> None:
            server, client = both
            sendNow(server.transport, b"2 s\xc3\xad\n")
            self.assertEqual((server.transport.dataBuffer, server.transport._tempDataBuffer), (b"", []))
            self.assertEqual(self.receive(client, 6), b"2 s\xc3\xad\n")

        return self.connected().addCallback(check)

    def test_queuedFirstKeepsOrder(self) -> None:
        """With bytes already queued by C{write}, L{sendNow} queues behind them: the client reads both in order."""

        def check(both: tuple[Protocol, socket.socket]) -> Deferred[None]:
            server, client = both
            server.transport.write(b"first\n")
            sendNow(server.transport, b"second\n")
            self.assertEqual(queuedBytes(server.transport), len(b"first\nsecond\n"), "both wait in Twisted")
            flushed = task.deferLater(reactor, 0, lambda: None)
            for _ in range(100):  # until the reactor has handed both to the kernel
                flushed.addCallback(lambda _: None if not server.transport.dataBuffer and not
                                    server.transport._tempDataBuffer else task.deferLater(reactor, 0.01, lambda: None))
            return flushed.addCallback(lambda _: self.assertEqual(self.receive(client, 13), b"first\nsecond\n"))

        return self.connected().addCallback(check)

    def test_restQueuedWhenTheKernelIsFull(self) -> None:
        """What the kernel does not take in the call waits in Twisted's write buffer, after the part sent, and
        the client reads every byte in order once it reads."""
        payload = bytes(range(256)) * (8 << 12)  # 8 MiB, far past the small socket buffers set below

        def check(both: tuple[Protocol, socket.socket]) -> Deferred[None]:
            server, client = both
            server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sendNow(server.transport, payload)
            self.assertTrue(server.transport.dataBuffer or server.transport._tempDataBuffer, "the rest is queued")
            self.assertLessEqual(queuedBytes(server.transport), len(payload))
            received = threads.deferToThread(self.receive, client, len(payload))
            return received.addCallback(lambda data: self.assertTrue(data == payload, "bytes lost or reordered"))

        return self.connected().addCallback(check)

    def test_errorLeftToTwisted(self) -> None:
        """A send that fails (the client reset the connection) does not raise: the bytes go to C{write}, and
        Twisted's own handling loses the connection."""
        lost: Deferred[None] = Deferred()

        class Noting(Protocol):
            def connectionLost(self, reason: object = None) -> None:
                lost.callback(None)

        def check(both: tuple[Protocol, socket.socket]) -> Deferred[None]:
            server, client = both
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            poller = select.poll()  # not select(): this process may hold more than 1024 descriptors
            poller.register(server.transport.getHandle(), select.POLLIN)
            self.assertTrue(poller.poll(10_000))  # the reset has arrived
            sendNow(server.transport, b"1 no\n")
            return lost

        return loopbackPair(self, Noting).addCallback(check)

    def test_otherTransportsWrite(self) -> None:
        """A transport that is not a TCP connection gets a plain C{write}."""
        transport = HalfCloseTransport()
        sendNow(transport, b"1 no\n")
        self.assertEqual(transport.value(), b"1 no\n")


class ReadWaitingTests(TestCase):
    """L{readWaiting} takes what a client sent before its connection was accepted, over a real TCP socket."""

    def accepted(self, before: bytes) -> Deferred[tuple[bytes, "list[bytes]", socket.socket]]:
        """Connect a plain client that sends C{before} at once; what L{readWaiting} read in the server's
        C{connectionMade}, what the reactor delivered after it (a list that grows), and the client."""

        class Reading(Protocol):
            def connectionMade(self) -> None:
                self.waiting, self.delivered = readWaiting(self.transport), []

            def dataReceived(self, data: bytes) -> None:
                self.delivered.append(data)

        def read(pair: tuple[Reading, socket.socket]) -> tuple[bytes, list[bytes], socket.socket]:
            server, client = pair
            return server.waiting, server.delivered, client

        return loopbackPair(self, Reading, before).addCallback(read)

    def untilDelivered(self, delivered: list[bytes], size: int) -> Deferred[bytes]:
        """Fires with all the reactor delivered once it is at least C{size} bytes (checked every 10 ms)."""

        def check(_: object = None) -> "Deferred[bytes] | bytes":
            joined = b"".join(delivered)
            return joined if len(joined) >= size else task.deferLater(reactor, 0.01, check)

        return task.deferLater(reactor, 0, check)

    def test_sentBeforeAccept(self) -> None:
        """Bytes sent before the accept are read in C{connectionMade}; nothing of them comes again."""

        def check(result: tuple[bytes, list[bytes], socket.socket]) -> Deferred[None]:
            waiting, delivered, client = result
            self.assertEqual(waiting, "añoñ\n".encode())
            client.sendall(b"more\n")
            return self.untilDelivered(delivered, 5).addCallback(self.assertEqual, b"more\n")

        return self.accepted("añoñ\n".encode()).addCallback(check)

    def test_nothingYet(self) -> None:
        """With nothing sent yet, it reads nothing and the reactor delivers the bytes as usual."""

        def check(result: tuple[bytes, list[bytes], socket.socket]) -> Deferred[None]:
            waiting, delivered, client = result
            self.assertEqual(waiting, b"")
            client.sendall(b"abc\n")
            return self.untilDelivered(delivered, 4).addCallback(self.assertEqual, b"abc\n")

        return self.accepted(b"").addCallback(check)

    def test_resetBeforeAccept(self) -> None:
        """A client that resets before its connection is accepted: the early read takes the error and gives
        nothing, and the connection still ends (the reactor's next read sees the end of input)."""
        lost: Deferred[bytes] = Deferred()

        class Reading(Protocol):
            def connectionMade(self) -> None:
                self.waiting = readWaiting(self.transport)

            def connectionLost(self, reason: object = None) -> None:
                lost.callback(self.waiting)

        return loopbackPair(self, Reading, reset=True).addCallback(lambda _: lost).addCallback(
            self.assertEqual, b"")

    def test_otherTransports(self) -> None:
        """A transport that is not a TCP connection (TLS, the PROXY-header reader, tests) gives nothing."""
        self.assertEqual(readWaiting(HalfCloseTransport()), b"")


class CloseNowTests(TestCase):
    """L{closeNow} closes a TCP connection in the call once all is sent, orderly, and waits otherwise."""

    def connected(self, onLost: "list[str]") -> Deferred[tuple[Protocol, socket.socket]]:
        """A Twisted server connection on loopback (noting C{"lost"} in C{onLost} when it goes) and the plain
        client socket at its other end."""

        class Noting(Protocol):
            def connectionLost(self, reason: object = None) -> None:
                onLost.append("lost")

        return loopbackPair(self, Noting)

    def readAll(self, client: socket.socket) -> bytes:
        """Everything the client receives until the server's FIN (a reset raises)."""
        data = b""
        while True:
            chunk = client.recv(65536)
            if not chunk:
                return data
            data += chunk

    def test_closedInTheCall(self) -> None:
        """All sent: the protocol's C{connectionLost} has run when L{closeNow} returns, the reactor no longer
        watches the socket, and the client reads the reply and then an orderly end of stream."""
        lost: list[str] = []

        def check(both: tuple[Protocol, socket.socket]) -> None:
            server, client = both
            transport = server.transport
            sendNow(transport, b"2 s\xc3\xad\n")
            closeNow(transport)
            self.assertEqual(lost, ["lost"])
            self.assertNotIn(transport, reactor.getReaders() + reactor.getWriters())
            self.assertEqual(self.readAll(client), b"2 s\xc3\xad\n")

        return self.connected(lost).addCallback(check)

    def test_oneReasonForEveryClose(self) -> None:
        """Every close in the call tells the protocol C{ConnectionDone} with one failure made once, not one per
        connection, and the next connection is accepted and closed the same way."""
        reasons: list[Failure] = []

        class Noting(Protocol):
            def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
                reasons.append(reason)

        def close(both: tuple[Protocol, socket.socket]) -> None:
            closeNow(both[0].transport)
            self.assertEqual(self.readAll(both[1]), b"")

        first = loopbackPair(self, Noting).addCallback(close)
        first.addCallback(lambda _: loopbackPair(self, Noting)).addCallback(close)

        def check(_: None) -> None:
            self.assertEqual(len(reasons), 2)
            self.assertTrue(reasons[0].check(ConnectionDone))
            self.assertIs(reasons[0], reasons[1])

        return first.addCallback(check)

    def test_queuedWaits(self) -> None:
        """Bytes still queued in Twisted: the close waits for them (C{loseConnection}); the client reads all."""
        lost: list[str] = []

        def check(both: tuple[Protocol, socket.socket]) -> Deferred[None]:
            server, client = both
            server.transport.write(b"queued\n")
            closeNow(server.transport)
            self.assertEqual(lost, [], "closed only once the queued bytes are out")
            return threads.deferToThread(self.readAll, client).addCallback(self.assertEqual, b"queued\n")

        return self.connected(lost).addCallback(check)

    def test_otherTransports(self) -> None:
        """A transport that is not a TCP connection gets C{loseConnection}."""
        transport = HalfCloseTransport()
        closeNow(transport)
        self.assertTrue(transport.disconnecting)


class ListeningPortTests(TestCase):
    """What the drain and the workers' shared socket do to a real TCP port of the reactor."""

    def listen(self) -> tuple[object, list[Protocol]]:
        """A TCP port on loopback and the protocols it has built."""
        built: list[Protocol] = []

        class Recording(Protocol):
            def connectionMade(self) -> None:
                built.append(self)

        port = reactor.listenTCP(0, Factory.forProtocol(Recording), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port, built

    def connectClients(self, port: object, count: int) -> None:
        """C{count} clients connect (the kernel completes their handshakes; nobody has accepted them yet)."""
        for _ in range(count):
            client = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
            self.addCleanup(client.close)

    def test_stopAcceptingKeepsTheSocket(self) -> None:
        """A port that stops accepting is no longer read by the reactor, keeps its socket (the descriptor given),
        and leaves clients in the kernel's queue, where L{acceptQueued} still takes them."""
        port, built = self.listen()
        fd = stopAccepting(port)
        self.assertNotIn(port, reactor.getReaders())
        # Not probed with socket.socket(fileno=...): on PyPy that makes the shared listening socket blocking.
        self.assertEqual((fd, stat.S_ISSOCK(os.fstat(fd).st_mode)), (port.fileno(), True))
        self.connectClients(port, 3)
        self.assertEqual(built, [])
        accepted = [0]

        def acceptedAll() -> bool:
            accepted[0] += acceptQueued(port)
            return accepted[0] >= 3

        waitUntil(acceptedAll, 10, "the three queued clients accepted")
        self.assertEqual((accepted[0], len(built)), (3, 3))
        for protocol in built:
            protocol.transport.loseConnection()

    def test_acceptQueuedOfOtherPorts(self) -> None:
        """A port that is not a TCP port (no accept batches) accepts nothing."""
        self.assertEqual(acceptQueued(object()), 0)


class EndpointTests(SynchronousTestCase):
    """Endpoints parsed without the real reactor, and an ssl: endpoint's context factory replaced."""

    def test_parsedWithoutTheReactor(self) -> None:
        """A description is parsed as C{serverFromString} parses it, errors and all."""
        self.assertEqual(parseServerEndpoint("tcp:5050:interface=127.0.0.1")._interface, "127.0.0.1")
        with self.assertRaises(ValueError):
            parseServerEndpoint("nope:5050")

    def test_contextFactoryReplaced(self) -> None:
        """An ssl: endpoint listens with the context factory made of its own."""
        from twisted.internet.endpoints import serverFromString

        from tests.test_tls import selfSignedCertificate

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        key, certificate = selfSignedCertificate(folder)
        memory = MemoryReactor()
        endpoint = serverFromString(memory, f"ssl:0:privateKey={key}:certKey={certificate}")
        made: list[object] = []

        def wrap(contextFactory: object) -> object:
            made.append(contextFactory)
            return "the replacement"

        withContextFactory(endpoint, wrap).listen(Factory.forProtocol(Protocol))
        self.assertEqual(len(made), 1)
        self.assertTrue(hasattr(made[0], "getContext"), made)
        self.assertEqual(memory.sslServers[0][2], "the replacement")


class ProxyV2ParserTests(SynchronousTestCase):
    """Twisted's PROXY v2 parser, fed bytes the way primecount feeds it."""

    def test_headerThenRest(self) -> None:
        """A v2 header fed in two parts (the first past its fixed 16 bytes) gives the client address once whole, and the bytes after it."""
        from tests.test_proxied import v2

        header = v2("192.0.2.5", 40001)
        parser = proxyV2Parser()
        self.assertEqual(parser.feed(header[:20]), (None, None))  # primecount feeds it the 16-byte prefix whole
        info, rest = parser.feed(header[20:] + b"request\n")
        self.assertEqual((info.source.host, info.source.port, rest), ("192.0.2.5", 40001, b"request\n"))
