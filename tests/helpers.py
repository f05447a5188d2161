"""Shared test fixtures: a synchronous stand-in for the thread pool and a protocol wired to a clock."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.connection import RequestLimits
from primecount.factory import PrimeCountFactory
from primecount.protocol import BusyProtocol, PrimeCountProtocol
from primecount.records.formats import Record
from primecount.responder import REPLY_DEADLINE, Responder


class InlineThreads:
    """Runs 'thread pool' work at once in the calling thread, counting the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run C{function(*args)} now and return its result as a fired Deferred."""
        self.calls.append((function, args))
        return succeed(function(*args))


class MemoryRecords:
    """A records sink that keeps records in a list; C{hold} makes writes wait until released."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.batches: list[int] = []
        self.hold = False
        self.waiting: list[Deferred[None]] = []
        self.told: list[bool] = []  # each gathering() call

    def write(self, records: Sequence[Record]) -> Deferred[None]:
        """Store C{records} now, or queue their acknowledgement while held."""
        self.records.extend(records)
        self.batches.append(len(records))
        acknowledged: Deferred[None] = Deferred()
        if self.hold:
            self.waiting.append(acknowledged)
        else:
            acknowledged.callback(None)
        return acknowledged

    def gathering(self, analysing: bool) -> None:
        """Keep what the responder said of its analysis."""
        self.told.append(analysing)

    def release(self) -> None:
        """Acknowledge every held batch."""
        waiting, self.waiting = self.waiting, []
        for acknowledged in waiting:
            acknowledged.callback(None)


class RecordingMetrics:
    """Collects metrics events as tuples."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args: self.events.append((name, *args))


class HalfCloseTransport(StringTransport):
    """A L{StringTransport} that can also close only its writing side, as TCP can."""

    writeClosed = False

    def loseWriteConnection(self) -> None:
        """Remember that FIN was sent."""
        self.writeClosed = True


def requestFactory(*arguments: Any, **keywords: Any) -> PrimeCountFactory:
    """A L{PrimeCountFactory} of primecount's own protocols, as the plugin builds it."""
    return PrimeCountFactory(*arguments, protocol=PrimeCountProtocol, busyProtocol=BusyProtocol, **keywords)


class ProtocolHarness:
    """One protocol on a L{StringTransport}, with a L{Clock}, inline threads and in-memory records."""

    def __init__(
        self, limits: RequestLimits = RequestLimits(), records: Any = None, peer: str = "192.0.2.7",
        factory: Any = None, replyDeadline: float = REPLY_DEADLINE,
    ) -> None:
        self.clock = Clock()
        self.threads = InlineThreads()
        self.records = records if records is not None else MemoryRecords()
        self.metrics = RecordingMetrics()
        self.factory = factory or requestFactory(
            limits, self.clock, Responder(self.clock, self.threads, self.records, replyDeadline), self.metrics
        )
        self.transport = HalfCloseTransport(peerAddress=_tcpAddress(peer))
        self.protocol: PrimeCountProtocol = self.factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)

    def send(self, *chunks: bytes) -> None:
        """Deliver C{chunks} one C{dataReceived} call each, then let the current turn finish."""
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        self.clock.advance(0)

    def endOfInput(self) -> None:
        """The client half-closes its side."""
        self.protocol.readConnectionLost()
        self.clock.advance(0)

    def reply(self) -> bytes:
        """What the server has written so far."""
        return self.transport.value()

    @property
    def closed(self) -> bool:
        """Whether the server has closed the connection or, lingering after an error, its writing side."""
        return bool(self.transport.disconnecting or self.transport.writeClosed)


def _tcpAddress(host: str) -> Any:
    from twisted.internet.address import IPv4Address, IPv6Address

    if ":" in host:
        return IPv6Address("TCP", host, 40000)
    return IPv4Address("TCP", host, 40000)


def expectedReply(message: str) -> bytes:
    """The reply the protocol promises for C{message}, computed here independently of the package."""
    text = message.strip()
    count = text.count(text[-1])
    prime = count > 1 and all(count % d for d in range(2, int(count**0.5) + 1))
    return f"{count} {'sí' if prime else 'no'}\n".encode()


