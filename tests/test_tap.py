"""Tests for L{primecount.tap} and the dropin: option parsing, the service tree, plugin discovery."""

from __future__ import annotations

import os
import subprocess

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.threadpool import ThreadPool
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from primecount.metricsendpoint import MetricsSite

from primecount.factory import PrimeCountFactory
from primecount.records.file import FileStore
from primecount.options import Options, endpointDescription, withBacklog
from primecount.tap import makeService
from primecount.tools.serverprocess import TWISTD


class OptionsTests(SynchronousTestCase):
    """Every option has a default and a UsageError naming it for bad values."""

    def parse(self, *argv: str) -> Options:
        """Parse C{argv} with the records file placed in a temporary directory unless given."""
        options = Options()
        if "--records" not in argv:
            argv = (*argv, "--records", self.mktemp())
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """With no options the service listens on port 5050 with ten threads and the seed's limits."""
        options = self.parse()
        self.assertEqual(
            {k: options[k] for k in ("port", "threads", "timeout", "quiet", "max-line", "log-requests")},
            {"port": "tcp:5050:backlog=1024", "threads": 10, "timeout": 5.0, "quiet": 0.2, "max-line": 65536, "log-requests": 0},
        )
        self.assertEqual(Options()["records"], "server_log.txt")

    def test_goodValues(self) -> None:
        """Values in range are converted to numbers; a bare port becomes a tcp endpoint with a deep backlog."""
        options = self.parse(
            "--port", "6060", "--threads", "3", "--timeout", "1.5", "--quiet", "0",
            "--max-line", "100", "--log-requests",
        )
        self.assertEqual(
            (options["port"], options["threads"], options["timeout"], options["quiet"], options["max-line"]),
            ("tcp:6060:backlog=1024", 3, 1.5, 0.0, 100),
        )
        self.assertTrue(options["log-requests"])

    def test_durabilityFormatAndMetrics(self) -> None:
        """--fsync and --records-format take their choices; --metrics is off by default, a bare port is loopback."""
        options = self.parse()
        self.assertEqual((options["fsync"], options["records-format"], options["metrics"]), ("everysec", "tsv", None))
        options = self.parse("--fsync", "always", "--records-format", "jsonl", "--metrics", "5059")
        self.assertEqual(
            (options["fsync"], options["records-format"], options["metrics"]),
            ("always", "jsonl", "tcp:5059:interface=127.0.0.1"),
        )
        self.assertEqual(self.parse("--metrics", "tcp6:5059")["metrics"], "tcp6:5059")

    def test_endpointDescriptions(self) -> None:
        """Endpoint descriptions pass through unchanged."""
        for description in ["tcp:5050:interface=127.0.0.1", r"tcp6:5050:interface=\:\:"]:
            self.assertEqual(self.parse("--port", description)["port"], description)
        self.assertEqual(endpointDescription("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_badValuesNameTheOption(self) -> None:
        """Each bad value raises a UsageError whose message names the option."""
        cases = [
            ("--threads", "0"), ("--threads", "ten"), ("--threads", "2.5"),
            ("--timeout", "-1"), ("--timeout", "0"), ("--timeout", "nan"), ("--timeout", "inf"),
            ("--quiet", "-0.1"), ("--max-line", "0"), ("--max-line", "big"),
            ("--port", "abc"), ("--port", "70000"), ("--port", "tcp:notaport"),
            ("--port", "systemd:domain=INET:index=7"),  # no such inherited socket here
            ("--fsync", "sometimes"), ("--records-format", "csv"), ("--metrics", "nope"), ("--metrics", "99999"),
            ("--send-timeout", "-1"), ("--send-timeout", "soon"),
        ]
        for option, value in cases:
            with self.assertRaises(UsageError, msg=f"{option} {value}") as caught:
                self.parse(option, value)
            self.assertIn(option, str(caught.exception))

    def test_smallMistakesAreOneLine(self) -> None:
        """An empty --records, a --metrics port that is --port's, and --workers that is neither a number nor
        auto each name their option (and say what would do)."""
        for argv, message in (
            (["--records", ""], "--records: must name a records file or a postgresql:// database, not ''"),
            (["--port", "5151", "--metrics", "5151"], "--metrics: 'tcp:5151:interface=127.0.0.1' would listen on "
             "the port of --port 'tcp:5151:backlog=1024'; give the metrics a port of their own"),
            (["--port", "haproxy:tcp:5151:interface=127.0.0.1", "--metrics", "tcp:port=5151"], "--metrics: "),
            (["--workers", "many"], "--workers: must be a whole number at least 1, or auto (one per CPU), not 'many'"),
        ):
            with self.assertRaises(UsageError, msg=argv) as caught:
                self.parse(*argv)
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))
        for argv in (["--port", "5151", "--metrics", "5152"], ["--port", "0", "--metrics", "0"],
                     ["--port", "tcp:5151:interface=127.0.0.1", "--metrics", "tcp:5151:interface=127.0.0.2"],
                     ["--port", "unix:/tmp/x", "--metrics", "5151"]):
            self.assertEqual(self.parse(*argv)["port"], endpointDescription(argv[1]))

    def test_helpShowsNoInternalOption(self) -> None:
        """--help lists every option a user may give, not those a supervisor gives its workers; they still parse."""
        text = Options().getUsage()
        self.assertIn("--max-buffered=", text)
        self.assertNotIn("--worker-fd", text)
        self.assertNotIn("--worker-metrics", text)
        self.assertEqual(self.parse("--worker-fd", "3", "--worker-metrics")["worker-fd"], 3)

    def test_keepAlive(self) -> None:
        """One request per connection is the default; --keep-alive turns keep-alive on with its two limits."""
        self.assertEqual({k: self.parse()[k] for k in ("keep-alive", "pipeline", "idle-timeout")},
                         {"keep-alive": 0, "pipeline": 64, "idle-timeout": 30.0})
        options = self.parse("--keep-alive", "--pipeline", "8", "--idle-timeout", "0")
        self.assertEqual({k: options[k] for k in ("keep-alive", "pipeline", "idle-timeout")},
                         {"keep-alive": 1, "pipeline": 8, "idle-timeout": 0.0})

    def test_keepAliveLimitsNeedKeepAlive(self) -> None:
        """--pipeline or --idle-timeout without --keep-alive is a mistake, named as such."""
        for option in ("--pipeline", "--idle-timeout"):
            with self.assertRaises(UsageError) as caught:
                self.parse(option, "7")
            self.assertEqual(str(caught.exception), f"{option}: only applies with --keep-alive")

    def test_badKeepAliveLimits(self) -> None:
        """A pipeline under 1 or a negative idle timeout is refused, naming the option."""
        for argv, named in ((["--pipeline", "0"], "--pipeline:"), (["--idle-timeout", "-1"], "--idle-timeout:")):
            with self.assertRaises(UsageError) as caught:
                self.parse("--keep-alive", *argv)
            self.assertTrue(str(caught.exception).startswith(named), str(caught.exception))

    def test_proxyFrom(self) -> None:
        """--proxy-from takes addresses and networks with a haproxy: port, names itself when wrong or misplaced."""
        options = self.parse("--port", "haproxy:tcp:5050", "--proxy-from", "192.0.2.7,2001:db8::/32")
        self.assertEqual([str(n) for n in options["proxy-from"]], ["192.0.2.7/32", "2001:db8::/32"])
        self.assertEqual([str(n) for n in self.parse()["proxy-from"]], ["127.0.0.0/8", "::1/128"])
        for argv, message in (
            (["--port", "haproxy:tcp:5050", "--proxy-from", "proxy.example"], "--proxy-from: not a list"),
            (["--proxy-from", "192.0.2.7"], "--proxy-from: only applies with a haproxy: --port"),
        ):
            with self.assertRaises(UsageError) as caught:
                self.parse(*argv)
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_unwritableRecords(self) -> None:
        """A records path that cannot be opened is a UsageError naming the option and the path."""
        path = os.path.join(self.mktemp(), "no-such-dir", "records.txt")
        with self.assertRaises(UsageError) as caught:
            self.parse("--records", path)
        self.assertIn("--records", str(caught.exception))
        self.assertIn(path, str(caught.exception))
        self.assertFalse(os.path.exists(path))

    def test_recordsNotCreatedByParsing(self) -> None:
        """Parsing checks a new records path but leaves creating it to the service, after twistd's --umask."""
        path = self.mktemp()
        self.parse("--records", path)
        self.assertFalse(os.path.exists(path))

    def test_endpointDescriptionHelper(self) -> None:
        """Only an all-digit value is taken as a port number."""
        self.assertEqual(endpointDescription("0"), "tcp:0:backlog=1024")
        self.assertEqual(endpointDescription("unix:/tmp/x"), "unix:/tmp/x")


