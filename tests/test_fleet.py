"""Running a fleet, with real processes: readiness that follows a really full disk and comes back by itself,
a rolling replacement of workers under load that drops nothing and runs the new code on disk, and the real
HAProxy (Debian's, with the shipped configuration) taking an unready or draining instance out of rotation."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.records.formats import parseRecords
from primecount.tools.serverprocess import ServerProcess
from tests.helpers import accepts, ask, expectedReply, slow, waitUntil
from tests.systemd import NamespacedSystemd
from tests.test_haproxy import HAProxy, freePort

REPOSITORY = Path(__file__).resolve().parents[1]
UNITS = REPOSITORY / "contrib" / "systemd"
# What the test changes of the shipped service: this checkout's twistd and a records file in the test's folder,
# its log in a file (no journald here), and, because the interpreter lives in a home directory here, the service
# runs as root with homes visible; a checkout under /tmp (a CI clone may be) also needs the machine's /tmp.
# Every other line of the unit, hardening included, is the shipped one.
SERVICE_DROP_IN = """[Service]
ExecStart=
ExecStart={twistd} --nodaemon --pidfile= --logfile=- primecount --port systemd:domain=INET:name=primecount \
    --records {folder}/records.txt
DynamicUser=no
ProtectHome=no
StateDirectory=
WorkingDirectory={folder}
ReadWritePaths={folder}
StandardOutput=append:{folder}/service.log
StandardError=inherit
{privateTmp}"""
UNAVAILABLE = b"ERROR storage unavailable\n"


def httpGet(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """The status and body of C{GET path} on C{host}:C{port}."""
    reply = ask(port, f"GET {path} HTTP/1.0\r\n\r\n".encode(), host=host)
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode("utf-8")


def smallDisk(test: SynchronousTestCase, size: str = "1m") -> Path:
    """A folder on a tmpfs of C{size} of its own, unmounted after the test; skips where mounting is not
    allowed (CI runs as root, which may)."""
    folder = Path(test.mktemp()).resolve()
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "primecount-test", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1":
            test.fail(f"cannot mount a tmpfs here: {mounted.stderr}")
        raise SkipTest(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    test.addCleanup(subprocess.run, ["umount", "-l", str(folder)], check=False)
    return folder


def fill(folder: Path) -> Path:
    """Fill C{folder}'s file system until it has no room left; the filler file, whose removal repairs it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while True:
                file.write(b"\0" * 65536)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