def ask(port: int, payload: bytes, host: str = "127.0.0.1", halfClose: bool = False, timeout: float = 10.0,
        source: str = "") -> bytes:
    """Send C{payload} over a real TCP connection (from the local address C{source}, if given) and return
    everything the server sends before closing."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        if source:
            connection.bind((source, 0))
        connection.connect((host, port))
        connection.sendall(payload)
        if halfClose:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a connection to C{host}:C{port} is accepted (it is then closed without a request)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def slow(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark an end-to-end test that takes seconds; C{PRIMECOUNT_SKIP_SLOW=1} skips these locally, CI runs them."""
    import functools
    import os

    from twisted.trial.unittest import SkipTest

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("PRIMECOUNT_SKIP_SLOW") == "1":
            raise SkipTest("slow end-to-end test skipped: PRIMECOUNT_SKIP_SLOW=1")
        return test(*args, **kwargs)

    run.slow = True  # type: ignore[attr-defined]
    return run


def requireTool(test: SynchronousTestCase, name: str) -> str:
    """The path of C{name}; skip without it, or fail where C{PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1} (CI)."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1":
            test.fail(f"{name} is required here (PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1)")
        raise SkipTest(f"{name} is not installed")
    return path


def requireModule(test: SynchronousTestCase, name: str) -> object:
    """Module C{name}; skip without it, or fail where C{PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1} (CI) on CPython, where
    the test extra installs it (pandas and DuckDB have no builds for PyPy)."""
    import importlib
    import platform

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1" and platform.python_implementation() == "CPython":
            test.fail(f"{name} is required here (PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1)")
        raise SkipTest(f"{name} is not installed (the test extra installs it on CPython)")


def listeningInodes(port: int, tables: Sequence[str] = ("/proc/net/tcp", "/proc/net/tcp6")) -> set[str]:
    """The inodes of the sockets listening on C{port}, from the kernel's C{tables}."""
    inodes = set()
    for table in tables:
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    return inodes


def waitUntil(condition, seconds: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll C{condition} until true; fail after C{seconds}."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def answeredUnderLoad(clients: Sequence[str], seconds: float, send: Callable[[str, bytes], bytes],
                      meanwhile: Callable[[], None] = lambda: None) -> list[str]:
    """Each client, in its own thread, sends request after request for C{seconds} through C{send(client,
    payload)}; C{meanwhile} runs in this thread as they do. The messages that got their correct reply."""
    import threading

    answered: list[str] = []
    stop = time.monotonic() + seconds

    def client(name: str) -> None:
        number = 0
        while time.monotonic() < stop:
            message = f"{name} request {number}"
            number += 1
            try:
                if send(name, message.encode() + b"\n") == expectedReply(message):
                    answered.append(message)
            except OSError:
                pass

    threads = [threading.Thread(target=client, args=(name,)) for name in clients]
    for thread in threads:
        thread.start()
    meanwhile()
    for thread in threads:
        thread.join()
    return answered


def threadPolicies(pid: int) -> dict[int, int]:
    """The scheduling policy of each thread of process C{pid} but its main one, by thread id."""
    return {int(task): os.sched_getscheduler(int(task)) for task in os.listdir(f"/proc/{pid}/task") if int(task) != pid}


