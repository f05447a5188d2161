"""The options of C{twistd primecount}: each checked as it is read (a UsageError naming the option), the rules
that take several together checked once all are read, and the options a supervisor hands its workers."""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import twisted
from twisted.python import usage

from primecount import __version__
from primecount.connection import RequestLimits
from primecount.internals import parseServerEndpoint
from primecount.proxied import LOOPBACK, parseNetworks
from primecount.records.formats import FORMATS
from primecount.records.file import recordsPathProblem
from primecount.records.schema import partitionNameProblem, tableProblem
from primecount.records.store import FSYNC_POLICIES
from primecount.records.table import (
    DEFAULT_CONNECTIONS, DEFAULT_TABLE, DEFAULT_TIMEOUT, OVERLAP_AFTER, isDatabaseURI, uriProblem,
)
from primecount.tls import cipherProblem
from primecount.workers import WORKER_FD, cpuCount

DEFAULTS = RequestLimits()
# 64 MiB of lines not yet ended, in all: about a thousand clients each a whole --max-line into their request.
DEFAULT_MAX_BUFFERED = 64 << 20
PROXIED_PREFIX = "haproxy:"
# Options that only a supervisor gives its workers: accepted, but not shown in --help.
INTERNAL_OPTIONS = ("worker-fd", "worker-metrics")
# Twisted listens with a backlog of 50; a burst of new clients beyond that waits
# a full second for the SYN retry. Load tests open hundreds of connections at once.
BARE_PORT_BACKLOG = 1024


def withoutProxyPrefix(description: str) -> str:
    """The endpoint description under a C{haproxy:} prefix, or C{description} itself."""
    return description[len(PROXIED_PREFIX):] if description.startswith(PROXIED_PREFIX) else description


def _barePort(option: str, value: str, template: str) -> str:
    """C{template} filled with a bare port number, or an endpoint description as written."""
    if not value.isdigit():
        return value
    if int(value) > 65535:
        raise usage.UsageError(f"--{option}: {value} is not a TCP port number (0-65535)")
    return template.format(port=value)


def endpointDescription(value: str) -> str:
    """Turn a bare port number into C{tcp:N:backlog=1024}; pass any endpoint description through unchanged."""
    return _barePort("port", value, "tcp:{port}:backlog=" + str(BARE_PORT_BACKLOG))


# Endpoint types that take a backlog= argument, and are given BARE_PORT_BACKLOG when none is written.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def withBacklog(description: str) -> str:
    """C{description} (under no C{haproxy:} prefix) with C{backlog=1024} added if it is a C{tcp:}, C{tcp6:},
    C{ssl:} or C{unix:} endpoint that names no backlog of its own."""
    kind, _, arguments = description.partition(":")
    if kind in _BACKLOG_TYPES and not re.search(r"(?:^|(?<!\\):)backlog=", arguments):
        return f"{description}:backlog={BARE_PORT_BACKLOG}"
    return description


def metricsEndpointDescription(value: str) -> str:
    """A bare port number for metrics listens on loopback only; an endpoint description is used as written."""
    return _barePort("metrics", value, "tcp:{port}:interface=127.0.0.1")


def _choice(option: str, choices: Sequence[str]) -> Callable[[str], str]:
    """A coercer accepting one of C{choices}, naming C{--option} otherwise."""

    def coerce(value: str) -> str:
        if value not in choices:
            raise usage.UsageError(f"--{option}: must be one of {', '.join(choices)}, not {value!r}")
        return value

    coerce.coerceDoc = f"One of: {', '.join(choices)}."  # type: ignore[attr-defined]
    return coerce


def listenedAddress(description: str) -> Optional[tuple[str, int]]:
    """The interface (C{""}: every one) and port a TCP-like endpoint description (under any C{haproxy:} prefix)
    binds, or C{None} for other kinds (systemd's socket, a UNIX path)."""
    parts = re.split(r"(?<!\\):", withoutProxyPrefix(description))
    if parts[0] not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [part for part in parts[1:] if "=" not in part]
    named = dict(part.split("=", 1) for part in parts[1:] if "=" in part)
    port = named.get("port", positional[0] if positional else "")
    if not port.isdigit():
        return None
    return named.get("interface", "").replace("\\:", ":"), int(port)


