"""Operations end to end: draining on SIGTERM, SIGHUP reopen under load, daemon mode, socket activation,
the systemd units, metrics over HTTP and the bounded log file; all with real processes and signals."""

from __future__ import annotations

import gzip
import shutil
import os
import signal
import socket
import subprocess
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from primecount.records.formats import parseRecords
from primecount.tools.serverprocess import TWISTD, ServerProcess, listeningPort
from tests.helpers import ask, expectedReply, listeningInodes, requireTool, scrape, slow, waitUntil

UNITS = Path(__file__).resolve().parents[1] / "contrib" / "systemd"
LOGROTATE = Path(__file__).resolve().parents[1] / "contrib" / "logrotate" / "primecount"


def readRecords(*paths: str) -> list:
    """Every record in C{paths}, in order."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8", newline="\n") as file:
            records += list(parseRecords(file))
    return records


class DrainTests(SynchronousTestCase):
    """SIGTERM stops accepting but lets requests in flight finish, records them, and exits 0."""

    @slow
    def test_twoHundredClientsMidRequest(self) -> None:
        """200 clients mid-request at SIGTERM: each gets its reply or a clean close; every reply is recorded."""
        records = os.path.abspath(self.mktemp())
        # The deadline leaves time to connect 200 clients and signal on a loaded machine.
        server = ServerProcess(records, "--quiet", "0", "--timeout", "8", "--max-per-ip", "0")
        clients = []
        try:
            for i in range(200):
                client = socket.create_connection(("127.0.0.1", server.port), timeout=15)
                client.sendall(f"drain {i} ".encode())  # no newline yet: mid-request
                clients.append(client)
            server.signal(signal.SIGTERM)
            server.waitFor(rb"waiting up to [\d.]+ s for \d+ open connections")
            with self.assertRaises(OSError, msg="the listener must be closed while draining"):
                socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
            for i, client in enumerate(clients[:150]):
                client.sendall(f"x{i % 7}\n".encode())  # 50 clients stay silent until their deadline
            replies = {}
            for i, client in enumerate(clients):
                received = b""
                while chunk := client.recv(4096):
                    received += chunk
                replies[i] = received
        finally:
            for client in clients:
                client.close()
            status = server.stop()
        self.assertEqual(status, 0, server.log)
        answered = {f"drain {i} x{i % 7}" for i in range(150)}
        for i, reply in replies.items():
            if i < 150:
                self.assertIn(reply, (expectedReply(f"drain {i} x{i % 7}"), b""), i)
            else:
                self.assertIn(reply, (b"ERROR timeout\n", b""), i)
        repliedTo = {f"drain {i} x{i % 7}" for i, reply in replies.items() if i < 150 and reply}
        self.assertEqual(len(repliedTo), 150, "nobody was cut off while the drain had time left")
        self.assertEqual({r.message for r in readRecords(records)}, answered)


class StopAtOnceTests(SynchronousTestCase):
    """Whoever waits for the listening line may send SIGTERM the moment it appears and still get the drain."""

    def test_termOnTheListeningLine(self) -> None:
        """Five starts, each sent SIGTERM as soon as it says it listens: each drains and exits 0."""
        for start in range(5):
            server = ServerProcess(os.path.abspath(self.mktemp()))
            server.signal(signal.SIGTERM)
            self.assertEqual(server.stop(), 0, server.log)
            self.assertIn("received SIGTERM, draining and shutting down", server.log)

    def test_supervisorTermOnTheListeningLine(self) -> None:
        """With C{--workers 2}, SIGTERM on the supervisor's listening line: it stops its workers and exits 0."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--workers", "2")
        server.signal(signal.SIGTERM)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertIn("received SIGTERM, draining and shutting down", server.log)


