"""What HAProxy costs per connection in front of primecount: HAProxy 2.x in TCP mode with the shipped
configuration (send-proxy-v2, the /readyz check, per-connection logging off) before one primecount on a
haproxy: port; primeload drives one-shot requests through it for a few seconds, and HAProxy's and primecount's
CPU time (from /proc) are divided by the connections and requests. Run: C{python contrib/bench/haproxy_cost.py}
(needs haproxy, cc and make)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import freePort, prepare, runLoad, treeCpuSeconds  # noqa: E402

from primecount.tools.serverprocess import ServerProcess  # noqa: E402
from tests.test_haproxy import haproxyConfig  # noqa: E402




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--keepalive", action="store_true",
                        help="clients keep their connections (primecount --keep-alive): HAProxy's CPU per request")
    arguments = parser.parse_args()
    workdir, primeload, messages = prepare("primecount-haproxy-cost-")
    server = ServerProcess(str(workdir / "records.txt"), "--max-per-ip", "0", "--metrics",
                           "tcp:0:interface=127.0.0.1", *(["--keep-alive"] if arguments.keepalive else []),
                           port="haproxy:tcp:0:interface=127.0.0.1")
    port = freePort()
    text = haproxyConfig(f"127.0.0.1:{port}", [f"127.0.0.1:{server.port} port {server.metricsPort}"])
    text = text.replace("option tcplog", "option dontlog-normal")
    (workdir / "haproxy.cfg").write_text(text)
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        before = treeCpuSeconds(haproxy.pid), treeCpuSeconds(server.process.pid)
        summary = runLoad(primeload, port, ["--conns", str(arguments.conns),
                                            *(["--keepalive"] if arguments.keepalive else [])],
                          arguments.seconds, messages, None)
        after = treeCpuSeconds(haproxy.pid), treeCpuSeconds(server.process.pid)
        mode = "kept connections" if arguments.keepalive else "one-shot"
        print(f"{mode} through HAProxy, {arguments.conns} connections, {arguments.seconds:g} s: "
              f"{summary['rps']:,.0f} req/s, {summary['connections']:,} connections, {summary['mismatches']} "
              f"mismatches\n  HAProxy CPU {(after[0] - before[0]) / summary['completed'] * 1e6:.1f} µs per "
              f"request; primecount CPU {(after[1] - before[1]) / summary['completed'] * 1e6:.1f} µs per request")
    finally:
        haproxy.terminate()
        haproxy.wait()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
