"""Hostile clients and faults against a real twistd: slowloris, long lines, 10,000 idle connections,
per-address caps, a failing records device, and kill -9 under load."""

from __future__ import annotations

import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.records.formats import parseRecords
from primecount.tools.records import scan
from primecount.tools.serverprocess import TWISTD, ServerProcess
from tests.helpers import ask, expectedReply, requireTool, scrape, slow, slowFsync, waitUntil

LOOPBACK_BACKLOG = "tcp:0:interface=127.0.0.1:backlog=1024"


def serverRSS(pid: int) -> int:
    """Resident memory of process C{pid}, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def realClients(port: int, threads: int, requests: int, prefix: str) -> tuple[list[str], list[str]]:
    """Run C{threads} clients of C{requests} sequential requests each; return (answered, wrong or failed)."""
    answered: list[str] = []
    wrong: list[str] = []

    def client(number: int) -> None:
        for i in range(requests):
            message = f"{prefix} {number}-{i}"
            try:
                reply = ask(port, message.encode() + b"\n")
            except OSError as error:
                wrong.append(f"{message}: {error}")
                continue
            (answered if reply == expectedReply(message) else wrong).append(message)

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    return answered, wrong


class HostileClients:
    """Silent and trickling connections driven by one thread: what each received and when it ended."""

    def __init__(self, port: int, silent: int, tricklers: int, every: float = 0.1) -> None:
        self.every = every
        self.selector = selectors.DefaultSelector()
        self.results: dict[int, dict] = {}
        for n in range(silent + tricklers):
            connection = socket.create_connection(("127.0.0.1", port))
            connection.setblocking(False)
            self.results[n] = {"trickle": n >= silent, "start": time.monotonic(), "received": b"", "end": None,
                               "socket": connection}
            self.selector.register(connection, selectors.EVENT_READ, n)
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        nextTrickle = time.monotonic()
        while time.monotonic() < deadline and any(r["end"] is None for r in self.results.values()):
            now = time.monotonic()
            if now >= nextTrickle:
                for result in self.results.values():
                    if result["trickle"] and result["end"] is None and not result["received"]:
                        try:
                            result["socket"].send(b"x")
                        except OSError:
                            pass
                nextTrickle = now + self.every
            for key, _ in self.selector.select(max(0.0, nextTrickle - time.monotonic())):
                result = self.results[key.data]
                try:
                    chunk = result["socket"].recv(4096)
                except OSError:
                    chunk = b""
                if chunk:
                    result["received"] += chunk
                    result.setdefault("replyAt", time.monotonic())
                else:
                    result["end"] = time.monotonic()
                    self.selector.unregister(result["socket"])
                    result["socket"].close()

    def join(self) -> dict[int, dict]:
        """Wait for every hostile connection to be closed by the server."""
        self.thread.join(40)
        return self.results


class SlowlorisTests(SynchronousTestCase):
    """Silent and trickling clients cost the real ones nothing and are cut off at the deadline."""

    @slow
    def test_slowloris(self) -> None:
        """100 silent + 20 tricklers (a byte every 0.1 s) beside 50 real clients: all real requests answered,
        each hostile connection answered ERROR timeout at --timeout (±0.5 s). The quiet gap is off: a trickler
        delayed past it on a loaded machine would have its bytes answered as a request, not timed out."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--timeout", "3", "--quiet", "0", "--max-per-ip", "0",
                               port=LOOPBACK_BACKLOG)
        try:
            hostile = HostileClients(server.port, silent=100, tricklers=20)
            answered, wrong = realClients(server.port, threads=50, requests=10, prefix="real")
            results = hostile.join()
        finally:
            self.assertEqual(server.stop(), 0)
        self.assertEqual((len(answered), wrong), (500, []))
        for n, result in results.items():
            self.assertEqual(result["received"], b"ERROR timeout\n", n)
            self.assertLess(abs(result["replyAt"] - result["start"] - 3.0), 0.5, n)
            self.assertIsNotNone(result["end"], n)