def scrape(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """GET /metrics of C{host}:C{port} and return its samples by name (with labels)."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


class FollowingProcess:
    """A test mixin: C{primecount-records follow} in a child process, its output lines gathered by a thread,
    ended with Ctrl-C as a user would."""

    def startFollowing(self, *arguments: str) -> "subprocess.Popen[str]":
        """Start C{python -m primecount.records follow *arguments}; its stdout lines go to C{self.printed}.

        SIGINT is given back its default in the child: a test run from a background job would otherwise
        pass on an ignored SIGINT, and Python would then never raise KeyboardInterrupt.
        """
        import queue
        import signal
        import sys
        import threading

        process = subprocess.Popen([sys.executable, "-m", "primecount.records", "follow", *arguments],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.printed: "queue.Queue[str]" = queue.Queue()
        self.reader = threading.Thread(target=lambda: [self.printed.put(line) for line in process.stdout],
                                       daemon=True)
        self.reader.start()
        return process

    def interrupt(self, process: "subprocess.Popen[str]") -> None:
        """Ctrl-C, as a user ends C{follow}; wait for it and its reader."""
        import signal

        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
        self.reader.join(10)

    def nextMessage(self, process: "subprocess.Popen[str]", seconds: float = 10.0) -> str:
        """The message of the next record C{follow} prints, failing after C{seconds}."""
        import queue

        try:
            return self.printed.get(timeout=seconds).split("\t")[2]
        except queue.Empty:
            self.fail("follow printed nothing in time")  # type: ignore[attr-defined]


class ClientThreads:
    """Client threads sending unique messages to the server C{ports} names now (a list the test may change), one
    request per connection or all on kept connections, and sorting the replies: verified answers, C{ERROR
    storage unavailable}, anything else. A connection that breaks (its server was killed) is opened again.
    A port of 0 means no server now: the test sets it before a kill, so that no client connects to a dead
    server's port, which another test's server may take meanwhile and answer from its own records.
    Subclasses say what each message is (L{message})."""

    def __init__(self, ports: list[int], clients: int, keepAlive: bool = True) -> None:
        import threading

        self.ports = ports
        self.keepAlive = keepAlive
        self.answered: list[str] = []
        self.unavailable = 0
        self.other: list[bytes] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        for thread in self._threads:
            thread.start()

    def message(self, number: int, sent: int) -> str:
        """The C{sent}th message of client C{number}, unique among all clients'."""
        raise NotImplementedError()

    def _sort(self, message: str, reply: bytes) -> None:
        if reply == expectedReply(message):
            self.answered.append(message)
        elif reply == b"ERROR storage unavailable\n":
            self.unavailable += 1
        elif reply:
            self.other.append(reply)

    def _client(self, number: int) -> None:
        import socket

        sent = 0
        while not self._stop.is_set():
            try:
                port = self.ports[number % len(self.ports)]
                if not port:
                    time.sleep(0.01)
                    continue
                with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                    replies = connection.makefile("rb")
                    while not self._stop.is_set():
                        message = self.message(number, sent)
                        sent += 1
                        connection.sendall(message.encode() + b"\n")
                        self._sort(message, replies.readline())
                        if not self.keepAlive:
                            break
            except OSError:
                time.sleep(0.01)

    def stop(self) -> "ClientThreads":
        """Stop every client and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self


_SLOW_FSYNC_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>

/* fsync(2), made slow while the file SLOW_FSYNC_FLAG exists: it first sleeps SLOW_FSYNC_MS milliseconds. */
int fsync(int fd) {
    static int (*real)(int);
    const char *flag = getenv("SLOW_FSYNC_FLAG"), *ms = getenv("SLOW_FSYNC_MS");
    if (!real) real = (int (*)(int)) dlsym(RTLD_NEXT, "fsync");
    if (flag && ms && access(flag, F_OK) == 0) usleep(atoi(ms) * 1000);
    return real(fd);
}
"""


def slowFsync(test: SynchronousTestCase, milliseconds: int) -> tuple[dict[str, str], "os.PathLike[str]"]:
    """An environment for a server whose fsyncs each take C{milliseconds} more while a flag file exists (a slow
    disk, through a preloaded C{fsync} built here with the system's C compiler); the environment, and the flag
    file, which exists (remove it for a quick disk again)."""
    from pathlib import Path

    compiler = requireTool(test, "cc")
    folder = Path(test.mktemp()).resolve()
    folder.mkdir(parents=True)
    (folder / "slowfsync.c").write_text(_SLOW_FSYNC_SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(folder / "slowfsync.so"), str(folder / "slowfsync.c"),
                    "-ldl"], check=True, capture_output=True)
    flag = folder / "slow"
    flag.touch()
    environment = {**os.environ, "LD_PRELOAD": str(folder / "slowfsync.so"), "SLOW_FSYNC_FLAG": str(flag),
                   "SLOW_FSYNC_MS": str(milliseconds)}
    return environment, flag
