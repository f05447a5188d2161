"""What health checks cost a primecount: the server's CPU time per C{GET /readyz} and C{GET /healthz}, beside a
scrape of C{/metrics}, and how far the probes slow the requests it serves meanwhile.

A twistd primecount with C{--metrics} is started; this script sends C{--probes} requests to each path, one
connection each, one after another (as balancers probing every second would, many times over), and reads the
server's CPU time (utime + stime from /proc) before and after. Then primeload drives one-shot requests for a
few seconds with and without a thread probing C{/readyz} as fast as it can. Run:
C{python contrib/bench/health_probes.py} (Linux; cc and make build primeload into a temporary folder).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import prepare, runLoad, treeCpuSeconds  # noqa: E402

from primecount.tools.serverprocess import ServerProcess  # noqa: E402




def get(port: int, path: str) -> bytes:
    """One C{GET path} on its own connection; the whole response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    return received


def probeCost(server: ServerProcess, port: int, path: str, count: int) -> tuple[float, float]:
    """Server CPU microseconds per probe of C{path}, and the probes' wall-clock rate."""
    before, started = treeCpuSeconds(server.process.pid), time.perf_counter()
    for _ in range(count):
        reply = get(port, path)
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
    elapsed = time.perf_counter() - started
    return (treeCpuSeconds(server.process.pid) - before) / count * 1e6, count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probes", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=5.0)
    arguments = parser.parse_args()
    workdir, primeload, messages = prepare("primecount-health-probes-")
    try:
        server = ServerProcess(str(workdir / "records.txt"), "--metrics", "tcp:0:interface=127.0.0.1")
        try:
            metrics = server.metricsPort
            print(f"probes of a single process, {arguments.probes} each, one connection each:")
            for path in ("/healthz", "/readyz", "/metrics"):
                micros, rate = probeCost(server, metrics, path, arguments.probes)
                print(f"  {path:9} server CPU {micros:6.1f} us per probe ({rate:,.0f} probes/s from one client)")
            for label, probing in (("without probes", False), ("with /readyz probed in a loop", True)):
                stop = threading.Event()
                probes = [0]

                def probeLoop() -> None:
                    while not stop.is_set():
                        get(metrics, "/readyz")
                        probes[0] += 1

                thread = threading.Thread(target=probeLoop) if probing else None
                if thread:
                    thread.start()
                summary = runLoad(primeload, server.port, ["--conns", "50"], arguments.seconds, messages, None)
                stop.set()
                if thread:
                    thread.join()
                print(f"  one-shot load {label}: {summary['rps']:,.0f} req/s, p99 "
                      f"{summary['latency_us']['p99'] / 1000:.2f} ms"
                      + (f", {probes[0] / arguments.seconds:,.0f} probes/s" if probing else ""))
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
