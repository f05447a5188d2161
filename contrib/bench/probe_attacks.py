"""Probe a fresh primecount with each attack of the second hostile-clients round and print what it did.

Every probe starts its own server on loopback and ends by itself; the figures
are what the server read, answered, recorded, logged and held in memory. Run:
C{python contrib/bench/probe_attacks.py} (needs C{openssl} for the TLS probe).
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from primecount.tools.serverprocess import ServerProcess  # noqa: E402


def residentKiB(pid: int) -> int:
    """The process's resident memory."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def metric(port: int, name: str) -> float:
    """One value from a server's /metrics."""
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return float(re.search(rf"(?m)^{re.escape(name)} (\S+)$", page).group(1))


def ask(port: int, payload: bytes) -> bytes:
    """Send C{payload} and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return client.makefile("rb").read()


def neverReading(folder: str) -> str:
    """30 keep-alive clients, all the slots, send 400 KB of lines each with a 4 KB receive buffer and never
    read: how long until a newcomer is served again, and how many were aborted."""
    server = ServerProcess(os.path.join(folder, "r1.txt"), "--keep-alive", "--idle-timeout", "3", "--timeout", "2",
                           "--max-connections", "30", "--max-per-ip", "0", "--metrics", "tcp:0:interface=127.0.0.1")
    metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
    floods = []
    for _ in range(30):
        flood = socket.socket()
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.connect(("127.0.0.1", server.port))
        flood.setblocking(False)
        floods.append(flood)
    started = time.monotonic()
    for flood in floods:
        try:
            flood.send(b"a\n" * 200_000)
        except BlockingIOError:
            pass
    served = None
    while time.monotonic() - started < 300:
        if ask(server.port, b"abc2a\n") == "2 sí\n".encode():
            served = time.monotonic() - started
            break
        time.sleep(0.5)
    aborted = metric(metricsPort, 'primecount_connections_aborted_total{reason="send_timeout"}')
    answered = metric(metricsPort, 'primecount_requests_total{outcome="ok"}')
    for flood in floods:
        flood.close()
    server.stop()
    return (f"newcomer served after {served:.1f} s" if served else "newcomer not served in 300 s") + \
        f"; {aborted:.0f} aborted by the send deadline; {answered:,.0f} flood lines answered meanwhile"


def malformedProxy(folder: str) -> str:
    """200 malformed v1 headers from a trusted proxy: tracebacks, log lines, how they were counted."""
    server = ServerProcess(os.path.join(folder, "r2.txt"), "--metrics", "tcp:0:interface=127.0.0.1",
                           port="haproxy:tcp:0:interface=127.0.0.1")
    metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
    bad = [b"PROXY TCP4 1.2.3.4 5.6.7.8 x 1\r\n", b"PROXY TCP4 evil.example 5.6.7.8 1 2\r\n",
           b"PROXY TCP4 006.006.006.016 5.6.7.8 1 2\r\n", b"PROXY TCP6 fe80::1%evil ::1 1 2\r\n"]
    for n in range(200):
        ask(server.port, bad[n % 4])
    mapped = ask(server.port, b"PROXY TCP6 ::ffff:6.6.6.9 ::1 1 2\r\nabc2a\n")
    malformed = metric(metricsPort, 'primecount_connections_without_request_total{reason="malformed"}')
    server.stop()
    clients = [line.split("\t")[1] for line in Path(folder, "r2.txt").read_text().splitlines()]
    return (f"{server.log.count('Traceback')} tracebacks, {server.log.count('without a valid PROXY header')} log "
            f"lines, {malformed:.0f} counted malformed; ::ffff:6.6.6.9 answered {mapped!r}, recorded as {clients}")


def controlCharacters(folder: str) -> str:
    """A message with ESC, BEL, NUL, DEL, NEL and U+2028: raw control characters in the records file."""
    server = ServerProcess(os.path.join(folder, "r3.txt"))
    ask(server.port, "x\x1b]0;owned\x07\x00\x7f\x85\u2028x\n".encode())
    server.stop()
    text = Path(folder, "r3.txt").read_text(encoding="utf-8")
    raw = len(re.findall("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]", text))
    return f"{raw} raw control characters in the file; {len(text.splitlines())} line(s) by str.splitlines()"


def tornTailMode(folder: str) -> str:
    """A records file of mode 0600 with a torn tail: the mode of the file it is moved to."""
    path = os.path.join(folder, "r4.txt")
    with open(path, "w") as file:
        file.write("2026-11-26 10:00:00\t127.0.0.1\ttorn")
    os.chmod(path, 0o600)
    server = ServerProcess(path)
    server.stop()
    torn = [name for name in os.listdir(folder) if name.startswith("r4.txt.torn-")]
    return ", ".join(f"{name}: {stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode):04o}" for name in torn)


def metricsFlood(folder: str) -> str:
    """Two connections pipelining GET /metrics without reading for 12 s, and a 200 MB POST: server growth."""
    server = ServerProcess(os.path.join(folder, "r5.txt"), "--metrics", "tcp:0:interface=127.0.0.1")
    metricsPort = int(server.waitFor(rb"Site starting on (\d+)").group(1))
    before = residentKiB(server.process.pid)
    clients = [socket.create_connection(("127.0.0.1", metricsPort)) for _ in range(2)]
    for client in clients:
        client.setblocking(False)
    sent, deadline = 0, time.monotonic() + 12
    while time.monotonic() < deadline and clients:
        for client in list(clients):
            try:
                sent += client.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                clients.remove(client)
    grown = residentKiB(server.process.pid) - before
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", metricsPort), timeout=10) as post:
        post.sendall(b"POST /metrics HTTP/1.1\r\nContent-Length: 200000000\r\n\r\n")
        status = post.recv(100).split(b"\r\n")[0].decode()
    answeredIn = time.monotonic() - started
    server.stop()
    return (f"pipelined GETs: {sent:,} bytes offered, server grew {grown} KiB, both connections "
            f"{'closed by the server' if not clients else 'still open'}; 200 MB POST: {status!r} after "
            f"{answeredIn * 1000:.0f} ms, body unread")


def crlfAtLimit(folder: str) -> str:
    """A CRLF line of exactly --max-line bytes."""
    server = ServerProcess(os.path.join(folder, "r6.txt"), "--max-line", "10")
    crlf, lf = ask(server.port, b"a" * 10 + b"\r\n"), ask(server.port, b"a" * 10 + b"\n")
    server.stop()
    return f"CRLF: {crlf!r}; LF: {lf!r}"


def tlsSuites(folder: str) -> str:
    """Which TLS 1.2 suites a default ssl: port accepts, by a real openssl s_client."""
    key, certificate = os.path.join(folder, "key.pem"), os.path.join(folder, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", certificate, "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    server = ServerProcess(os.path.join(folder, "r7.txt"),
                           port=f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}")
    results = []
    for cipher in ("AES128-SHA", "AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-GCM-SHA256",
                   "ECDHE-ECDSA-CHACHA20-POLY1305"):
        shake = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_2",
                                "-cipher", cipher, "-brief", "-ign_eof"], input=b"abc2a\n", capture_output=True,
                               timeout=30)
        results.append(f"{cipher} {'accepted' if '2 sí'.encode() in shake.stdout else 'refused'}")
    server.stop()
    return "; ".join(results)


def main() -> None:
    """Run the probes named (every one by default) and print one line each."""
    import argparse

    probes = [neverReading, malformedProxy, controlCharacters, tornTailMode, metricsFlood, crlfAtLimit, tlsSuites]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("probes", nargs="*", metavar="probe", choices=[[]] + [p.__name__ for p in probes],
                        help=f"probes to run (default every one): {', '.join(p.__name__ for p in probes)}")
    chosen = parser.parse_args().probes
    with tempfile.TemporaryDirectory(prefix="primecount-probe-") as folder:
        for probe in probes:
            if not chosen or probe.__name__ in chosen:
                print(f"{probe.__name__}: {probe(folder)}", flush=True)


if __name__ == "__main__":
    main()