def _sameListeningPort(first: str, second: str) -> bool:
    """Whether two endpoint descriptions would bind the same port (not 0, any free one) on overlapping
    interfaces."""
    one, other = listenedAddress(first), listenedAddress(second)
    if one is None or other is None or one[1] != other[1] or one[1] == 0:
        return False
    anywhere = ("", "0.0.0.0", "::")
    return one[0] in anywhere or other[0] in anywhere or one[0] == other[0]


def _checkEndpoint(option: str, description: str) -> None:
    """Raise a UsageError naming C{--option} if C{description} is not a usable server endpoint: it parses (an
    C{ssl:} one loads its key and certificate, which must match), a C{systemd:} one names a socket this process
    was given, a C{unix:} one's folder exists."""
    try:
        parseServerEndpoint(description)
    except (IndexError, KeyError) as error:
        if not isinstance(error, IndexError) and not description.startswith("systemd:"):
            raise usage.UsageError(f"--{option}: cannot use {description!r}: {error}") from None
        raise usage.UsageError(
            f"--{option}: {description!r} names an inherited socket this process was not given "
            "(start it from a systemd .socket unit, or with systemd-socket-activate --fdname=NAME: "
            "Twisted needs LISTEN_FDS and LISTEN_FDNAMES)"
        ) from None
    except ImportError as error:  # ssl: without pyOpenSSL
        raise usage.UsageError(
            f"--{option}: {description!r} needs TLS support, which is not installed ({error}): "
            "pip install 'primecount[tls]'"
        ) from None
    except Exception as error:  # a bad value; for ssl:, also a key or certificate OpenSSL cannot load
        raise usage.UsageError(f"--{option}: cannot use {description!r}: {_readable(error)}") from None
    if withoutProxyPrefix(description).startswith("unix:"):
        path = re.split(r"(?<!\\):", withoutProxyPrefix(description))[1].split("=", 1)[-1].replace("\\:", ":")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise usage.UsageError(f"--{option}: cannot listen on {path}: no such folder {folder}")


def _readable(error: Exception) -> str:
    """An endpoint's parse error in words: OpenSSL's list of (library, function, reason) as its reasons, with
    what to check; anything else as it says itself."""
    try:
        from OpenSSL.crypto import Error as OpenSSLError
    except ImportError:
        return str(error)
    reasons = error.args[0] if error.args and isinstance(error.args[0], list) else None
    if isinstance(error, OpenSSLError) and reasons and all(isinstance(reason, tuple) for reason in reasons):
        said = "; ".join(": ".join(part for part in reason if part) for reason in reasons)
        return (f"OpenSSL cannot load the key or the certificate ({said}): privateKey= must name a PEM private "
                f"key, and certKey= its PEM certificate")
    return str(error)


def _workers(value: str) -> int:
    """A coercer for C{--workers}: a whole number at least 1, or C{auto} for one per CPU."""
    if value == "auto":
        return cpuCount()
    if not value.isdigit() or int(value) < 1:
        raise usage.UsageError(f"--workers: must be a whole number at least 1, or auto (one per CPU), not {value!r}")
    return int(value)


_workers.coerceDoc = "A whole number at least 1, or auto (one per CPU)."  # type: ignore[attr-defined]


def _networks(value: str) -> tuple:
    """A coercer for C{--proxy-from}: comma-separated addresses or CIDR networks."""
    try:
        return parseNetworks(value)
    except ValueError as error:
        raise usage.UsageError(f"--proxy-from: not a list of addresses or networks (CIDR): {value!r} ({error})")


_networks.coerceDoc = "Addresses or networks, comma-separated."  # type: ignore[attr-defined]


