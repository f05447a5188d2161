"""Probe a fresh primecount with each failure of the third hostile round (the quiet ones) and print what it did.

Every probe starts its own servers on loopback and ends by itself; the figures
are what the server answered, recorded, logged and held in memory. Run:
C{python contrib/bench/probe_quiet_failures.py [probe ...]} (needs openssl's
Python bindings for the TLS probe and Debian's PostgreSQL for the database one).
Run from another checkout's folder, the servers are that checkout's code.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from primecount.tools.serverprocess import ServerProcess  # noqa: E402


def residentMiB(pid: int) -> float:
    """The process's resident memory."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def ask(port: int, payload: bytes, timeout: float = 10) -> bytes:
    """Send C{payload}, half-close, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return client.makefile("rb").read()


def drain(server: ServerProcess) -> threading.Thread:
    """Keep reading the server's log into C{server.output} until it exits, so that a server that logs a lot is
    never held up by a full pipe; join the thread after stopping the server, then read C{server.log}."""

    def read() -> None:
        assert server.process.stdout is not None
        while chunk := server.process.stdout.read1(65536):  # type: ignore[attr-defined]
            server.output += chunk

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def stop(server: ServerProcess, reader: threading.Thread) -> int:
    """SIGTERM, wait for the exit and the rest of the log (read by L{drain}); the exit status."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(60)
    except Exception:
        server.process.kill()
        server.process.wait()
    reader.join(10)
    return server.process.returncode


def metricsPort(server: ServerProcess) -> int:
    """The port of a server's --metrics listener."""
    return int(server.waitFor(rb"Site starting on (\d+)").group(1))


