"""Tests for L{primecount.descriptors}: socket objects on existing descriptors leave their blocking mode alone,
on CPython and on PyPy (whose socket objects otherwise set it from the default timeout)."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from primecount.descriptors import isNonBlocking, socketOn, socketsMadeIn
from primecount.workers import SharedSocketEndpoint, socketFamily


def listeningSocket(test: SynchronousTestCase, family: int = socket.AF_INET, blocking: bool = False) -> socket.socket:
    """A loopback listening socket in the given mode, closed after C{test}."""
    listening = socket.socket(family)
    test.addCleanup(listening.close)
    listening.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    listening.listen()
    listening.setblocking(blocking)
    return listening


class SocketOnTests(SynchronousTestCase):
    """L{socketOn} gives a socket object on a duplicate without changing the open file's mode."""

    def test_nonBlockingStaysNonBlocking(self) -> None:
        """A non-blocking descriptor is non-blocking while the object exists and after (PyPy's plain
        C{socket.socket(fileno=...)} makes it blocking)."""
        fd = listeningSocket(self).fileno()
        with socketOn(fd) as handle:
            self.assertTrue(isNonBlocking(fd))
            self.assertEqual(handle.family, socket.AF_INET)
            self.assertNotEqual(handle.fileno(), fd)
        self.assertTrue(isNonBlocking(fd))

    def test_blockingStaysBlocking(self) -> None:
        """A blocking descriptor stays blocking (a default timeout of 0 would make it non-blocking)."""
        fd = listeningSocket(self, blocking=True).fileno()
        with socketOn(fd):
            self.assertFalse(isNonBlocking(fd))
        self.assertFalse(isNonBlocking(fd))

    def test_defaultTimeoutRestored(self) -> None:
        """The default timeout is what it was before, after an error inside too."""
        previous = socket.getdefaulttimeout()
        self.addCleanup(socket.setdefaulttimeout, previous)
        socket.setdefaulttimeout(3.0)
        with socketsMadeIn(nonBlocking=True):
            self.assertEqual(socket.getdefaulttimeout(), 0.0)
        self.assertEqual(socket.getdefaulttimeout(), 3.0)
        with self.assertRaises(ZeroDivisionError):
            with socketsMadeIn(nonBlocking=False):
                self.assertIsNone(socket.getdefaulttimeout())
                1 / 0
        self.assertEqual(socket.getdefaulttimeout(), 3.0)


class AdoptingReactor:
    """Just enough of a reactor for Twisted's adopted-socket endpoint: records the default timeout and the
    socket's mode when asked to adopt."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, object, bool]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: Any) -> object:
        """Record the call and what the process looked like then."""
        self.adopted.append((fd, family, socket.getdefaulttimeout(), isNonBlocking(fd)))
        return object()


class SharedSocketEndpointTests(SynchronousTestCase):
    """A worker adopts its inherited socket with new socket objects made non-blocking, so the shared socket never
    turns blocking, for a moment either."""

    def test_adoptsWhileSocketsAreMadeNonBlocking(self) -> None:
        """Twisted adopts the descriptor (its family asked without changing its mode) while the default timeout
        is 0; after, the default is back and the socket non-blocking."""
        listening = listeningSocket(self, socket.AF_INET6)
        reactor = AdoptingReactor()
        inherited = os.dup(listening.fileno())  # as a worker's descriptor 3: the endpoint closes it once adopted
        endpoint = SharedSocketEndpoint(reactor, inherited)
        self.successResultOf(endpoint.listen(Factory.forProtocol(Protocol)))
        self.assertEqual(reactor.adopted, [(inherited, socket.AF_INET6, 0.0, True)])
        self.assertRaises(OSError, os.fstat, inherited)
        self.assertIsNone(socket.getdefaulttimeout())
        self.assertTrue(isNonBlocking(listening.fileno()))

    def test_family(self) -> None:
        """L{socketFamily} tells IPv4 from IPv6 and leaves the socket non-blocking."""
        for family in (socket.AF_INET, socket.AF_INET6):
            listening = listeningSocket(self, family)
            self.assertEqual(socketFamily(listening.fileno()), family)
            self.assertTrue(isNonBlocking(listening.fileno()))