class CountingClients:
    """Client threads, each sending unique one-line requests, one per connection, to C{port}, C{pause} seconds
    apart (a steady load, not the most the machine can make), and counting exactly what happened to each: a
    verified answer, C{ERROR storage unavailable} (with when it came), a refused or reset connection, a
    connection closed without a reply, anything else."""

    def __init__(self, port: int, clients: int, name: str, pause: float = 0.002, host: str = "127.0.0.1",
                 namespace: str = "") -> None:
        """C{clients} threads to C{host}:C{port}, each in the network namespace C{namespace} if given."""
        self.port = port
        self.host = host
        self.namespace = namespace
        self.answered: list[str] = []
        self.answeredAt: list[float] = []
        self.unavailableAt: list[float] = []
        self.unavailableTook: list[float] = []  # seconds from connect to each ERROR storage unavailable
        self.failures: Counter[str] = Counter()
        self.failedAt: list[tuple[float, float, str]] = []  # when each failed request began and ended, and how
        self.other: list[bytes] = []
        self._name = name
        self._pause = pause
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, number: int) -> None:
        if self.namespace:
            from tests.netns import enterNamespace

            enterNamespace(self.namespace)
        sent = 0
        while not self._stop.wait(self._pause):
            message = f"{self._name} client {number} request {sent}"
            sent += 1
            began = time.monotonic()
            try:
                with socket.create_connection((self.host, self.port), timeout=10) as connection:
                    connection.sendall(message.encode() + b"\n")
                    reply = connection.makefile("rb").readline()
            except ConnectionRefusedError:
                self._failed("refused", began)
                continue
            except ConnectionResetError:
                self._failed("reset", began)
                continue
            except OSError as error:
                self._failed(type(error).__name__, began)
                continue
            if reply == expectedReply(message):
                self.answered.append(message)
                self.answeredAt.append(time.monotonic())
            elif reply == UNAVAILABLE:
                self.unavailableAt.append(time.monotonic())
                self.unavailableTook.append(self.unavailableAt[-1] - began)
            elif not reply:
                self._failed("closed without a reply", began)
            else:
                self.other.append(reply)

    def _failed(self, kind: str, began: float) -> None:
        self.failures[kind] += 1
        self.failedAt.append((began, time.monotonic(), kind))

    def stop(self) -> "CountingClients":
        """Stop every client and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self


def recordedMessages(*paths: str) -> Counter[str]:
    """How many records each message has in the records files C{paths}."""
    counts: Counter[str] = Counter()
    for path in paths:
        with open(path, encoding="utf-8") as file:
            counts.update(record.message for record in parseRecords(file))
    return counts


class ReadinessOverTCPTests(SynchronousTestCase):
    """A real twistd's C{/readyz} follows its records store: a really full disk, then its repair."""

    @slow
    def test_fullDiskUnreadyThenReadyByItself(self) -> None:
        """Once a request has been refused for the full disk, C{/readyz} says 503 with the reason while
        C{/healthz} stays 200; after the repair, with no request sent meanwhile, C{/readyz} says 200 again
        by itself and requests are answered and recorded."""
        disk = smallDisk(self)
        server = ServerProcess(str(disk / "records.txt"), "--metrics", "tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        metrics = server.metricsPort
        self.assertEqual(httpGet(metrics, "/readyz"), (200, "ready\n"))
        self.assertEqual(ask(server.port, b"before\n"), expectedReply("before"))
        filler = fill(disk)
        sent = 0
        while ask(server.port, f"filling {sent}\n".encode()) != UNAVAILABLE:  # the file's last page had room
            sent += 1
            self.assertLess(sent, 1000, "no request refused on a full disk")
        self.assertEqual(httpGet(metrics, "/readyz"), (503, "not ready: records store unavailable\n"))
        self.assertEqual(httpGet(metrics, "/healthz"), (200, "alive\n"))
        time.sleep(2.5)  # two of the store's own probes find the disk still full
        self.assertEqual(httpGet(metrics, "/readyz")[0], 503)
        filler.unlink()
        repairedAt = time.monotonic()
        waitUntil(lambda: httpGet(metrics, "/readyz")[0] == 200, seconds=10, what="/readyz to say ready again")
        Logger().info("disk readiness figures: ready {seconds:.2f} s after the repair, {sent} requests written "
                      "before the first refusal", seconds=time.monotonic() - repairedAt, sent=sent)
        self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        self.assertEqual(server.stop(), 0, server.log)
        recorded = recordedMessages(server.records)
        self.assertEqual((recorded["before"], recorded["after"]), (1, 1))
        self.assertIn("primecount readiness: not ready: records store unavailable", server.log)
        self.assertIn("write works again", server.log)


class RollingReplacementTests(SynchronousTestCase):
    """SIGUSR2 to a real supervisor under load: every worker replaced, nothing refused, reset or unanswered,
    every answer recorded, the new workers running the code on disk now."""

    def copyOfTheCode(self) -> Path:
        """The package and its twistd dropin, copied where the test may change them."""
        folder = Path(self.mktemp()).resolve()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
        shutil.copytree(REPOSITORY / "primecount", folder / "primecount", ignore=ignore)
        shutil.copytree(REPOSITORY / "twisted" / "plugins", folder / "twisted" / "plugins", ignore=ignore)
        return folder

    @slow
    def test_replacedUnderLoadDroppingNothing(self) -> None:
        """Two workers replaced one at a time while 6 clients send requests: zero refused, reset or
        unanswered; each answer recorded once; the host ready throughout; the new workers log the version
        written on disk after the supervisor started."""
        code = self.copyOfTheCode()
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")])}
        server = ServerProcess(self.mktemp(), "--workers", "2", "--metrics", "tcp:0:interface=127.0.0.1",
                               environment=environment)
        self.addCleanup(server.stop)
        server.waitForWorkers(2)
        metrics = server.metricsPort
        waitUntil(lambda: httpGet(metrics, "/readyz") == (200, "ready: 2 of 2 workers ready\n"),
                  what="both workers ready")
        initFile = code / "primecount" / "__init__.py"
        initFile.write_text(initFile.read_text().replace('__version__ = "', '__version__ = "9.9.9+rolled-'))
        clients = CountingClients(server.port, 6, "rolling")
        readiness: list[int] = []
        try:
            waitUntil(lambda: len(clients.answered) >= 200, what="load before the replacement")
            server.signal(signal.SIGUSR2)
            signalledAt = time.monotonic()
            while "replaced every worker" not in server.log:
                readiness.append(httpGet(metrics, "/readyz")[0])
                try:
                    server.waitFor(rb"replaced every worker", seconds=0.2)
                except RuntimeError:
                    if server.process.poll() is not None:
                        raise
            answeredBefore = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answeredBefore + 200, what="load after the replacement")
        finally:
            clients.stop()
        self.assertEqual(server.stop(), 0, server.log)
        failed = [(round(began - signalledAt, 2), round(ended - signalledAt, 2), kind)
                  for began, ended, kind in clients.failedAt]
        self.assertEqual((dict(clients.failures), clients.unavailableAt, clients.other), ({}, [], []),
                         f"failed requests (began, ended, s after SIGUSR2; how): {failed}; the log:\n{server.log}")
        self.assertEqual(set(readiness), {200}, "the host was not ready at some point of the replacement")
        Logger().info("rolling figures: {answered} answered, {probes} /readyz probes all 200, failures {failures}",
                      answered=len(clients.answered), probes=len(readiness), failures=dict(clients.failures))
        recorded = recordedMessages(server.records)
        self.assertEqual([m for m in clients.answered if recorded[m] != 1], [])
        started = re.findall(r"#info\] worker (\d): primecount (\d\S*) on ", server.log)  # relayed start lines
        self.assertEqual(sorted(started), [("1", "0.1.0"), ("1", "9.9.9+rolled-0.1.0"),
                                           ("2", "0.1.0"), ("2", "9.9.9+rolled-0.1.0")])
        self.assertRegex(server.log, r"replaced every worker; now worker 1: primecount 9\.9\.9\+rolled-0\.1\.0 on "
                                     r"\S+ \S+ \(pid \d+\), worker 2: primecount 9\.9\.9\+rolled-0\.1\.0 on ")
        pattern = r"started worker \d|worker \d: primecount listening|worker \d: Server Shut Down"
        events = [re.search(pattern, line).group(0) for line in server.log.splitlines() if re.search(pattern, line)]
        self.assertEqual(sorted(events[:4]), ["started worker 1", "started worker 2", "worker 1: primecount listening",
                                              "worker 2: primecount listening"])
        self.assertEqual(events[4:10], ["started worker 1", "worker 1: primecount listening",
                                        "worker 1: Server Shut Down", "started worker 2",
                                        "worker 2: primecount listening", "worker 2: Server Shut Down"])


