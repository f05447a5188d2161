"""Shared listening socket or SO_REUSEPORT for --workers: measure balance and what a dying worker loses.

Two minimal Twisted line servers (the primecount answer, no records) run as
two worker processes in each arrangement:

- shared: the parent binds one socket, both workers adopt it (C{adoptStreamPort})
  and accept from its single queue, as C{primecount --workers} does;
- reuseport: each worker binds its own socket on the same port with
  C{SO_REUSEPORT} (Twisted's C{tcp.makeBinding(reusePort=True)}); the kernel
  hashes each new connection to one of them.

Balance: loadgen sends one-shot requests from 50 connections for a few
seconds; each worker reports how many it answered. Loss: worker A is
stopped (SIGSTOP), 200 clients connect and send a request, then A is killed
(SIGKILL); we count how many of the 200 are still answered (by worker B).
Run: C{python contrib/bench/worker_socket.py}.
"""

from __future__ import annotations

import argparse
import shutil
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen_compare import ROOT, freePort, prepare, runLoad  # noqa: E402

WORKER = textwrap.dedent('''
    import signal, socket, sys
    from twisted.internet import reactor, tcp
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    answered = 0

    class Answer(LineReceiver):
        delimiter = b"\\n"

        def lineReceived(self, line):
            global answered
            message = line.decode("utf-8").strip()
            count = message.count(message[-1])
            prime = count > 1 and all(count % d for d in range(2, int(count ** 0.5) + 1))
            answered += 1
            self.transport.write(f"{count} {'sí' if prime else 'no'}\\n".encode())
            self.transport.loseConnection()

    def report(*_):
        sys.stdout.write(f"{answered}\\n")
        sys.stdout.flush()
        reactor.callFromThread(reactor.stop)

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, report)  # after the reactor's own handlers
    factory = Factory.forProtocol(Answer)
    mode, port = sys.argv[1], int(sys.argv[2])
    if mode == "shared":
        reactor.adoptStreamPort(3, socket.AF_INET, factory)
    else:
        tcp.Port(tcp.makeBinding("127.0.0.1", port, reusePort=True), factory, 1024, reactor=reactor).startListening()
    sys.stdout.write("ready\\n")
    sys.stdout.flush()
    reactor.run()
''')


def startWorkers(script: Path, mode: str, port: int, listener: socket.socket | None) -> list[subprocess.Popen]:
    """Two workers in C{mode}; with C{shared}, C{listener} is handed over as descriptor 3."""
    workers = []
    for _ in range(2):
        kwargs: dict = {}
        if listener is not None:
            os.dup2(listener.fileno(), 3)
            kwargs["pass_fds"] = (3,)
        worker = subprocess.Popen([sys.executable, str(script), mode, str(port)], stdout=subprocess.PIPE, **kwargs)
        assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
        workers.append(worker)
    return workers


def stopAll(workers: list[subprocess.Popen]) -> list[int]:
    """SIGTERM each (it prints how many it answered); return the counts (-1 for one already dead)."""
    counts = []
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            counts.append(int(worker.communicate(timeout=30)[0].split()[-1]))
        else:
            counts.append(-1)
    return counts


def listenerFor(mode: str) -> tuple[int, socket.socket | None]:
    """A port, and for C{shared} the parent's listening socket on it."""
    if mode != "shared":
        return freePort(), None
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.setblocking(False)  # adoptStreamPort needs a non-blocking socket
    return listener.getsockname()[1], listener


def lossWhenOneDies(script: Path, mode: str, clients: int = 200) -> int:
    """Stop worker A, connect C{clients} that each send a request, kill A: how many are still answered."""
    port, listener = listenerFor(mode)
    workers = startWorkers(script, mode, port, listener)
    workers[0].send_signal(signal.SIGSTOP)
    connections = []
    for n in range(clients):
        connection = socket.create_connection(("127.0.0.1", port), timeout=5)
        connection.sendall(f"abc{n}\n".encode())
        connections.append(connection)
    time.sleep(0.5)
    workers[0].kill()
    workers[0].wait()
    answered = 0
    for connection in connections:
        try:
            answered += bool(connection.recv(100))
        except OSError:
            pass
        connection.close()
    stopAll(workers)
    if listener is not None:
        listener.close()
    return answered


def main() -> None:
    """Measure both arrangements and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args()
    workdir, loadgen, messages = prepare("primecount-sockets-")
    try:
        script = workdir / "worker.py"
        script.write_text(WORKER, encoding="utf-8")
        rows = []
        for mode in ("shared", "reuseport"):
            port, listener = listenerFor(mode)
            workers = startWorkers(script, mode, port, listener)
            summary = runLoad(loadgen, port, ["--conns", "50"], args.duration, messages, None)
            counts = stopAll(workers)
            if listener is not None:
                listener.close()
            rows.append((mode, summary["rps"], counts, lossWhenOneDies(script, mode)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"two workers, unpinned; balance under {args.duration:g} s of 50 one-shot clients; then 200 clients "
          "connect to a stopped worker A that is killed")
    print(f"{'socket':<10} {'req/s':>8} {'worker A':>9} {'worker B':>9} {'A share':>8} {'answered of 200':>16}")
    for mode, rps, (first, second), answered in rows:
        print(f"{mode:<10} {rps:>8.0f} {first:>9} {second:>9} {first / max(1, first + second):>8.1%} {answered:>16}")


if __name__ == "__main__":
    main()
