"""Tests for L{primecount.readiness}: sd_notify messages on a real Unix datagram socket, from a real twistd."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from typing import Callable

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from primecount.readiness import Readiness, notify, watchdogInterval
from primecount.tools.serverprocess import TWISTD, listeningPort
from tests.helpers import ask, expectedReply, slow, waitUntil


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

    def silentFor(self, seconds: float) -> bool:
        """Whether no message comes within C{seconds}."""
        self.socket.settimeout(seconds)
        try:
            self.socket.recv(4096)
        except socket.timeout:
            return True
        return False

    def receive(self, process: "subprocess.Popen[bytes] | None" = None, output: Callable[[], bytes] = bytes) -> str:
        """The next message, within 30 s; with C{process}, failing at once (with its C{output}) if it exits
        first."""
        deadline = time.monotonic() + 30
        while True:
            self.socket.settimeout(max(0.01, min(0.5, deadline - time.monotonic())))
            try:
                return self.socket.recv(4096).decode("utf-8")
            except socket.timeout:
                if process is not None and process.poll() is not None:
                    raise AssertionError(f"twistd exited ({process.returncode}) before its message:\n"
                                         f"{output().decode('utf-8', errors='replace')}") from None
                if time.monotonic() > deadline:
                    raise AssertionError("no message within 30 s:\n"
                                         f"{output().decode('utf-8', errors='replace')}") from None


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
        self.assertTrue(channel.silentFor(0.2))
        ready.callback(None)
        self.assertEqual(channel.receive(), "READY=1\nSTATUS=accepting requests")
        service.stopService()
        self.assertEqual(channel.receive(), "STOPPING=1\nSTATUS=draining")


class RunningClock(Clock):
    """A clock whose C{callWhenRunning} calls at once, as a running reactor would."""

    def callWhenRunning(self, function, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Call now."""
        function(*args, **kwargs)


class WatchdogTests(SynchronousTestCase):
    """WATCHDOG=1 at half of WATCHDOG_USEC, from the reactor's turns only, for this process only."""

    def test_interval(self) -> None:
        """Half the interval systemd gives; none without one, for another pid, or for nonsense."""
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "10000000"}, pid=7), 5.0)
        self.assertEqual(watchdogInterval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "7"}, pid=7), 5.0)
        for environ in ({}, {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "8"}, {"WATCHDOG_USEC": "0"},
                        {"WATCHDOG_USEC": "soon"}):
            self.assertIsNone(watchdogInterval(environ, pid=7), environ)

    def test_pingsOnlyAsTheClockTurns(self) -> None:
        """A ping at the start and each half interval; a clock that does not turn (a blocked reactor) sends
        none."""
        channel = NotifySocket(self)
        clock = RunningClock()
        service = Readiness(clock, environ={"NOTIFY_SOCKET": channel.address, "WATCHDOG_USEC": "2000000"})
        service.startService()
        self.assertEqual([channel.receive(), channel.receive()], ["READY=1\nSTATUS=accepting requests", "WATCHDOG=1"])
        self.assertTrue(channel.silentFor(0.1), "nothing more while the clock stands still")
        clock.advance(1.0)
        self.assertEqual(channel.receive(), "WATCHDOG=1")
        clock.pump([1.0, 1.0])
        self.assertEqual([channel.receive(), channel.receive()], ["WATCHDOG=1", "WATCHDOG=1"])


# Loaded into the twistd of the watchdog test through PYTHONPATH: SIGUSR1 makes the main thread, the reactor's,
# sleep in the signal handler, a reactor blocked on purpose.
BLOCKING_SITECUSTOMIZE = """
import signal, time
signal.signal(signal.SIGUSR1, lambda number, frame: time.sleep(2.0))
"""


