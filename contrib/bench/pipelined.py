"""One kept connection pipelining many lines: sends them all as fast as the server takes them (from a thread),
reads every reply, checks each against the one it computes itself, and prints one JSON line.

C{python contrib/bench/pipelined.py PORT [--lines N]} (the server needs C{--keep-alive}); exit status 1 if any
reply is wrong or missing.
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

MESSAGES = ["primecount", "mississippi", "añoñ", "日本語の日", "zzzzz", "🐍 python 🐍", "a", "the lazy dog"]


def expected(message: str) -> bytes:
    """The reply owed for C{message}: how often its last character occurs in it, and whether that is prime."""
    text = message.strip()
    count = text.count(text[-1])
    prime = count > 1 and all(count % divisor for divisor in range(2, int(count ** 0.5) + 1))
    return f"{count} {'sí' if prime else 'no'}\n".encode()


def main() -> None:
    """Send, read, verify, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    lines = [MESSAGES[n % len(MESSAGES)] for n in range(args.lines)]
    payload = "".join(line + "\n" for line in lines).encode()
    wanted = b"".join(expected(line) for line in lines)
    with socket.create_connection(("127.0.0.1", args.port), timeout=60) as connection:
        started = time.perf_counter()
        sender = threading.Thread(target=connection.sendall, args=(payload,), daemon=True)
        sender.start()
        received = bytearray()
        while len(received) < len(wanted):
            chunk = connection.recv(1 << 20)
            if not chunk:
                break
            received += chunk
        elapsed = time.perf_counter() - started
    good = bytes(received) == wanted
    print(json.dumps({"lines": args.lines, "seconds": round(elapsed, 3), "lines_per_s": round(args.lines / elapsed),
                      "all_ok": good}))
    raise SystemExit(0 if good else 1)


if __name__ == "__main__":
    main()