class ThreadedMemoryReactor(MemoryReactorClock):
    """A memory reactor that also answers the thread-pool calls C{makeService} makes."""

    def __init__(self) -> None:
        super().__init__()
        self.threadPool = ThreadPool()
        self.suggestedPoolSize: int | None = None

    def suggestThreadPoolSize(self, size: int) -> None:
        """Remember the suggested size."""
        self.suggestedPoolSize = size

    def getThreadPool(self) -> ThreadPool:
        """The (never started) pool."""
        return self.threadPool


class MakeServiceTests(SynchronousTestCase):
    """C{makeService} builds the records service and the listener, in that order."""

    def test_serviceTree(self) -> None:
        """The tree opens the records file, sizes the pool, and listens with a primecount factory."""
        records = self.mktemp()
        options = Options()
        options.parseOptions(["--port", "tcp:5151:interface=127.0.0.1", "--threads", "4", "--records", records])
        reactor = ThreadedMemoryReactor()
        service = makeService(options, reactor)
        children = list(service)
        self.assertEqual(
            [type(child).__name__ for child in children],
            ["ProcessSignals", FileStore.__name__, "Drain", "Listener", "HealthWatch", "Readiness"],
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(reactor.suggestedPoolSize, 4)
        self.assertTrue(os.path.exists(records))
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (5151, "127.0.0.1"))
        self.assertIsInstance(factory, PrimeCountFactory)
        self.assertEqual(factory.limits.maxLine, 65536)
        self.assertFalse(factory.limits.keepAlive)

    def test_haproxyPortReadsHeadersFirst(self) -> None:
        """A haproxy: port listens with the PROXY-header reader in front; beyond loopback with the default
        trust it warns once."""
        from twisted.logger import globalLogPublisher

        from primecount.proxied import ProxiedFactory

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for port, warned in (("haproxy:tcp:5151:interface=127.0.0.1", False), ("haproxy:tcp:5152", True)):
            del events[:]
            options = Options()
            options.parseOptions(["--port", port, "--records", self.mktemp()])
            reactor = ThreadedMemoryReactor()
            service = makeService(options, reactor)
            service.startService()
            self.addCleanup(service.stopService)
            [(_, factory, _, _)] = reactor.tcpServers
            self.assertIsInstance(factory, ProxiedFactory)
            self.assertIsInstance(factory.wrappedFactory, PrimeCountFactory)
            warnings = [e for e in events if "takes PROXY headers on every interface" in e.get("log_format", "")]
            self.assertEqual(len(warnings), int(warned), port)

    def test_keepAliveReachesTheFactory(self) -> None:
        """--keep-alive and its limits reach the protocol factory."""
        options = Options()
        options.parseOptions(["--port", "tcp:5151", "--records", self.mktemp(), "--keep-alive", "--pipeline", "5",
                              "--idle-timeout", "9", "--send-timeout", "4"])
        reactor = ThreadedMemoryReactor()
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [(_, factory, _, _)] = reactor.tcpServers
        limits = factory.limits
        self.assertEqual((limits.keepAlive, limits.pipeline, limits.idleTimeout, limits.sendTimeout),
                         (True, 5, 9.0, 4.0))

    def test_metricsListener(self) -> None:
        """With --metrics a web site listens there, started before the request listener and stopped after it."""
        options = Options()
        options.parseOptions(["--port", "5153", "--metrics", "9109", "--records", self.mktemp()])
        reactor = ThreadedMemoryReactor()
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(9109, "127.0.0.1"), (5153, "")])
        self.assertIsInstance(reactor.tcpServers[0][1], MetricsSite)

    def test_barePortListensWithDeepBacklog(self) -> None:
        """A bare port number listens on all IPv4 interfaces with a backlog of 1024."""
        options = Options()
        options.parseOptions(["--port", "5152", "--records", self.mktemp()])
        reactor = ThreadedMemoryReactor()
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (5152, 1024, ""))

    def test_everyDescriptionListensWithDeepBacklog(self) -> None:
        """Endpoint descriptions, behind haproxy: too, get the same backlog of 1024 unless they name one."""
        for description, expected in (("tcp:5153:interface=127.0.0.1", 1024), ("haproxy:tcp:5154", 1024),
                                      ("tcp6:5155", 1024), ("tcp:5156:backlog=7", 7),
                                      ("haproxy:tcp:5157:backlog=9", 9)):
            options = Options()
            options.parseOptions(["--port", description, "--records", self.mktemp()])
            self.assertEqual(options["port"], description, "the option keeps what was written")
            reactor = ThreadedMemoryReactor()
            service = makeService(options, reactor)
            service.startService()
            self.addCleanup(service.stopService)
            [(_, _, backlog, _)] = reactor.tcpServers
            self.assertEqual(backlog, expected, description)

    def test_backlogAddedOnlyWhereItApplies(self) -> None:
        """C{withBacklog} leaves systemd: sockets and an escaped colon's C{backlog=} inside a value alone."""
        self.assertEqual(withBacklog("systemd:domain=INET:name=primecount"), "systemd:domain=INET:name=primecount")
        self.assertEqual(withBacklog("unix:/tmp/s"), "unix:/tmp/s:backlog=1024")
        self.assertEqual(withBacklog("ssl:5051:privateKey=k.pem"), "ssl:5051:privateKey=k.pem:backlog=1024")
        self.assertEqual(withBacklog(r"tcp:5050:interface=a\:backlog=3"), r"tcp:5050:interface=a\:backlog=3:backlog=1024")


