"""primeload, the project's load generator (contrib/loadgen), built with the system's C compiler: its replies
agree with a real twistd's on every message it sends, and it reports a server that answers wrongly."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import requireTool

SOURCE = Path(__file__).resolve().parents[1] / "contrib/loadgen"


class PrimeloadTests(SynchronousTestCase):
    """primeload against a real twistd, and against a server that lies."""

    def setUp(self) -> None:
        requireTool(self, "cc")
        self.folder = Path(self.mktemp())
        self.folder.mkdir(parents=True)
        subprocess.run(["make", "--quiet", "-C", str(SOURCE), f"OUT={self.folder.resolve()}"], check=True,
                       capture_output=True, timeout=120)
        self.primeload = str(self.folder / "primeload")

    def drive(self, port: int, *arguments: str) -> tuple[int, dict]:
        """Run primeload against C{port}; its exit status and JSON summary."""
        result = subprocess.run([self.primeload, "--port", str(port), "--verify", "--json", "--messages",
                                 str(SOURCE / "messages.txt"), *arguments], capture_output=True, text=True,
                                timeout=60)
        return result.returncode, json.loads(result.stdout)

    def test_agreesWithTwistd(self) -> None:
        """Kept and one-shot, every reply of a real twistd is the one primeload computed, and every one it
        counted has its record."""
        records = self.folder / "records.txt"
        server = ServerProcess(str(records), "--keep-alive", "--max-per-ip", "0")
        self.addCleanup(server.stop)
        counted = 0
        for mode in (["--keepalive"], []):
            status, summary = self.drive(server.port, "--requests", "3000", "--duration", "30", "--conns", "8", *mode)
            self.assertEqual((status, summary["mismatches"], summary["ok"]), (0, 0, summary["completed"]), summary)
            self.assertGreaterEqual(summary["completed"], 3000)
            counted += summary["completed"]
        self.assertEqual(server.stop(), 0)
        self.assertGreaterEqual(len(records.read_text(encoding="utf-8").splitlines()), counted)

    def test_wrongRepliesAreReported(self) -> None:
        """A server that answers C{1 no} to everything is caught: mismatches counted, exit status 1."""
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)

        def serve() -> None:
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                with client:
                    if client.recv(4096):
                        client.sendall(b"1 no\n")

        threading.Thread(target=serve, daemon=True).start()
        status, summary = self.drive(listener.getsockname()[1], "--requests", "200", "--duration", "20", "--conns", "4")
        self.assertEqual(status, 1)
        self.assertGreater(summary["mismatches"], 0)
        self.assertGreater(summary["ok"], 0, "'primecount' is owed 1 no: that one matches")