class SocketActivatedRestartTests(SynchronousTestCase):
    """The shipped primecount.socket and primecount-socket.service under a real systemd: C{systemctl restart}
    under load keeps the socket, so no connection is refused or reset and every answer is recorded."""

    @slow
    def test_restartKeepsTheSocket(self) -> None:
        """Two restarts while 6 clients send requests: three processes served (each took the queued
        connections of the one before), zero refused, reset or unanswered, each answer recorded once."""
        port = freePort()
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        twistd = Path(sys.executable).parent / "twistd"
        systemd = NamespacedSystemd(self, {
            "primecount.socket": (UNITS / "primecount.socket").read_text(),
            "primecount-socket.service": (UNITS / "primecount-socket.service").read_text(),
            "primecount.socket.d/test.conf": f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n",
            "primecount-socket.service.d/test.conf": SERVICE_DROP_IN.format(
                twistd=twistd, folder=folder,
                privateTmp="PrivateTmp=no\n" if any(str(p).startswith("/tmp/") for p in (folder, twistd)) else ""),
        })
        systemd.systemctl("start", "primecount.socket")
        clients = CountingClients(port, 6, "restart")
        mainPids = []
        try:
            for _ in range(3):
                answered = len(clients.answered)
                waitUntil(lambda: len(clients.answered) >= answered + 300, what="requests answered")
                mainPids.append(systemd.systemctl("show", "-P", "MainPID", "primecount-socket.service").stdout)
                if len(mainPids) < 3:
                    systemd.systemctl("restart", "primecount-socket.service")
        finally:
            clients.stop()
        systemd.systemctl("stop", "primecount-socket.service")
        log = (folder / "service.log").read_text()
        self.assertEqual((dict(clients.failures), clients.unavailableAt, clients.other), ({}, [], []), log)
        self.assertEqual(len(set(mainPids)), 3, mainPids)
        self.assertEqual((log.count("primecount listening on"), log.count("received SIGTERM")), (3, 3), log)
        self.assertIn("told systemd the service is ready", log)
        recorded = recordedMessages(str(folder / "records.txt"))
        self.assertEqual([m for m in clients.answered if recorded[m] != 1], [])
        Logger().info("restart figures: {answered} answered through two restarts, failures {failures}",
                      answered=len(clients.answered), failures=dict(clients.failures))