class TwistdUsageErrorTests(SynchronousTestCase):
    """Under a real twistd a bad option is one line on stderr, not the whole help and then the error."""

    def test_oneLine(self) -> None:
        """C{twistd primecount --threads 0} prints one line naming the option and exits 1."""
        result = subprocess.run([*TWISTD, "primecount", "--threads", "0"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "twistd primecount: --threads: must be a whole number at least 1, not '0' "
                                        "(twistd primecount --help lists the options)\n")


class DescriptorLineTests(SynchronousTestCase):
    """The start line on the descriptor limit says what happened to it."""

    def test_raisedOnlyWhenRaised(self) -> None:
        """A soft limit that is already the hard one is not said to be raised; one that was raised is."""
        from twisted.logger import formatEvent, globalLogPublisher

        from primecount import limits
        from primecount.limits import FileLimit

        for limit, words in ((FileLimit(20000, 20000, 20000), "descriptor limit (RLIMIT_NOFILE): soft 20000, hard "
                              "20000; 19872 for clients; at most 18848 connections"),
                             (FileLimit(1024, 4096, 4096), "soft 1024 raised to 4096, hard 4096")):
            events: list[dict] = []
            globalLogPublisher.addObserver(events.append)
            self.patch(limits, "raiseFileLimit", lambda limit=limit: limit)
            options = Options()
            options.parseOptions(["--records", self.mktemp()])
            makeService(options, ThreadedMemoryReactor())
            globalLogPublisher.removeObserver(events.append)
            line = next(formatEvent(e) for e in events if "RLIMIT_NOFILE" in e.get("log_format", ""))
            self.assertIn(words, line)


class PluginTests(SynchronousTestCase):
    """The dropin is found by Twisted's plugin system."""

    def test_discovered(self) -> None:
        """C{getPlugins(IServiceMaker)} includes C{primecount} pointing at L{primecount.tap}."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("primecount", makers)
        self.assertEqual(makers["primecount"].module, "primecount.tap")