class LingeringTests(SynchronousTestCase):
    """An ERROR reaches a client that is still sending."""

    @slow
    def test_megabyteLine(self) -> None:
        """A client sending a 1 MB line without reading gets ERROR line too long, not a reset."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-line", "65536", port=LOOPBACK_BACKLOG)
        try:
            for _ in range(5):
                with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
                    sender = threading.Thread(target=self.sendIgnoringErrors, args=(client, b"y" * 1_000_000))
                    sender.start()
                    received = b""
                    while chunk := client.recv(4096):
                        received += chunk
                    sender.join(10)
                self.assertEqual(received, b"ERROR line too long (max 65536 bytes)\n")
        finally:
            self.assertEqual(server.stop(), 0)

    @staticmethod
    def sendIgnoringErrors(client: socket.socket, data: bytes) -> None:
        """Send C{data}; the server may stop reading first."""
        try:
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class IdleConnectionTests(SynchronousTestCase):
    """Ten thousand idle connections cost descriptors and a little memory, never threads or service."""

    @slow
    def test_tenThousandIdle(self) -> None:
        """With 10,000 idle connections open, real requests are answered and the server stays under 150 MB."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 10_500:
            raise self.skipTest(f"the descriptor hard limit {hard} is below 10,500")
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 10_500), hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        server = ServerProcess(os.path.abspath(self.mktemp()), "--timeout", "120", "--max-per-ip", "0",
                               port=LOOPBACK_BACKLOG)
        idle: list[socket.socket] = []
        try:
            rssBefore = serverRSS(server.process.pid)
            for _ in range(10_000):
                idle.append(socket.create_connection(("127.0.0.1", server.port)))
            answered, wrong = realClients(server.port, threads=10, requests=20, prefix="beside idle")
            self.assertEqual((len(answered), wrong), (200, []))
            rss = serverRSS(server.process.pid)
            threads = len(os.listdir(f"/proc/{server.process.pid}/task"))
            for connection in idle[:100]:
                connection.setblocking(False)
                with self.assertRaises(BlockingIOError, msg="idle connections are still open, unanswered"):
                    connection.recv(1)
        finally:
            for connection in idle:
                connection.close()
            self.assertEqual(server.stop(), 0)
        print(f"\n    server RSS {rssBefore / 2**20:.1f} MB idle, {rss / 2**20:.1f} MB with 10,000 idle "
              f"connections ({(rss - rssBefore) / 10_000:.0f} bytes each); {threads} threads")
        self.assertLess(rss - rssBefore, 100 * 2**20, "10 KB a connection at most")
        self.assertLessEqual(threads, 1 + 10 + 1, "the reactor, at most 10 pool threads, nothing per connection")


class DescriptorLimitTests(SynchronousTestCase):
    """Under a small descriptor limit the server keeps below it whatever a flood does: refusals linger only
    while descriptors are free, so accept never fails with EMFILE."""

    def test_floodUnderTheLimit(self) -> None:
        """With 300 descriptors and 500 silent clients connecting at once: as many are served as the defaults
        allow, every other one reads C{ERROR busy} or is closed, the server never holds 300 descriptors, never
        logs EMFILE, and serves a newcomer once the flood is gone."""
        limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                   "(300, 300)); os.execv(sys.argv[1], sys.argv[1:])"]
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-per-ip", "0", "--timeout", "30",
                               "--metrics", "tcp:0:interface=127.0.0.1", prefix=limited, port=LOOPBACK_BACKLOG)
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        flood: list[socket.socket] = []
        mostDescriptors = 0
        try:
            for _ in range(500):
                flood.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
                if len(flood) % 50 == 0:
                    mostDescriptors = max(mostDescriptors, len(os.listdir(f"/proc/{server.process.pid}/fd")))
            def everyOneAccepted() -> bool:
                samples = scrape(metricsPort)
                busy = sum(value for name, value in samples.items() if name.startswith("primecount_busy_refusals_total"))
                return samples["primecount_open_connections"] + busy == 500

            waitUntil(everyOneAccepted, what="every client to be served or refused")
            self.assertEqual(scrape(metricsPort)["primecount_open_connections"], 151, "the default for 300")
            mostDescriptors = max(mostDescriptors, len(os.listdir(f"/proc/{server.process.pid}/fd")))
            served, refused = 0, 0
            for client in flood:
                client.setblocking(False)
                try:
                    early = client.recv(100)
                except BlockingIOError:
                    served += 1
                    continue
                except ConnectionResetError:
                    early = b""
                self.assertIn(early, (b"ERROR busy\n", b""))
                refused += 1
            self.assertEqual((served, refused), (151, 349))
        finally:
            for client in flood:
                client.close()
        waitUntil(lambda: scrape(metricsPort)["primecount_open_connections"] == 0, what="the flood to be gone")
        self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        self.assertEqual(server.stop(), 0, server.log)
        self.assertLess(mostDescriptors, 300)
        self.assertNotIn("Too many open files", server.log)
        self.assertNotIn("EMFILE", server.log)