def _number(option: str, kind: Callable[[str], Any], minimum: float, strict: bool) -> Callable[[str], Any]:
    """A coercer for C{--option} that names the option in its L{usage.UsageError}."""
    noun = "a whole number" if kind is int else "a number"
    bound = f"greater than {minimum}" if strict else f"at least {minimum}"

    def coerce(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or (number <= minimum if strict else number < minimum):
            raise usage.UsageError(f"--{option}: must be {noun} {bound}, not {value!r}")
        return number

    coerce.coerceDoc = f"Must be {bound}."  # type: ignore[attr-defined]
    return coerce


class Options(usage.Options):
    """Command-line options of C{twistd primecount}; every bad value is a UsageError naming its option."""

    synopsis = "[options]"
    longdesc = (
        "Serve the primecount protocol: a client sends one line, the server replies "
        "'<count> sí' or '<count> no' (is the count of the line's last character prime?) "
        "after appending a record, and closes the connection; with --keep-alive a connection "
        "carries any number of requests."
    )
    optFlags = [
        ["worker-metrics", None, "Internal, set by --workers: keep metrics for the supervisor to sum."],
        ["log-requests", None, "Log every connection and reply, one line each (costly under load); without it, "
         "ERROR replies are logged as a summary, at most a line a second per kind, with their count."],
        ["keep-alive", None, "Let a connection carry any number of requests, pipelined or one by one, "
         "instead of closing after the first reply."],
    ]
    optParameters = [
        ["port", "p", endpointDescription("5050"), "Endpoint to listen on: a port number N (all IPv4 interfaces) "
         "or an endpoint description (tcp:5050:interface=127.0.0.1, tcp6:5050, "
         "systemd:domain=INET:name=primecount, ssl:...), or either behind haproxy: to read a PROXY header "
         "first (haproxy:tcp:5051); tcp, tcp6, ssl and unix listen with backlog=1024 unless given.",
         endpointDescription],
        ["workers", "w", 1, "Worker processes, each a whole server on the one listening socket, supervised by "
         "this process ('auto': one per CPU).", _workers],
        ["worker-fd", None, None, "Internal, set by --workers: the inherited listening socket",
         _number("worker-fd", int, 0, strict=False)],
        ["threads", "t", 10, "Size of the thread pool that runs the analysis.",
         _number("threads", int, 1, strict=False)],
        ["timeout", None, DEFAULTS.timeout, "Seconds from connect (with --keep-alive, for later requests: from "
         "their first byte) until the request must have ended.",
         _number("timeout", float, 0, strict=True)],
        ["quiet", None, DEFAULTS.quiet, "Seconds of silence after some bytes that end a request "
         "sent without a newline (0 disables).", _number("quiet", float, 0, strict=False)],
        ["max-line", None, DEFAULTS.maxLine, "Longest request accepted, in bytes.",
         _number("max-line", int, 1, strict=False)],
        ["pipeline", None, DEFAULTS.pipeline, "With --keep-alive: most unanswered requests per connection; "
         "past it the connection is not read until replies go out.", _number("pipeline", int, 1, strict=False)],
        ["idle-timeout", None, DEFAULTS.idleTimeout, "With --keep-alive: seconds a kept connection may wait for "
         "its next request before it is closed (0: no limit).", _number("idle-timeout", float, 0, strict=False)],
        ["send-timeout", None, DEFAULTS.sendTimeout, "Seconds a connection's queued replies may make no progress "
         "(the client reads none of them) before the connection is aborted (0: no limit).",
         _number("send-timeout", float, 0, strict=False)],
        ["proxy-from", None, LOOPBACK, "With a haproxy: --port, the proxies allowed to send PROXY headers, as "
         "CIDR[,CIDR...]; connections from anywhere else are closed unread.", _networks],
        ["records", "r", "server_log.txt", "File the records are appended to (SIGHUP reopens it), or a "
         "PostgreSQL database as a libpq URI (postgresql://user@host/db), appended to its --records-table."],
        ["records-table", None, DEFAULT_TABLE, "With a postgresql:// --records: the table (or "
         "schema.table), created if missing."],
        ["records-timeout", None, DEFAULT_TIMEOUT, "With a postgresql:// --records: seconds a batch may wait for its commit "
         "before its clients get ERROR storage unavailable.", _number("records-timeout", float, 0, strict=True)],
        ["records-connections", None, DEFAULT_CONNECTIONS, "With a postgresql:// --records: most connections "
         "(and commits in flight) at once; the next batch goes on another one only once every commit in "
         f"flight is {OVERLAP_AFTER * 1000:g} ms old.", _number("records-connections", int, 1, strict=False)],
        ["records-retention", None, 0, "With a postgresql:// --records: days of records kept; a table created "
         "with it is partitioned by day, partitions are made ahead, and those older are dropped (0: keep "
         "everything, in a plain table).", _number("records-retention", int, 0, strict=False)],
        ["records-format", None, "tsv", "Records file format: tsv (the original columns) or jsonl.",
         _choice("records-format", sorted(FORMATS))],
        ["fsync", None, "everysec", "When records are fsynced: always (before each reply), everysec "
         "(at most once a second) or never (left to the OS).", _choice("fsync", FSYNC_POLICIES)],
        ["max-connections", None, None, "Most client connections open at once; more get ERROR busy "
         "(default: the descriptor limit, raised to its hard limit, less 128, less an eighth of the rest, at most "
         "1024, kept for refusals)",
         _number("max-connections", int, 1, strict=False)],
        ["max-per-ip", None, 64, "Most connections open at once from one address; more get ERROR busy "
         "(0: no per-address limit).", _number("max-per-ip", int, 0, strict=False)],
        ["max-buffered", None, DEFAULT_MAX_BUFFERED, "Most request bytes held in all connections at once (lines "
         "not yet ended, in bytes; at least --max-line); a connection whose bytes would pass it gets ERROR busy.",
         _number("max-buffered", int, 1, strict=False)],
        ["tls-ciphers", None, None, "With an ssl: --port: the OpenSSL cipher list offered for TLS 1.2 "
         "(default: Mozilla's intermediate profile, forward-secret AEAD suites only; TLS 1.3 is not affected)"],
        ["metrics", None, None, "Serve Prometheus metrics at /metrics, and health checks at /healthz and "
         "/readyz, on this endpoint (a bare port listens on 127.0.0.1 only); off by default.",
         metricsEndpointDescription],
        ["drain-delay", None, 0.0, "On SIGTERM, seconds between turning unready (/readyz answers 503) and closing "
         "the listener, for balancers that probe /readyz to take this host out first.",
         _number("drain-delay", float, 0, strict=False)],
    ]

    def postOptions(self) -> None:
        """Check what needs the options together: the endpoints parse, the records file can be opened."""
        if self["worker-fd"] is None:  # a worker is handed its socket; the description only says if it is proxied
            _checkEndpoint("port", self["port"])
        if self["workers"] > 1:
            if withoutProxyPrefix(self["port"]).split(":", 1)[0] not in ("tcp", "tcp6", "systemd"):
                raise usage.UsageError(f"--workers: needs a TCP --port (a port number, tcp:, tcp6:, systemd:, or "
                                       f"haproxy: in front of one), not {self['port']!r}")
        if isinstance(self["proxy-from"], str):  # the default is not passed through its coercer
            self["proxy-from"] = parseNetworks(self["proxy-from"])
        if self["proxy-from"] != parseNetworks(LOOPBACK) and not self["port"].startswith(PROXIED_PREFIX):
            raise usage.UsageError("--proxy-from: only applies with a haproxy: --port (e.g. haproxy:tcp:5050)")
        if self["max-buffered"] < self["max-line"] * (self["workers"] if self["worker-fd"] is None else 1):
            raise usage.UsageError(f"--max-buffered: {self['max-buffered']} cannot hold one line of --max-line "
                                   f"{self['max-line']} bytes" + (f" in each of {self['workers']} workers"
                                                                  if self["workers"] > 1 else ""))
        if not self["keep-alive"]:
            for option, default in (("pipeline", DEFAULTS.pipeline), ("idle-timeout", DEFAULTS.idleTimeout)):
                if self[option] != default:
                    raise usage.UsageError(f"--{option}: only applies with --keep-alive")
        if self["tls-ciphers"] is not None:
            if not withoutProxyPrefix(self["port"]).startswith("ssl:"):
                raise usage.UsageError("--tls-ciphers: only applies with an ssl: --port")
            problem = cipherProblem(self["tls-ciphers"])
            if problem is not None:
                raise usage.UsageError(f"--tls-ciphers: {self['tls-ciphers']!r}: {problem}")
        if self["metrics"] is not None:
            _checkEndpoint("metrics", self["metrics"])
            if _sameListeningPort(self["metrics"], self["port"]):
                raise usage.UsageError(f"--metrics: {self['metrics']!r} would listen on the port of --port "
                                       f"{self['port']!r}; give the metrics a port of their own")
        if isDatabaseURI(self["records"]):
            self._checkDatabaseOptions()
            return
        for option, default in (("records-table", DEFAULT_TABLE), ("records-timeout", DEFAULT_TIMEOUT),
                                ("records-connections", DEFAULT_CONNECTIONS), ("records-retention", 0)):
            if self[option] != default:
                raise usage.UsageError(f"--{option}: only applies with a postgresql:// --records")
        if not self["records"]:
            raise usage.UsageError("--records: must name a records file or a postgresql:// database, not ''")
        # Checked without creating the file: twistd applies --umask and --uid later, and the file must get them.
        problem = recordsPathProblem(self["records"])
        if problem is not None:
            raise usage.UsageError(f"--records: cannot append to {self['records']!r}: {problem}")

    def _checkDatabaseOptions(self) -> None:
        """A database --records: the driver is installed, the URI parses, the table name is one."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise usage.UsageError("--records: a postgresql:// URI needs the PostgreSQL driver: "
                                   "pip install 'primecount[postgres]'") from None
        problem = uriProblem(self["records"])
        if problem is not None:
            raise usage.UsageError(f"--records: not a usable libpq connection URI: {problem}")
        problem = tableProblem(self["records-table"])
        if problem is not None:
            raise usage.UsageError(f"--records-table: {self['records-table']!r} {problem}")
        if self["records-retention"]:
            problem = partitionNameProblem(self["records-table"])
            if problem is not None:
                raise usage.UsageError(f"--records-retention: table {self['records-table']!r} {problem}")
        if self["records-format"] != "tsv":
            raise usage.UsageError("--records-format: only applies to a records file")

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        """Parse C{options}; under twistd, a bad one stops the start with one line naming it.

        Called directly (tests, tools) a bad option raises L{usage.UsageError}. Under
        twistd, which prints this command's whole help before such an error, it
        becomes that one line on stderr and exit status 1 instead.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit(f"twistd primecount: {error} (twistd primecount --help lists the options)") from None

    def getUsage(self, width: Optional[int] = None) -> str:
        """The help, without the options a supervisor gives its workers (L{INTERNAL_OPTIONS})."""
        every = self.longOpt
        self.longOpt = [name for name in every if name.rstrip("=") not in INTERNAL_OPTIONS]
        try:
            return super().getUsage(width)
        finally:
            self.longOpt = every

    def opt_version(self) -> None:
        """Print primecount's version (and Twisted's) and exit."""
        # Command output for whoever asked, not a log event: no log observer exists while options are parsed.
        sys.stdout.write(f"primecount {__version__} (Twisted {twisted.__version__})\n")
        raise SystemExit(0)


def requestLimits(options: Options) -> RequestLimits:
    """How requests may arrive, as the options set it."""
    return RequestLimits(
        options["timeout"], options["quiet"], options["max-line"], bool(options["log-requests"]),
        keepAlive=bool(options["keep-alive"]), pipeline=options["pipeline"], idleTimeout=options["idle-timeout"],
        sendTimeout=options["send-timeout"],
    )


def configuredLimits(options: Options, maxConnections: int) -> dict[str, float]:
    """The limits in force, for the C{primecount_limit} gauges (0 where a limit is off)."""
    return {
        "max_connections": maxConnections, "max_per_ip": options["max-per-ip"], "max_line_bytes": options["max-line"],
        "max_buffered_bytes": options["max-buffered"],
        "timeout_seconds": options["timeout"], "quiet_seconds": options["quiet"], "threads": options["threads"],
        "workers": options["workers"], "keep_alive": int(bool(options["keep-alive"])),
        "pipeline": options["pipeline"] if options["keep-alive"] else 0,
        "idle_timeout_seconds": options["idle-timeout"] if options["keep-alive"] else 0,
        "send_timeout_seconds": options["send-timeout"],
    }


def workerArguments(options: Options) -> list[str]:
    """The C{twistd primecount} options of one worker: the supervisor's own, less those it keeps for itself,
    with its share of C{--max-connections}."""
    count = options["workers"]
    arguments = []
    for name, *_ in Options.optParameters:
        value = options[name]
        if name in ("workers", "worker-fd", "metrics", "drain-delay") or value is None:
            continue
        if name in ("max-connections", "max-buffered"):
            value = -(-value // count)
        elif name == "proxy-from":
            value = ",".join(str(network) for network in value)
        arguments.append(f"--{name}={value}")
    arguments += [f"--{name}" for name, *_ in Options.optFlags if options[name]]
    arguments.append(f"--worker-fd={WORKER_FD}")
    if options["metrics"]:
        arguments.append("--worker-metrics")
    return arguments
