"""Tests for L{primecount.readiness}: sd_notify messages on a real Unix datagram socket, from a real twistd."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from primecount.readiness import Readiness, notify
from primecount.tools.serverprocess import TWISTD
from tests.helpers import ask, expectedReply, slow


class NotifySocket:
    """A Unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, test: SynchronousTestCase, abstract: bool = False) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"primecount-test-{os.getpid()}-{id(self)}"
            self.socket.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(tempfile.mkdtemp(), "notify")
            self.socket.bind(self.address)
        self.socket.settimeout(30)
        test.addCleanup(self.socket.close)

    def receive(self) -> str:
        """The next message."""
        return self.socket.recv(4096).decode("utf-8")


class FakeReactor:
    """Runs C{callWhenRunning} calls at once."""

    def callWhenRunning(self, function, *args):  # type: ignore[no-untyped-def]
        """Call now."""
        function(*args)


class NotifyTests(SynchronousTestCase):
    """C{notify} speaks the sd_notify datagram protocol, and is silent outside systemd."""

    def test_pathSocket(self) -> None:
        """A message reaches a socket named by a path."""
        channel = NotifySocket(self)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": channel.address}))
        self.assertEqual(channel.receive(), "READY=1")

    def test_abstractSocket(self) -> None:
        """An '@' name is an abstract socket, as systemd may give."""
        channel = NotifySocket(self, abstract=True)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": channel.address}))
        self.assertEqual(channel.receive(), "STOPPING=1")

    def test_noSocket(self) -> None:
        """Without NOTIFY_SOCKET nothing is sent and nothing fails."""
        self.assertFalse(notify("READY=1", {}))

    def test_serviceWaitsForReady(self) -> None:
        """READY=1 waits for the given Deferred; stopping says STOPPING=1."""
        from twisted.internet.defer import Deferred

        channel = NotifySocket(self)
        ready: Deferred[None] = Deferred()
        service = Readiness(FakeReactor(), ready, {"NOTIFY_SOCKET": channel.address})
        service.startService()
        channel.socket.settimeout(0.2)
        self.assertRaises(socket.timeout, channel.receive)
        ready.callback(None)
        self.assertEqual(channel.receive(), "READY=1\nSTATUS=accepting requests")
        service.stopService()
        self.assertEqual(channel.receive(), "STOPPING=1\nSTATUS=draining")


class TwistdReadinessTests(SynchronousTestCase):
    """A real twistd tells a real notification socket it is ready only once its port accepts."""

    def serve(self, *options: str) -> None:
        """Start twistd primecount on a chosen port with NOTIFY_SOCKET set; check READY, a request, STOPPING."""
        channel = NotifySocket(self)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "primecount", "--port", f"tcp:{port}:interface=127.0.0.1",
             "--records", os.path.abspath(self.mktemp()), *options],
            env={**os.environ, "NOTIFY_SOCKET": channel.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            self.assertEqual(channel.receive(), "READY=1\nSTATUS=accepting requests")
            self.assertEqual(ask(port, b"abc2a\n", timeout=2), expectedReply("abc2a"))
            process.send_signal(signal.SIGTERM)
            self.assertEqual(channel.receive(), "STOPPING=1\nSTATUS=draining")
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        self.assertEqual(process.returncode, 0, output.decode(errors="replace"))
        self.log = output.decode("utf-8", errors="replace")

    def test_readyWhenListening(self) -> None:
        """READY=1 arrives when the port already answers; STOPPING=1 on SIGTERM."""
        self.serve()

    @slow
    def test_workersReadyWhenAllListen(self) -> None:
        """With --workers 2, READY=1 comes only after both workers accept."""
        self.serve("--workers", "2")
        ready = self.log.index("told systemd the service is ready")
        self.assertEqual(len(re.findall(r"worker \d: primecount listening on", self.log[:ready])), 2)
