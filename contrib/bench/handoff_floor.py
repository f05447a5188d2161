"""Measure the one-client latency floor of a Twisted line server with and without a thread hand-off.

primecount answers each request on the reactor's thread pool. This script
shows what that hand-off costs on its own, apart from primecount's code: three
minimal keep-alive line servers (answer in the reactor thread; hand the
analysis to one plain thread and back with C{callFromThread}; hand it to the
reactor's pool with C{deferToThread}) are each driven by the verifying loadgen
with one keep-alive client, server pinned to one core and loadgen to the other,
beside the original server's one-shot figure. Run: C{python
contrib/bench/handoff_floor.py} (needs taskset; the original server from ../shared/tools).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import (  # noqa: E402
    ROOT, Baseline, freePort, originalServer, prepare, runLoad, waitForPort,
)

SERVER = textwrap.dedent('''
    import queue, sys, threading
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.internet.threads import deferToThread
    from twisted.protocols.basic import LineReceiver

    def answer(line):
        message = line.decode("utf-8").strip()
        count = message.count(message[-1])
        prime = count > 1 and all(count % d for d in range(2, int(count ** 0.5) + 1))
        return f"{count} {'sí' if prime else 'no'}\\n".encode()

    work = queue.SimpleQueue()

    def worker():
        while True:
            line, write = work.get()
            reactor.callFromThread(write, answer(line))

    class Answer(LineReceiver):
        delimiter = b"\\n"

        def lineReceived(self, line):
            mode = sys.argv[2]
            if mode == "reactor thread":
                self.transport.write(answer(line))
            elif mode == "one plain thread":
                work.put((line, self.transport.write))
            else:
                deferToThread(answer, line).addCallback(self.transport.write)

    threading.Thread(target=worker, daemon=True).start()
    reactor.listenTCP(int(sys.argv[1]), Factory.forProtocol(Answer), interface="127.0.0.1")
    reactor.run()
''')
MODES = ["reactor thread", "one plain thread", "reactor pool (deferToThread)"]


def main() -> None:
    """Run each minimal server and the baseline, print median p50 latencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    workdir, loadgen, messages = prepare("primecount-handoff-")
    original = originalServer(args.shared) is not None
    try:
        script = workdir / "minimal_server.py"
        script.write_text(SERVER, encoding="utf-8")
        p50: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            if original:
                baseline = Baseline(workdir, args.shared, "0")
                try:
                    summary = runLoad(loadgen, baseline.port, ["--conns", "1"], args.duration, messages, "1")
                    p50.setdefault("original server, one-shot", []).append(summary["latency_us"]["p50"])
                finally:
                    baseline.stop()
            for mode in MODES:
                port = freePort()
                server = subprocess.Popen(["taskset", "-c", "0", sys.executable, str(script), str(port), mode])
                try:
                    waitForPort(port, server)
                    time.sleep(0.2)
                    summary = runLoad(loadgen, port, ["--conns", "1", "--keepalive"], args.duration, messages, "1")
                    p50.setdefault(f"minimal Twisted, keep-alive, answer in {mode}", []).append(
                        summary["latency_us"]["p50"])
                finally:
                    server.terminate()
                    server.wait(timeout=30)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"one client, p50 latency, median of {args.rounds} x {args.duration:g} s; server core 0, loadgen core 1")
    for name, values in p50.items():
        print(f"  {statistics.median(values):7.1f} us  {name}")


if __name__ == "__main__":
    main()