class PerAddressCapTests(SynchronousTestCase):
    """--max-per-ip over real sockets: the next connection from that address is busy, others are served."""

    @slow
    def test_cap(self) -> None:
        """With --max-per-ip 5, the sixth connection from 127.0.0.1 gets ERROR busy; 127.0.0.2 is served."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-per-ip", "5", "--timeout", "10",
                               port="tcp:0:interface=0.0.0.0")
        held = []
        try:
            for _ in range(5):
                held.append(socket.create_connection(("127.0.0.1", server.port)))
            self.assertEqual(ask(server.port, b"abc2a\n"), b"ERROR busy\n")
            with socket.socket() as other:
                other.bind(("127.0.0.2", 0))
                other.settimeout(10)
                other.connect(("127.0.0.1", server.port))
                other.sendall(b"abc2a\n")
                self.assertEqual(other.recv(100), "2 sí\n".encode())
            held.pop().close()
            # The server frees the place once it has seen the close; until then the answer is still busy.
            deadline = time.monotonic() + 10
            while (reply := ask(server.port, b"abc2a\n")) == b"ERROR busy\n" and time.monotonic() < deadline:
                pass
            self.assertEqual(reply, "2 sí\n".encode())
        finally:
            for connection in held:
                connection.close()
            self.assertEqual(server.stop(), 0)
        self.assertIn("answered ERROR busy to 1 connections (last from 127.0.0.1)", server.log)


class BufferBudgetTests(SynchronousTestCase):
    """C{--max-buffered} bounds the request bytes all connections hold: past it, the connection whose bytes
    would pass it gets C{ERROR busy}, while whole lines are answered as ever."""

    def test_partialLinesPastTheBudgetAreBusy(self) -> None:
        """20 clients each hold 60,000 bytes of an unfinished line against a 200,000-byte budget: three or four
        fit, every other one reads C{ERROR busy} (counted under C{buffered}); a whole line is still answered,
        and the ones that fit get their answers once they end their lines."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--max-buffered", "200000", "--max-per-ip", "0",
                               "--timeout", "30", "--quiet", "0", "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
        clients = []
        try:
            for _ in range(20):
                client = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                client.sendall(b"a" * 60_000)
                clients.append(client)
            scraped: list[dict[str, float]] = []

            def everyByteRead() -> bool:
                scraped[:] = [scrape(metricsPort)]
                held = scraped[0]["primecount_buffered_request_bytes"]
                return held % 60_000 == 0 and held / 60_000 + self.busy(scraped[0]) == 20

            waitUntil(everyByteRead, what="the server to read every client's bytes")
            fits = int(scraped[0]["primecount_buffered_request_bytes"] // 60_000)
            self.assertEqual(fits, 3, "as many whole partial lines as the budget holds")
            self.assertEqual(ask(server.port, b"whole\n"), expectedReply("whole"))
            replies = []
            for client in clients:
                client.sendall(b"\n")
                replies.append(client.makefile("rb").readline())
            self.assertEqual(sorted(replies), sorted([expectedReply("a" * 60_000)] * 3 + [b"ERROR busy\n"] * 17))
            waitUntil(lambda: scrape(metricsPort)["primecount_buffered_request_bytes"] == 0, what="nothing held")
        finally:
            for client in clients:
                client.close()
            self.assertEqual(server.stop(), 0, server.log)

    @staticmethod
    def busy(samples: dict[str, float]) -> float:
        """Connections refused for the buffer budget."""
        return samples['primecount_busy_refusals_total{limit="buffered"}']


class ErrorLoggingTests(SynchronousTestCase):
    """Every ERROR reply is logged, the same way with and without C{--metrics}: summarised per reply, at most a
    line a second each, the counts adding up to what was sent."""

    def test_floodSummarised(self) -> None:
        """100 each of empty lines, invalid UTF-8 and lines too long, one connection each: the log's counts for
        each reply add up to 100, in at most a line per second of the flood (and one more), with or without
        metrics."""
        import re

        for extra in ([], ["--metrics", "tcp:0:interface=127.0.0.1"]):
            server = ServerProcess(os.path.abspath(self.mktemp()), "--max-line", "10", "--max-per-ip", "0", *extra)
            started = time.monotonic()
            try:
                for payload in (b"\n", b"\xff\n", b"x" * 20 + b"\n") * 100:
                    ask(server.port, payload, halfClose=True)
                elapsed = time.monotonic() - started
            finally:
                self.assertEqual(server.stop(), 0, server.log)
            for reply in ("ERROR empty message", "ERROR invalid UTF-8", "ERROR line too long (max 10 bytes)"):
                lines = re.findall(rf"{re.escape(reply)} to (?:(\d+) requests|127\.0\.0\.1$)", server.log, re.M)
                self.assertEqual(sum(int(count or 1) for count in lines), 100, (extra, reply, server.log))
                self.assertLessEqual(len(lines), elapsed + 2, (extra, reply))


class FifoReader:
    """Reads a FIFO in a thread of its own, once told to start, until stopped; what it read is C{data}."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # the FIFO has a reader from now on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self.data = b""

    def start(self) -> None:
        """Read from now on."""
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                chunk = b""
            self.data += chunk
            if not chunk:
                time.sleep(0.01)

    def stop(self) -> None:
        """Stop reading, and close the FIFO."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        os.close(self._fd)


class LaggingReactorTests(SynchronousTestCase):
    """A reactor that falls behind (here held in a blocking write of a record to a FIFO that is full) runs its
    timers before it reads: a quiet gap that ended by the clock meanwhile must not cut a message whose second
    part had already arrived."""

    def test_messageSplitWhileTheReactorLags(self) -> None:
        """C{abc2}, then, while the reactor is held past the quiet gap, C{a\\n}: the reply is C{2 sí} and the
        record is of C{abc2a}, not C{1 no} for C{abc2}."""
        folder = self.mktemp()
        os.makedirs(folder)
        fifo = os.path.join(folder, "records.fifo")
        os.mkfifo(fifo)
        reader = FifoReader(fifo)
        self.addCleanup(reader.stop)
        server = ServerProcess(fifo, "--quiet", "1")
        self.addCleanup(server.stop)
        split = socket.create_connection(("127.0.0.1", server.port), timeout=20)
        self.addCleanup(split.close)
        split.sendall(b"abc2")
        time.sleep(0.3)  # read by the server by now: its quiet gap runs from here
        filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            while True:
                os.write(filler, b"\n" * 4096)
        except BlockingIOError:
            pass  # full: the server's next record blocks its reactor until the FIFO is read
        finally:
            os.close(filler)
        other = threading.Thread(target=ask, args=(server.port, b"x\n"), daemon=True)
        other.start()
        waitUntil(lambda: "pipe_write" in Path(f"/proc/{server.process.pid}/wchan").read_text(), 20,
                  "the reactor to be held writing the other request's record")
        split.sendall(b"a\n")
        time.sleep(1.5)  # the gap is over by the clock while the reactor is held
        reader.start()
        reply = b""
        while chunk := split.recv(1024):
            reply += chunk
        self.assertEqual(reply, "2 sí\n".encode())
        other.join(20)
        self.assertEqual(server.stop(), 0, server.log)
        messages = [record.message for record in parseRecords(reader.data.decode("utf-8").strip("\n").splitlines(True))]
        self.assertEqual(sorted(messages), ["abc2a", "x"])


class ThreadStartFailureTests(SynchronousTestCase):
    """A process that cannot start a thread (its address space limited below one more thread's stack) answers
    every request C{ERROR internal error} at once, and serves again once it can."""

    def test_noThreadForAnalysis(self) -> None:
        """With the soft C{RLIMIT_AS} set just above what twistd uses (a thread's stack is 64 MiB here), twenty
        clients at once each get C{ERROR internal error}, the failure is logged, and nothing is recorded; with
        the limit lifted the next request is answered and recorded."""
        prlimit = requireTool(self, "prlimit")
        records = self.mktemp()
        server = ServerProcess(records, prefix=[prlimit, f"--stack={64 << 20}"])
        self.addCleanup(server.stop)
        pid = server.process.pid
        with open(f"/proc/{pid}/status") as status:
            size = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) * 1024
        subprocess.run([prlimit, "--pid", str(pid), f"--as={size + (32 << 20)}:"], check=True)
        replies: list[bytes] = []
        clients = [threading.Thread(target=lambda n=n: replies.append(ask(server.port, b"abc2a %d\n" % n, timeout=30)))
                   for n in range(20)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(60)
        self.assertEqual(replies, [b"ERROR internal error\n"] * 20)
        server.waitFor(rb"analysing a batch of \d+ requests failed")
        subprocess.run([prlimit, "--pid", str(pid), "--as=unlimited:"], check=True)
        self.assertEqual(ask(server.port, b"abc2a\n"), expectedReply("abc2a"))
        self.assertEqual(server.stop(), 0, server.log)
        with open(records, encoding="utf-8") as lines:
            self.assertEqual([record.message for record in parseRecords(lines)], ["abc2a"])


class StorageFaultTests(SynchronousTestCase):
    """A failing records device gets ERROR storage unavailable, one log line, and recovers after SIGHUP."""

    @slow
    def test_failingDeviceThenReopen(self) -> None:
        """Records on /dev/full: every request is refused, logged once; repointed and reopened, service resumes."""
        folder = Path(os.path.abspath(self.mktemp()))
        folder.mkdir()
        records, good = folder / "records.txt", folder / "good.txt"
        records.symlink_to("/dev/full")
        server = ServerProcess(str(records), "--fsync", "always")
        try:
            refused = [ask(server.port, f"lost {i}\n".encode()) for i in range(20)]
            self.assertEqual(set(refused), {b"ERROR storage unavailable\n"})
            (folder / "next").symlink_to(good)
            os.replace(folder / "next", records)
            server.process.send_signal(signal.SIGHUP)
            server.waitFor(rb"reopened records file")
            self.assertEqual(ask(server.port, b"abc2a\n"), "2 sí\n".encode())
            server.waitFor(rb"works again after \d+ failures?")
        finally:
            self.assertEqual(server.stop(), 0)
        self.assertEqual(server.log.count("cannot write records file"), 1, server.log)
        with good.open(encoding="utf-8") as file:
            self.assertEqual([r.message for r in parseRecords(file)], ["abc2a"])


class UnwritableFileTests(SynchronousTestCase):
    """A records file that becomes unwritable while the server runs, other than by a full disk: refused, and
    unready until it is writable again, without a false recovery in between. (A file system cannot be
    remounted read-only while the server has its file open for writing.)"""

    @slow
    def test_immutableFile(self) -> None:
        """C{chattr +i} on the records file: requests are refused, the incident logged once as C{Operation not
        permitted}, C{/readyz} 503 throughout 3 s without traffic (no probe says it works, though the disk has
        room); C{chattr -i}: ready again by itself, and the next request is recorded."""
        chattr = requireTool(self, "chattr")
        from tests.test_fleet import httpGet

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        records = folder / "records.txt"
        server = ServerProcess(str(records), "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        metrics = server.metricsPort
        self.assertEqual(ask(server.port, b"before\n"), expectedReply("before"))
        opened = os.open(records, os.O_WRONLY | os.O_APPEND)
        self.addCleanup(os.close, opened)
        if subprocess.run([chattr, "+i", str(records)], capture_output=True).returncode != 0:
            raise SkipTest(f"this file system ({folder}) cannot make a file immutable")
        self.addCleanup(subprocess.run, [chattr, "-i", str(records)])
        try:
            os.write(opened, b"")
            raise SkipTest(f"this file system ({folder}) lets a descriptor opened before chattr +i write on")
        except PermissionError:
            pass  # as ext4 does: writes on the server's descriptor now fail too
        self.assertEqual(ask(server.port, b"refused\n"), b"ERROR storage unavailable\n")
        readiness = set()
        for _ in range(30):
            readiness.add(httpGet(metrics, "/readyz")[0])
            time.sleep(0.1)
        self.assertEqual(readiness, {503})
        subprocess.run([chattr, "-i", str(records)], check=True)
        waitUntil(lambda: httpGet(metrics, "/readyz")[0] == 200, 20, "/readyz to say ready once writable")
        self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        self.assertEqual(server.stop(), 0)
        self.assertEqual(server.log.count("cannot write records file"), 1, server.log)
        self.assertIn("Operation not permitted", server.log)
        self.assertEqual(server.log.count("write works again after"), 1, server.log)
        self.assertEqual([r.message for r in parseRecords(records.read_text(encoding="utf-8").splitlines(True))],
                         ["before", "after"])


class SlowDiskTests(SynchronousTestCase):
    """A disk whose fsyncs take seconds, under C{--fsync always}: every reply waits for one, so the store says so."""

    @slow
    def test_slowFsyncIsHeard(self) -> None:
        """fsyncs of 2 s: the request is still answered and recorded, but the incident is logged once, counted,
        and C{/readyz} says 503 while it lasts; once fsyncs are quick again, C{/readyz} says 200 by itself."""
        from tests.test_fleet import httpGet

        environment, flag = slowFsync(self, 2000)
        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records, "--fsync", "always", "--metrics", "tcp:0:interface=127.0.0.1",
                               environment=environment)
        self.addCleanup(server.stop)
        metrics = server.metricsPort
        answered: list[bytes] = []
        client = threading.Thread(target=lambda: answered.append(ask(server.port, b"abc2a\n")))
        client.start()
        server.waitFor(rb"an fsync has taken over 1 s")
        self.assertEqual(httpGet(metrics, "/readyz"), (503, "not ready: records store unavailable\n"))
        client.join(30)
        self.assertEqual(answered, [expectedReply("abc2a")])
        os.unlink(flag)
        waitUntil(lambda: httpGet(metrics, "/readyz")[0] == 200, 20, "/readyz to say ready once fsyncs are quick")
        self.assertEqual(ask(server.port, b"quick\n"), expectedReply("quick"))
        samples = scrape(metrics)
        self.assertEqual(samples['primecount_records_incidents_total{kind="slow_fsync"}'], 1.0)
        self.assertEqual(server.stop(), 0)
        self.assertEqual(server.log.count("an fsync has taken over"), 1, server.log)
        self.assertEqual(server.log.count("fsyncs are quick again"), 1, server.log)
        with open(records, encoding="utf-8") as lines:
            self.assertEqual([record.message for record in parseRecords(lines)], ["abc2a", "quick"])


class KillTests(SynchronousTestCase):
    """kill -9 at random moments under load never loses an answered request or leaves a malformed line."""

    @slow
    def test_killNineRounds(self) -> None:
        """Ten rounds of load and SIGKILL on one records file: every answered message is recorded, no damage."""
        records = os.path.abspath(self.mktemp())
        answeredAll: list[str] = []
        rng = random.Random(20261126)
        for round in range(10):
            server = ServerProcess(records, "--max-per-ip", "0", port=LOOPBACK_BACKLOG)
            stop = threading.Event()
            answered: list[str] = []

            def client(number: int) -> None:
                for i in range(1_000_000):
                    if stop.is_set():
                        return
                    message = f"kill {round}-{number}-{i}"
                    try:
                        if ask(server.port, message.encode() + b"\n", timeout=5) == expectedReply(message):
                            answered.append(message)
                    except OSError:
                        return

            workers = [threading.Thread(target=client, args=(n,)) for n in range(4)]
            for worker in workers:
                worker.start()
            time.sleep(rng.uniform(0.2, 0.8))  # a random moment under load
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
            stop.set()
            for worker in workers:
                worker.join(10)
            result = scan(records)
            self.assertEqual(result.malformed, [], f"round {round}")
            with open(records, encoding="utf-8", newline="\n") as file:
                recorded = {r.message for r in parseRecords(file)}
            answeredAll += answered
            self.assertEqual([m for m in answered if m not in recorded], [], f"round {round}: answered, not recorded")
        self.assertGreater(len(answeredAll), 1000)
        print(f"\n    10 kill -9 rounds: {len(answeredAll)} answered requests, all recorded; "
              f"{scan(records).records} records, file clean")


class StartupFailureTests(SynchronousTestCase):
    """Bad options and unusable paths stop twistd before it listens, naming what is wrong."""

    def twistd(self, *options: str) -> subprocess.CompletedProcess:
        """Run twistd primecount with C{options} and return how it ended."""
        return subprocess.run([*TWISTD, "-n", "--pidfile=", "primecount", "--port", "tcp:0:interface=127.0.0.1",
                               *options], capture_output=True, text=True, timeout=60)

    def test_recordsIsADirectory(self) -> None:
        """A directory as the records file is refused, naming it."""
        folder = os.path.abspath(self.mktemp())
        os.mkdir(folder)
        result = self.twistd("--records", folder)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"--records: cannot append to '{folder}': Is a directory", result.stderr + result.stdout)
        self.assertNotIn("starting on", result.stdout)

    def test_readOnlyFileSystemNamed(self) -> None:
        """A records file, existing or not, on a read-only file system is refused as that, not as a permission."""
        from tests.test_fleet import smallDisk

        disk = smallDisk(self)
        (disk / "existing.txt").touch()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        for name in ("existing.txt", "new.txt"):
            result = self.twistd("--records", str(disk / name))
            self.assertEqual(result.returncode, 1)
            self.assertIn(f"--records: cannot append to '{disk / name}': Read-only file system", result.stderr)
            self.assertNotIn("Permission denied", result.stderr)

    def test_tooFewDescriptors(self) -> None:
        """Under a descriptor limit of 100 (soft and hard), one process or a supervisor of two workers stops at
        once with one line naming the limit, exit 1, and never listens."""
        prlimit = requireTool(self, "prlimit")
        for workers in ("1", "2"):
            result = subprocess.run(
                [prlimit, "--nofile=100", *TWISTD, "-n", "--pidfile=", "primecount", "--port",
                 "tcp:0:interface=127.0.0.1", "--records", os.path.abspath(self.mktemp()), "--workers", workers],
                capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
            self.assertIn("primecount: the descriptor limit (RLIMIT_NOFILE) is 100 (hard 100), which leaves room for "
                          "1 connections", result.stderr)
            self.assertNotIn("listening on", result.stdout)

    def test_badOptionNamed(self) -> None:
        """A bad value names its option and nothing listens."""
        for option, value in [("--max-connections", "0"), ("--max-per-ip", "many"), ("--fsync", "often"),
                              ("--metrics", "nonsense:1")]:
            result = self.twistd("--records", os.path.abspath(self.mktemp()), option, value)
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(option, result.stderr + result.stdout)
            self.assertNotIn("starting on", result.stdout)