def scrape(port: int) -> str:
    """One scrape's text."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def latencies(port: int, seconds: float) -> list[float]:
    """A legitimate client's one-shot requests, one after another for C{seconds}: each one's latency in ms."""
    found, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        started = time.perf_counter()
        if ask(port, b"legitimate\n") == "2 sí\n".encode():
            found.append((time.perf_counter() - started) * 1000)
    return found


def quantiles(values: list[float]) -> str:
    """Median and p99 of C{values}."""
    if len(values) < 2:
        return "no samples"
    cuts = statistics.quantiles(values, n=100)
    return f"p50 {cuts[49]:.2f} ms, p99 {cuts[98]:.2f} ms ({len(values)} requests)"


def recorded(path: str) -> list[str]:
    """The messages of a records file."""
    return [line.split("\t")[2] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def termOnTheLine(folder: str) -> str:
    """40 starts, each sent SIGTERM the moment it says it listens: how many drained and exited 0."""
    statuses = []
    for n in range(40):
        server = ServerProcess(os.path.join(folder, f"term{n}.txt"))
        server.signal(signal.SIGTERM)
        statuses.append(server.stop())
    killed = sum(1 for status in statuses if status == -signal.SIGTERM)
    return f"{statuses.count(0)} of 40 exited 0 after a drain, {killed} killed by SIGTERM"


def tlsAtTheLimit(folder: str) -> str:
    """--max-connections 2 over TLS, both held: what 200 more TLS clients read, tracebacks and log lines; how
    long a client that never handshakes holds its place."""
    from tests.test_tls import selfSignedCertificate

    key, certificate = selfSignedCertificate(folder)
    server = ServerProcess(os.path.join(folder, "tls.txt"), "--max-connections", "2", "--max-per-ip", "0",
                           port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}")
    reader = drain(server)
    context = ssl.create_default_context(cafile=certificate)
    held = [context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="localhost")
            for _ in range(2)]
    replies: list[bytes] = []

    def refused() -> None:
        try:
            with context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10),
                                     server_hostname="localhost") as connection:
                connection.sendall(b"hello\n")
                received = b""
                while chunk := connection.recv(100):
                    received += chunk
                replies.append(received)
        except (OSError, ssl.SSLError) as error:
            replies.append(type(error).__name__.encode())

    for start in range(0, 200, 20):
        threads = [threading.Thread(target=refused) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for connection in held:
        connection.close()
    silent = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    started = time.monotonic()
    try:
        silent.recv(1)
    except OSError:
        pass
    heldFor = time.monotonic() - started
    stop(server, reader)
    counts = {reply: replies.count(reply) for reply in set(replies)}
    return (f"200 refused TLS clients read {counts}; {server.log.count('Traceback')} tracebacks, "
            f"{server.log.count(chr(10))} log lines in all; a client that never handshakes is closed after "
            f"{heldFor:.1f} s (--timeout 5)")


def deadSupervisor(folder: str) -> str:
    """--workers 2 under load, kill -9 of the supervisor: how long until both workers are gone, what they
    answered meanwhile and whether it was recorded, and whether a restart binds the port."""
    records = os.path.join(folder, "sup.txt")
    server = ServerProcess(records, "--workers", "2", "--max-per-ip", "0")
    server.waitForWorkers(2)
    workers = [int(pid) for pid in re.findall(r"started worker \d+ \(pid (\d+)\)", server.log)]
    answered, ending = [], threading.Event()

    def client(number: int) -> None:
        n = 0
        while not ending.is_set():
            message = f"sup {number} {n}"
            n += 1
            try:
                if ask(server.port, message.encode() + b"\n", timeout=2).endswith((b"s\xc3\xad\n", b"no\n")):
                    answered.append(message)
            except OSError:
                time.sleep(0.01)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    before = len(answered)
    server.process.kill()
    killedAt = time.monotonic()
    server.process.wait()
    gone = None
    while time.monotonic() - killedAt < 60:
        if not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"
                   for pid in workers):
            gone = time.monotonic() - killedAt
            break
        time.sleep(0.01)
    ending.set()
    for thread in threads:
        thread.join()
    missing = set(answered) - set(recorded(records))
    try:
        again = ServerProcess(os.path.join(folder, "sup2.txt"), port=f"tcp:{server.port}:interface=127.0.0.1")
        again.stop()
        restart = "a restart on the same port listened at once"
    except RuntimeError:
        restart = "a restart on the same port failed"
    for pid in workers:  # an orphan left serving is not left behind by the probe
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return (f"workers gone {gone:.2f} s after the kill" if gone is not None else "workers still running 60 s on") + \
        f"; {len(answered) - before} requests answered after it, {len(missing)} answered without a record; {restart}"


def removedRecordsFile(folder: str) -> str:
    """Four clients for 3 s, the records file removed after 1 s: answered after the removal, how many of them
    are in the file at the path, and what was logged."""
    records = os.path.join(folder, "rm.txt")
    server = ServerProcess(records, "--max-per-ip", "0")
    reader = drain(server)
    replied: list[tuple[float, str]] = []
    ending = threading.Event()

    def client(number: int) -> None:
        n = 0
        while not ending.is_set():
            message, sentAt = f"rm {number} {n}", time.monotonic()
            n += 1
            if ask(server.port, message.encode() + b"\n").endswith((b"s\xc3\xad\n", b"no\n")):
                replied.append((sentAt, message))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1)
    os.remove(records)
    removedAt = time.monotonic()
    time.sleep(2)
    ending.set()
    for thread in threads:
        thread.join()
    stop(server, reader)
    after = {message for sentAt, message in replied if sentAt > removedAt}
    kept = set(recorded(records)) if os.path.exists(records) else set()
    lines = server.log.count("was removed or replaced while open")
    return (f"{len(after):,} answered after the removal, {len(after & kept):,} of them in the file at the path, "
            f"{len(after - kept):,} lost; {lines} log line(s) about it")


def errorFlood(folder: str) -> str:
    """5 s of one-shot empty lines, invalid UTF-8 and lines too long from four threads, without and with
    --metrics: ERROR replies, and the log lines and bytes they cost."""
    results = []
    for extra in ([], ["--metrics", "tcp:0:interface=127.0.0.1"]):
        server = ServerProcess(os.path.join(folder, f"flood{len(extra)}.txt"), "--max-line", "10", "--max-per-ip",
                               "0", *extra)
        ending, sent = threading.Event(), [0]

        def client() -> None:
            payloads = (b"\n", b"\xff\n", b"x" * 20 + b"\n")
            while not ending.is_set():
                ask(server.port, payloads[sent[0] % 3])
                sent[0] += 1

        threads = [threading.Thread(target=client) for _ in range(4)]
        before = server.log.count("\n")
        beforeBytes = len(server.output)
        reader = drain(server)
        for thread in threads:
            thread.start()
        time.sleep(5)
        ending.set()
        for thread in threads:
            thread.join()
        stop(server, reader)
        errorLines = len(re.findall(r"ERROR (?:empty message|invalid UTF-8|line too long)", server.log))
        results.append(f"{'with --metrics' if extra else 'defaults'}: {sent[0]:,} ERROR replies, {errorLines} log "
                       f"lines for them ({server.log.count(chr(10)) - before} lines, "
                       f"{(len(server.output) - beforeBytes) / 1024:.1f} KiB in all)")
    return "; ".join(results)


def partialLines(folder: str) -> str:
    """8,000 connections each sending a 65,000-byte line without its newline (the default --max-buffered, 64
    MiB): the server's memory, how many were refused, a legitimate client's latency meanwhile; then 200
    connections sending 7,000 bytes a byte at a time: memory per byte held."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = ServerProcess(os.path.join(folder, "partial.txt"), "--max-per-ip", "0", "--timeout", "120",
                           "--quiet", "0", port="tcp:0:interface=127.0.0.1:backlog=4096")
    reader = drain(server)
    rssBefore = residentMiB(server.process.pid)
    clients, refused = [], 0
    for _ in range(8000):
        client = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        client.setblocking(False)
        try:
            client.send(b"a" * 65_000)
        except (BlockingIOError, ConnectionResetError):
            pass
        clients.append(client)
    legitimate = latencies(server.port, 3)
    rssHeld = residentMiB(server.process.pid)
    for client in clients:
        try:
            if client.recv(100).startswith(b"ERROR busy"):
                refused += 1
        except (BlockingIOError, ConnectionResetError):
            pass
        client.close()
    stop(server, reader)
    server = ServerProcess(os.path.join(folder, "bytes.txt"), "--max-per-ip", "0", "--timeout", "120",
                           "--quiet", "0")
    reader = drain(server)
    trickles = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    for trickle in trickles:
        trickle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rssBefore2 = residentMiB(server.process.pid)
    for _ in range(7000):
        for trickle in trickles:
            trickle.send(b"b")
    time.sleep(1)  # the last bytes read
    grown = residentMiB(server.process.pid) - rssBefore2
    for trickle in trickles:
        trickle.close()
    stop(server, reader)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return (f"8,000 x 65 KB partial lines: RSS {rssBefore:.0f} MB -> {rssHeld:.0f} MB, {refused:,} answered ERROR "
            f"busy; a legitimate client meanwhile {quantiles(legitimate)}; 1.4 MB sent a byte at a time over 200 "
            f"connections: RSS +{grown:.1f} MB")