class ReopenTests(SynchronousTestCase):
    """Rotation by rename + SIGHUP while clients run loses and repeats nothing."""

    @slow
    def test_renameAndHangUpUnderLoad(self) -> None:
        """Four client threads run while the file is rotated three times: each reply is in exactly one file."""
        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records)
        replied: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def client(number: int) -> None:
            try:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    message = f"hup {number}-{i}"
                    if ask(server.port, message.encode() + b"\n") == expectedReply(message):
                        replied.append(message)
                    else:
                        failures.append(AssertionError(message))
            except BaseException as error:
                failures.append(error)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            for rotation in range(1, 4):
                waitUntil(lambda: len(replied) >= 1000 * rotation, what="client progress")
                os.rename(records, f"{records}.{rotation}")
                server.process.send_signal(signal.SIGHUP)
                server.waitFor(rb"reopened records file", count=rotation)
            waitUntil(lambda: len(replied) >= 4000, what="client progress")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            status = server.stop()
        self.assertEqual((status, failures), (0, []))
        files = [f"{records}.{n}" for n in (1, 2, 3)] + [records]
        stored = Counter(r.message for r in readRecords(*files))
        self.assertEqual(stored, Counter(replied))
        self.assertTrue(all(os.path.getsize(f) for f in files), "every rotated file received records")


class RemovedRecordsFileTests(SynchronousTestCase):
    """An C{rm} of the records file under load loses nothing answered after it: the server notices before its
    next batch, says so once, and writes to a new file at the path."""

    @slow
    def test_removedUnderLoad(self) -> None:
        """Four client threads run while the records file is removed twice: every request sent after the last
        removal and answered is in the new file, once; the removals are logged, one line each."""
        import time

        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records)
        replied: list[tuple[float, str]] = []
        stop = threading.Event()

        def client(number: int) -> None:
            for i in range(1_000_000):
                if stop.is_set():
                    return
                message, sentAt = f"rm {number}-{i}", time.monotonic()
                if ask(server.port, message.encode() + b"\n") == expectedReply(message):
                    replied.append((sentAt, message))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        try:
            for removal in (1, 2):
                waitUntil(lambda: len(replied) >= 500 * removal, what="client progress")
                os.remove(records)
                removedAt = time.monotonic()
            waitUntil(lambda: len(replied) >= 1500, what="client progress")
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
            status = server.stop()
        self.assertEqual(status, 0, server.log)
        stored = Counter(r.message for r in readRecords(records))
        after = {message for sentAt, message in replied if sentAt > removedAt}
        self.assertGreater(len(after), 100)
        self.assertEqual(after - set(stored), set(), "answered after the removal, and not in the file")
        self.assertEqual(max(stored.values()), 1)
        self.assertEqual(set(stored) - {message for _, message in replied}, set(), "nothing unanswered")
        self.assertEqual(server.log.count("was removed or replaced while open"), 2, server.log)


def recordsNobodyCannotCreate(test: SynchronousTestCase) -> tuple[Any, str]:
    """The user nobody, and a records path in a folder of root's (removed after C{test}) where nobody cannot
    create it, though root, who checks the options, can."""
    import pwd
    import tempfile

    folder = tempfile.mkdtemp(prefix="primecount-user-")
    test.addCleanup(shutil.rmtree, folder, True)
    os.chmod(folder, 0o700)
    return pwd.getpwnam("nobody"), os.path.join(folder, "records.txt")