class HAProxyRoutesAroundTests(SynchronousTestCase):
    """The real HAProxy checks C{/readyz} of three instances: one whose disk fills is taken out and comes
    back by itself once repaired; one that drains is taken out before its listener closes."""

    def instance(self, records: str, *options: str) -> ServerProcess:
        """An instance behind the proxy, with its health checks on its metrics port; every client comes from
        127.0.0.1 here, so without a per-address limit."""
        server = ServerProcess(records, "--metrics", "tcp:0:interface=127.0.0.1", "--max-per-ip", "0", *options,
                               port="haproxy:tcp:0:interface=127.0.0.1")
        self.addCleanup(server.stop)
        return server

    @slow
    def test_unreadyTakenOutAndBack(self) -> None:
        """Under load through HAProxy: instance 1's disk fills; HAProxy marks it DOWN for its 503s, and no
        C{ERROR storage unavailable} comes a second after that; repaired, it is marked UP again by itself
        and serves. Then instance 2, stopped with C{--drain-delay 3}, is marked DOWN while it still accepts.
        No request is refused or reset; every answer has exactly one record."""
        disk = smallDisk(self)
        first = self.instance(str(disk / "records.txt"))
        second = self.instance(self.mktemp(), "--drain-delay", "3")
        third = self.instance(self.mktemp())
        proxy = HAProxy(self, [first, second, third])
        clients = CountingClients(proxy.port, 6, "fleet")
        try:
            waitUntil(lambda: len(clients.answered) >= 300, what="load through HAProxy")
            filler = fill(disk)
            filledAt = time.monotonic()
            waitUntil(lambda: "primecount1 is DOWN" in proxy.log, seconds=15, what="HAProxy to take instance 1 out")
            downAt = time.monotonic()
            self.assertRegex(proxy.log, r"primecount1 is DOWN, reason: Layer7 wrong status, code: 503")
            answeredWhileOut = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answeredWhileOut + 300, what="load while instance 1 is out")
            filler.unlink()
            repairedAt = time.monotonic()
            waitUntil(lambda: "primecount1 is UP" in proxy.log, seconds=15, what="instance 1 back in rotation")
            upAt = time.monotonic()
            servedByFirst = len(recordedMessages(first.records))
            waitUntil(lambda: len(recordedMessages(first.records)) > servedByFirst + 20,
                      what="instance 1 to serve again")
            second.signal(signal.SIGTERM)
            waitUntil(lambda: "primecount2 is DOWN" in proxy.log, seconds=15, what="HAProxy to take instance 2 out")
            stillAccepting = accepts(second.port)
            answeredAfterDrain = len(clients.answered)
            waitUntil(lambda: len(clients.answered) >= answeredAfterDrain + 200, what="load after the drain")
        finally:
            clients.stop()
        self.assertEqual(second.stop(), 0, second.log)
        for server in (first, third):
            self.assertEqual(server.stop(), 0, server.log)
        self.assertTrue(stillAccepting, "instance 2 had closed its listener before HAProxy took it out")
        self.assertRegex(proxy.log, r"primecount2 is DOWN, reason: Layer7 wrong status, code: 503")
        self.assertEqual((dict(clients.failures), clients.other), ({}, []))
        lateErrors = [at - downAt for at in clients.unavailableAt if at > downAt + 1.0]
        self.assertEqual(lateErrors, [], "ERROR storage unavailable after HAProxy took instance 1 out")
        recorded = recordedMessages(first.records, second.records, third.records)
        self.assertEqual([m for m in clients.answered if recorded[m] != 1], [])
        Logger().info("fleet figures: {errors} ERROR storage unavailable of {answered} answered; instance 1 out "
                      "{detection:.2f} s after its disk filled, the last error {lastError:.2f} s after that, "
                      "back {back:.2f} s after the repair", errors=len(clients.unavailableAt),
                      answered=len(clients.answered), detection=downAt - filledAt,
                      lastError=max(clients.unavailableAt, default=filledAt) - filledAt, back=upAt - repairedAt)