def descriptorFlood(folder: str) -> str:
    """A server limited to 1,000 descriptors, 3,000 clients connecting at once and staying: EMFILE lines in its
    log, the most descriptors it held, what the clients read, and a newcomer once they are gone."""
    limited = [sys.executable, "-c", "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
               "(1000, 1000)); os.execv(sys.argv[1], sys.argv[1:])"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = ServerProcess(os.path.join(folder, "fds.txt"), "--max-per-ip", "0", "--timeout", "20",
                           prefix=limited, port="tcp:0:interface=127.0.0.1:backlog=4096")
    reader = drain(server)
    clients, most, outcomes = [], 0, {"served": 0, "ERROR busy": 0, "reset": 0, "closed": 0}
    for n in range(3000):
        clients.append(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        if n % 100 == 0:
            most = max(most, len(os.listdir(f"/proc/{server.process.pid}/fd")))
    time.sleep(3)
    most = max(most, len(os.listdir(f"/proc/{server.process.pid}/fd")))
    for client in clients:
        client.setblocking(False)
        try:
            data = client.recv(100)
            outcomes["ERROR busy" if data.startswith(b"ERROR busy") else "closed"] += 1
        except BlockingIOError:
            outcomes["served"] += 1
        except ConnectionResetError:
            outcomes["reset"] += 1
        client.close()
    time.sleep(3)
    try:
        newcomer = ask(server.port, b"newcomer\n")
    except OSError as error:
        newcomer = type(error).__name__.encode()
    stop(server, reader)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    emfile = len(re.findall(r"EMFILE|Too many open files|Out of file descriptors", server.log))
    return (f"{emfile} EMFILE log lines; at most {most} descriptors held (limit 1,000); clients: {outcomes}; "
            f"a newcomer afterwards read {newcomer!r}")


def metricsUnderAttack(folder: str) -> str:
    """16 silent connections to the metrics port, then 10 scrapes: how many succeed and how fast; then 1,000
    scrapes/s for 5 s beside a legitimate client: its latency against the same client with no scrapes."""
    server = ServerProcess(os.path.join(folder, "m.txt"), "--metrics", "tcp:0:interface=127.0.0.1")
    port = metricsPort(server)
    reader = drain(server)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    times, failed = [], 0
    for _ in range(10):
        started = time.monotonic()
        try:
            scrape(port)
            times.append(time.monotonic() - started)
        except OSError:
            failed += 1
    for connection in silent:
        connection.close()
    quiet = latencies(server.port, 5)
    ending, scrapes = threading.Event(), [0]

    def flood() -> None:
        while not ending.is_set():
            began = time.monotonic()
            for _ in range(100):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                        connection.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
                        while connection.recv(65536):
                            pass
                    scrapes[0] += 1
                except OSError:
                    pass
            time.sleep(max(0.0, 0.1 - (time.monotonic() - began)))

    flooder = threading.Thread(target=flood)
    flooder.start()
    loud = latencies(server.port, 5)
    ending.set()
    flooder.join()
    stop(server, reader)
    return (f"beside 16 silent connections: {len(times)} of 10 scrapes succeeded (slowest "
            f"{max(times) * 1000 if times else 0:.0f} ms), {failed} failed; a legitimate client without scrapes "
            f"{quantiles(quiet)}, beside {scrapes[0] / 5:.0f} scrapes/s {quantiles(loud)}")


def databaseRestart(folder: str) -> str:
    """A clean restart of the records database between requests (one process, then two idle workers), a
    malformed URI, and a database down at start: what clients and the log see."""
    from tests.postgres import Cluster, postgresBinaries

    binaries = postgresBinaries()
    if binaries is None:
        return "skipped: PostgreSQL is not installed"
    cluster = Cluster(binaries)
    try:
        cluster.start()
        firsts = []
        for workers in ("1", "2"):
            server = ServerProcess(cluster.uri, "--workers", workers, "--max-per-ip", "0")
            if workers == "2":
                server.waitForWorkers(2)
            ask(server.port, b"before\n")
            cluster.stop("fast")
            cluster.start()
            firsts.append(f"{workers} worker(s): " + ", ".join(
                ask(server.port, f"after {n}\n".encode()).decode().strip() for n in range(4)))
            server.stop()
        try:
            ServerProcess("postgresql://primecount@127.0.0.1:99999/postgres").stop()
            bad = "a bad port was accepted"
        except RuntimeError as error:
            bad = next((line for line in str(error).splitlines() if "--records" in line), "refused").strip()
        cluster.stop()
        down = ServerProcess(cluster.uri)
        try:
            warning = down.waitFor(rb"\] (records database not reachable[^\n]*)", 10).group(1).decode()
        except RuntimeError:
            warning = "no line at start"
        first = ask(down.port, b"while down\n").decode().strip()
        down.stop()
    finally:
        cluster.destroy()
    return f"first requests after pg_ctl restart -m fast: {'; '.join(firsts)}; malformed URI: {bad!r}; " \
           f"database down at start: {warning!r}, first request {first!r}"


PROBES: list[Callable[[str], str]] = [termOnTheLine, tlsAtTheLimit, deadSupervisor, removedRecordsFile, errorFlood,
                                      partialLines, descriptorFlood, metricsUnderAttack, databaseRestart]


def main() -> None:
    """Run the probes named on the command line (all by default) and print one line each."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="*", metavar="probe", choices=[[]] + [p.__name__ for p in PROBES],
                        help=f"probes to run (default every one): {', '.join(p.__name__ for p in PROBES)}")
    names = parser.parse_args().probes
    chosen = [probe for probe in PROBES if not names or probe.__name__ in names]
    with tempfile.TemporaryDirectory(prefix="primecount-probe-") as folder:
        for probe in chosen:
            print(f"{probe.__name__}: {probe(folder)}", flush=True)


if __name__ == "__main__":
    main()