class DaemonTests(SynchronousTestCase):
    """Classic daemon mode: twistd forks, writes its pidfile, and removes it on SIGTERM."""

    def startDaemon(self) -> tuple[Path, int, int]:
        """A classic twistd daemon (no C{-n}) in a fresh folder: the folder, its pid (from its pidfile) and port."""
        base = Path(os.path.abspath(self.mktemp()))
        base.mkdir()
        pidfile, logfile, records = base / "primecount.pid", base / "twistd.log", base / "records.txt"
        started = subprocess.run(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={logfile}", "primecount",
             "--port", "tcp:0:interface=127.0.0.1", "--records", str(records)],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        waitUntil(lambda: pidfile.exists() and logfile.exists()
                  and listeningPort(logfile.read_text()) is not None, what="the daemon to listen")
        return base, int(pidfile.read_text()), listeningPort(logfile.read_text())  # type: ignore[return-value]

    def stopDaemon(self, pid: int) -> None:
        """SIGTERM the daemon and wait until it is gone."""
        os.kill(pid, signal.SIGTERM)

        def gone() -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            return False

        waitUntil(gone, what="the daemon to exit")

    def daemonThatCannotStart(self, *options: str, twistdOptions: Sequence[str] = (), owner: int = -1) -> str:
        """Start a classic daemon with C{options} that must fail: it exits 1 within 10 s (not waiting for ever),
        says why on the terminal it was started from, and leaves no pidfile (in a folder C{owner} owns, as the
        service user's pidfile folder is); its stderr."""
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="primecount-daemon-"))  # in /tmp: every parent searchable by all
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        os.chown(base, owner, owner)
        pidfile = base / "primecount.pid"
        started = subprocess.run(
            [*TWISTD, f"--pidfile={pidfile}", f"--logfile={base / 'twistd.log'}", *twistdOptions, "primecount",
             *options], capture_output=True, text=True, timeout=10)
        self.assertEqual(started.returncode, 1, started.stdout + started.stderr)
        self.assertFalse(pidfile.exists(), "no pidfile is left")
        return started.stderr

    @slow
    def test_daemonThatCannotStartSaysWhy(self) -> None:
        """A port in use, an interface this host does not have, and (as root) a records file the service user may
        not create: each stops the daemon's start at once with its one line on the terminal, exit 1, no
        pidfile."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            stderr = self.daemonThatCannotStart("--port", f"tcp:{port}:interface=127.0.0.1",
                                                "--records", os.path.abspath(self.mktemp()))
        self.assertEqual(stderr.splitlines()[0],
                         f"primecount: --port: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.")
        stderr = self.daemonThatCannotStart("--port", "tcp:0:interface=198.18.0.1",
                                            "--records", os.path.abspath(self.mktemp()))
        self.assertEqual(stderr.splitlines()[0],
                         "primecount: --port: Couldn't listen on 198.18.0.1:0: [Errno 99] Cannot assign requested address.")
        if os.geteuid() == 0:
            nobody, records = recordsNobodyCannotCreate(self)
            stderr = self.daemonThatCannotStart(
                "--port", "tcp:0:interface=127.0.0.1", "--records", records,
                twistdOptions=["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)], owner=nobody.pw_uid)
            self.assertEqual(stderr.splitlines()[0],
                             f"primecount: cannot open records file {records}: Permission denied")

    @slow
    def test_daemonLifecycle(self) -> None:
        """The daemon answers, stops on SIGTERM, removes its pidfile and keeps its records."""
        base, pid, port = self.startDaemon()
        self.assertEqual(ask(port, b"abc2a\n"), "2 sí\n".encode())
        self.assertEqual(ask(port, "日本日\n".encode()), "2 sí\n".encode())
        self.stopDaemon(pid)
        self.assertFalse((base / "primecount.pid").exists(), "the pidfile is removed")
        self.assertIn("Server Shut Down.", (base / "twistd.log").read_text())
        self.assertEqual([r.message for r in readRecords(str(base / "records.txt"))], ["abc2a", "日本日"])

    @slow
    def test_logrotateReopensTheDaemonTwice(self) -> None:
        """The shipped logrotate rules, run by the real logrotate against a real daemon found by its pidfile,
        rotate twice without loss (the second rotation too, which notifempty would skip had the first not
        reopened); with no primecount running, logrotate fails and says why."""
        logrotate = requireTool(self, "logrotate")
        base, pid, port = self.startDaemon()
        records = base / "records.txt"
        config = LOGROTATE.read_text().replace("/var/lib/primecount/records.txt", str(records))
        config = config.replace("/run/primecount/primecount.pid", str(base / "primecount.pid"))
        configPath = base / "logrotate.conf"
        configPath.write_text(config)

        def rotate() -> subprocess.CompletedProcess:
            return subprocess.run([logrotate, "--force", "--state", str(base / "logrotate.state"), str(configPath)],
                                  capture_output=True, text=True, timeout=60)

        try:
            for rotation, phase in enumerate(("before", "between"), 1):
                for i in range(5):
                    self.assertEqual(ask(port, f"{phase} {i}\n".encode()), expectedReply(f"{phase} {i}"))
                result = rotate()
                self.assertEqual(result.returncode, 0, result.stderr)
                waitUntil(lambda: (base / "twistd.log").read_text().count("reopened records file") == rotation,
                          what=f"reopen {rotation}")
            for i in range(5):
                ask(port, f"after {i}\n".encode())
        finally:
            self.stopDaemon(pid)
        with gzip.open(f"{records}.2.gz", "rt", encoding="utf-8", newline="\n") as file:
            self.assertEqual([r.message for r in parseRecords(file)], [f"before {i}" for i in range(5)])
        self.assertEqual([r.message for r in readRecords(f"{records}.1")], [f"between {i}" for i in range(5)])
        self.assertEqual([r.message for r in readRecords(str(records))], [f"after {i}" for i in range(5)])
        result = rotate()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("no running primecount to reopen its records file", result.stderr)

    @slow
    def test_boundedLogFile(self) -> None:
        """With --logger=primecount.logs.rotatingLogObserver the log rotates at the size given and keeps N files."""
        base = Path(os.path.abspath(self.mktemp()))
        base.mkdir()
        environ = {**os.environ, "PRIMECOUNT_LOGFILE": str(base / "twistd.log"),
                   "PRIMECOUNT_LOG_MAX_BYTES": "2000", "PRIMECOUNT_LOG_KEEP": "2"}
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "--logger=primecount.logs.rotatingLogObserver", "primecount",
             "--port", "tcp:0:interface=127.0.0.1", "--log-requests", "--records", str(base / "records.txt")],
            env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            log = base / "twistd.log"
            waitUntil(lambda: log.exists() and listeningPort(log.read_text()) is not None, what="the server to listen")
            port = listeningPort(log.read_text())
            for i in range(60):
                ask(port, f"log line {i}\n".encode())
        finally:
            process.send_signal(signal.SIGTERM)
            self.assertEqual(process.wait(30), 0)
        self.assertEqual(sorted(p.name for p in base.glob("twistd.log*")), ["twistd.log", "twistd.log.1", "twistd.log.2"])


class SystemdTests(SynchronousTestCase):
    """The shipped units pass systemd-analyze, and socket activation works without systemd as PID 1."""

    def test_unitsVerify(self) -> None:
        """Every unit verifies (ExecStart pointed at this environment's twistd); one pointed at a twistd that does
        not exist (in this test's own folder, whatever is installed elsewhere) does not."""
        analyze = requireTool(self, "systemd-analyze")
        folder = Path(self.mktemp())
        folder.mkdir()
        prefix = str(Path(TWISTD[0]).parent.parent)
        if not (Path(prefix) / "bin" / "twistd").exists():
            raise SkipTest(f"no twistd script beside {TWISTD[0]}")
        names = sorted(p.name for p in UNITS.iterdir())
        self.assertEqual(names, ["primecount-socket.service", "primecount.service", "primecount.socket"])
        for name in names:
            (folder / name).write_text((UNITS / name).read_text().replace("/opt/primecount/venv", prefix))
        result = subprocess.run([analyze, "verify", *names], cwd=folder, capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        missing = folder.resolve() / "no-venv"
        (folder / "broken.service").write_text((UNITS / "primecount.service").read_text().replace(
            "/opt/primecount/venv", str(missing)))
        broken = subprocess.run([analyze, "verify", "broken.service"], cwd=folder, capture_output=True, text=True)
        self.assertNotEqual(broken.returncode, 0)
        self.assertIn(f"{missing}/bin/twistd", broken.stderr)

    @slow
    def test_socketActivation(self) -> None:
        """systemd-socket-activate holds the port; twistd adopts it via --port systemd:domain=INET:name=primecount."""
        self.socketActivation()

    @slow
    def test_socketActivationWithWorkers(self) -> None:
        """With --workers 2 the supervisor adopts systemd's socket and both workers accept from it."""
        self.socketActivation("--workers", "2")

    def socketActivation(self, *options: str) -> None:
        """Serve two requests on a socket handed over by systemd-socket-activate, then stop with SIGTERM."""
        activate = requireTool(self, "systemd-socket-activate")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        records = os.path.abspath(self.mktemp())
        process = subprocess.Popen(
            [activate, "--fdname=primecount", "-l", f"127.0.0.1:{port}",
             *TWISTD, "-n", "--pidfile=", "primecount", "--port", "systemd:domain=INET:name=primecount", "--records", records,
             *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            waitUntil(lambda: _accepting(port), what="systemd-socket-activate to listen")
            self.assertEqual(ask(port, b"abc2a\n", timeout=30), "2 sí\n".encode())
            self.assertEqual(ask(port, b"zz\n"), "2 sí\n".encode())
        finally:
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        self.assertEqual(process.returncode, 0, output.decode(errors="replace"))
        self.assertEqual([r.message for r in readRecords(records)], ["abc2a", "zz"])


def _accepting(port: int) -> bool:
    """Whether something listens on the loopback C{port} (probing without sending a request)."""
    try:
        return bool(listeningInodes(port, ("/proc/net/tcp",)))
    except OSError:
        return False


class MetricsTests(SynchronousTestCase):
    """Prometheus text at /metrics reflects real requests."""

    @slow
    def test_metricsMove(self) -> None:
        """After 3 answers and 2 errors the counters, histogram, records and fsync figures say so."""
        records = os.path.abspath(self.mktemp())
        server = ServerProcess(records, "--metrics", "tcp:0:interface=127.0.0.1", "--fsync", "always")
        try:
            metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
            before = scrape(metricsPort)
            for payload in (b"abc2a\n", b"aa\n", b"xyz\n", b"\xff\n", b"\n"):
                ask(server.port, payload)
            scraped: list[dict[str, float]] = []

            def allCounted() -> bool:  # the exposition is rendered at most once a second
                scraped[:] = [scrape(metricsPort)]
                return scraped[0]["primecount_request_duration_seconds_count"] == 5.0

            waitUntil(allCounted, what="the five requests in the metrics")
            after = scraped[0]
        finally:
            self.assertEqual(server.stop(), 0)
        from primecount import __version__

        # Every outcome and reason is there from the start, at 0; the process and build are described.
        for outcome in ("ok", "empty_message", "invalid_utf8", "line_too_long", "timeout", "storage_unavailable",
                        "internal_error", "busy"):
            self.assertEqual(before[f'primecount_requests_total{{outcome="{outcome}"}}'], 0.0, outcome)
        self.assertEqual(before['primecount_busy_refusals_total{limit="per_address"}'], 0.0)
        self.assertEqual(before['primecount_connections_without_request_total{reason="health_check"}'], 0.0)
        self.assertEqual(before[f'primecount_build_info{{version="{__version__}"}}'], 1.0)
        self.assertEqual(before['primecount_limit{name="max_per_ip"}'], 64.0)
        self.assertEqual(before['primecount_limit{name="timeout_seconds"}'], 5.0)
        self.assertGreater(before["process_open_fds"], 5)
        self.assertGreater(before["process_max_fds"], 1000)
        self.assertIn("python_info", " ".join(before))
        self.assertNotIn("/metrics", server.log, "no access-log line per scrape")
        self.assertEqual(after['primecount_requests_total{outcome="ok"}'], 3.0)
        self.assertEqual(after['primecount_requests_total{outcome="invalid_utf8"}'], 1.0)
        self.assertEqual(after['primecount_requests_total{outcome="empty_message"}'], 1.0)
        self.assertEqual(after["primecount_request_duration_seconds_count"], 5.0)
        self.assertEqual(after["primecount_records_written_total"], 3.0)
        self.assertEqual(after["primecount_record_write_errors_total"], 0.0)
        self.assertGreaterEqual(after["primecount_fsync_duration_seconds_count"], 3.0)
        self.assertEqual(after["primecount_records_commit_duration_seconds_count"], 3.0)
        self.assertEqual((after["primecount_ready"], after["primecount_records_store_healthy"]), (1.0, 1.0))
        self.assertEqual(after["primecount_open_connections"], 0.0)
        self.assertEqual(after["primecount_threadpool_queue_depth"], 0.0)
        self.assertIn("primecount_threadpool_busy_threads", after)

    @slow
    def test_openMetricsWhenAsked(self) -> None:
        """A scraper that accepts OpenMetrics gets it (with its EOF marker); others get the Prometheus text."""
        server = ServerProcess(os.path.abspath(self.mktemp()), "--metrics", "tcp:0:interface=127.0.0.1")
        try:
            metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
            request = urllib.request.Request(f"http://127.0.0.1:{metricsPort}/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"})
            with urllib.request.urlopen(request, timeout=10) as response:
                contentType, body = response.headers["Content-Type"], response.read().decode()
        finally:
            self.assertEqual(server.stop(), 0)
        self.assertTrue(contentType.startswith("application/openmetrics-text"), contentType)
        self.assertTrue(body.endswith("# EOF\n"))


class ServiceUserTests(SynchronousTestCase):
    """With twistd's --uid/--gid the records file belongs to the service user, before and after a rotation."""

    @slow
    def test_unwritableForTheServiceUserStopsBeforeListening(self) -> None:
        """With --uid, a records path that root may create but the service user may not stops the start with
        one line, exit 1, and primecount never says it listens (the port was bound as root, but not served)."""
        if os.geteuid() != 0:
            raise SkipTest("needs root to switch to another user")
        nobody, records = recordsNobodyCannotCreate(self)
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid), "primecount",
             "--port", "tcp:0:interface=127.0.0.1", "--records", records],
            capture_output=True, text=True, timeout=60,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertIn(f"primecount: cannot open records file {records}: Permission denied", output)
        self.assertNotIn("primecount listening on", output)

    @slow
    def test_serviceUserCreatesAndReopens(self) -> None:
        """Run as nobody with --umask 0077: the file is nobody's and 0600; after rename + SIGHUP the new one too."""
        import pwd
        import stat

        if os.geteuid() != 0:
            raise SkipTest("needs root to switch to another user")
        nobody = pwd.getpwnam("nobody")
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="primecount-user-")  # in /tmp: every parent is searchable by nobody
        self.addCleanup(shutil.rmtree, folder, True)
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)  # the service user must be able to create files here
        records = os.path.join(folder, "records.txt")
        server = ServerProcess(records, twistdOptions=["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid),
                                                       "--umask", "0077"])
        try:
            self.assertEqual(ask(server.port, b"before\n"), expectedReply("before"))
            os.rename(records, records + ".1")
            server.process.send_signal(signal.SIGHUP)
            server.waitFor(rb"reopened records file")
            self.assertEqual(ask(server.port, b"after\n"), expectedReply("after"))
        finally:
            self.assertEqual(server.stop(), 0, server.log)
        for path, message in ((records + ".1", "before"), (records, "after")):
            status = os.stat(path)
            self.assertEqual((status.st_uid, stat.S_IMODE(status.st_mode)), (nobody.pw_uid, 0o600), path)
            self.assertEqual([r.message for r in readRecords(path)], [message])