class TwistdReadinessTests(SynchronousTestCase):
    """A real twistd tells a real notification socket it is ready only once its port accepts."""

    def serve(self, *options: str) -> None:
        """Start twistd primecount on a free port with NOTIFY_SOCKET set; check READY, a request, STOPPING.

        The port is the one the OS gives twistd (port 0), read from its log: a
        port found free by a probe and handed over can be taken meanwhile by
        another test's server, and twistd then exits at once, which left this
        waiting 30 s for a READY=1 that could not come. Its output is read all
        along, and a twistd that exits early fails the test with its log."""
        import threading

        channel = NotifySocket(self)
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1",
             "--records", os.path.abspath(self.mktemp()), *options],
            env={**os.environ, "NOTIFY_SOCKET": channel.address}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        output: list[bytes] = []
        reader = threading.Thread(target=lambda: output.extend(iter(lambda: process.stdout.read1(65536), b"")),
                                  daemon=True)
        reader.start()
        try:
            self.assertEqual(channel.receive(process, lambda: b"".join(output)), "READY=1\nSTATUS=accepting requests")
            # The listening line was written before READY=1 was sent; this test's reader may not have read it yet.
            waitUntil(lambda: listeningPort(b"".join(output).decode("utf-8", errors="replace")) is not None, 10,
                      "the listening line, written before READY=1")
            port = listeningPort(b"".join(output).decode("utf-8", errors="replace"))
            self.assertEqual(ask(port, b"abc2a\n", timeout=10), expectedReply("abc2a"))
            process.send_signal(signal.SIGTERM)
            self.assertEqual(channel.receive(process, lambda: b"".join(output)), "STOPPING=1\nSTATUS=draining")
            process.wait(30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
        self.log = b"".join(output).decode("utf-8", errors="replace")
        self.assertEqual(process.returncode, 0, self.log)

    def test_readyWhenListening(self) -> None:
        """READY=1 arrives when the port already answers; STOPPING=1 on SIGTERM."""
        self.serve()

    @slow
    def test_workersReadyWhenAllListen(self) -> None:
        """With --workers 2, READY=1 comes only after both workers accept."""
        self.serve("--workers", "2")
        ready = self.log.index("told systemd the service is ready")
        self.assertEqual(len(re.findall(r"worker \d: primecount listening on", self.log[:ready])), 2)


class TwistdWatchdogTests(SynchronousTestCase):
    """A real twistd under a fake systemd's watchdog: pings while its reactor turns, none while it is blocked."""

    @slow
    def test_blockedReactorStopsThePings(self) -> None:
        """With WATCHDOG_USEC of 0.4 s a ping comes every 0.2 s; while the reactor sleeps 2 s in a signal
        handler none comes; then they come again."""
        import time

        channel = NotifySocket(self)
        site = self.mktemp()
        os.makedirs(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as file:
            file.write(BLOCKING_SITECUSTOMIZE)
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1", "--records",
             os.path.abspath(self.mktemp())],
            env={**os.environ, "NOTIFY_SOCKET": channel.address, "WATCHDOG_USEC": "400000", "PYTHONPATH":
                 os.pathsep.join([site, os.environ.get("PYTHONPATH", "")])},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.communicate()))
        messages, arrivals = [], []

        def receiveFor(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                messages.append(channel.receive())
                arrivals.append(time.monotonic())

        while "READY=1\nSTATUS=accepting requests" not in messages:
            messages.append(channel.receive())
            arrivals.append(time.monotonic())
        receiveFor(1.5)
        pingsBefore = messages.count("WATCHDOG=1")
        self.assertGreaterEqual(pingsBefore, 3)
        process.send_signal(signal.SIGUSR1)
        signalledAt = time.monotonic()
        receiveFor(3.5)
        gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:]) if later > signalledAt]
        self.assertGreaterEqual(max(gaps), 1.7, "pings went on while the reactor was blocked")
        self.assertGreaterEqual(messages.count("WATCHDOG=1") - pingsBefore, 4, "the pings did not come back")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, output.decode(errors="replace"))
