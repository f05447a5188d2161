"""A walk through README.md: every shell example whose output the page shows is run against a real server."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from twisted.trial.unittest import SynchronousTestCase

from primecount.tools.serverprocess import ServerProcess
from tests.helpers import requireTool, slow

README = Path(__file__).resolve().parents[1] / "README.md"
# The port the examples use; the walk swaps in the port its own server got.
EXAMPLE_PORT = "5050"
# Records show local time; the page shows a day of its own.
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


class Example(NamedTuple):
    """One C{$ command} of the page, the output shown under it, and where it stands."""

    line: int
    command: str
    output: str


def examples(text: str) -> list[Example]:
    """Every indented C{$ command} of C{text}, with the indented lines after it (up to a blank line or the next
    command) as its output."""
    found: list[Example] = []
    current: Optional[tuple[int, str, list[str]]] = None
    for number, line in enumerate(text.splitlines(), 1):
        body = line[4:] if line.startswith("    ") else None
        if body is not None and body.startswith("$ "):
            if current is not None:
                found.append(Example(current[0], current[1], "".join(current[2])))
            current = (number, body[2:], [])
        elif current is not None and body is not None and body.strip():
            current[2].append(body + "\n")
        elif current is not None:
            found.append(Example(current[0], current[1], "".join(current[2])))
            current = None
    if current is not None:
        found.append(Example(current[0], current[1], "".join(current[2])))
    return found


def serverOptions(command: str) -> Optional[list[str]]:
    """The primecount options of a C{twistd -n … primecount …} example that starts a server (its port left
    out: the walk listens on a free one), or C{None} for any other command."""
    words = shlex.split(command.split("#", 1)[0])
    if words[:2] != ["twistd", "-n"] or "primecount" not in words:
        return None
    options = words[words.index("primecount") + 1:]
    if "--port" in options:
        where = options.index("--port")
        del options[where:where + 2]
    return options


class ExamplesTests(SynchronousTestCase):
    """The parser finds commands and their output as the page lays them out."""

    def test_parse(self) -> None:
        """Commands with output, commands without, and the end of a block are told apart."""
        page = "text\n\n    $ a\n    one\n    two\n\n    $ b\n    $ c\n    three\nmore\n"
        self.assertEqual(examples(page), [Example(3, "a", "one\ntwo\n"), Example(7, "b", ""),
                                          Example(8, "c", "three\n")])

    def test_serverOptions(self) -> None:
        """A server start yields its options without the port; other commands yield nothing."""
        self.assertEqual(serverOptions("twistd -n --pidfile= primecount --port 5050 --keep-alive"), ["--keep-alive"])
        self.assertIsNone(serverOptions("twistd primecount --threads 0"))
        self.assertIsNone(serverOptions("printf 'a\\n' | nc -q1 127.0.0.1 5050"))


class ReadmeWalkTests(SynchronousTestCase):
    """Each example of README.md, run as a user would from a shell, prints what the page says it prints."""

    @slow
    def test_everyShownOutput(self) -> None:
        """Every C{$} example with output on the page gives that output (timestamps aside) against a real server
        started as C{make run} does, or as the page's own C{twistd -n} line says."""
        requireTool(self, "nc")
        nc = subprocess.run(["nc", "-h"], capture_output=True, text=True)
        if "OpenBSD netcat" not in nc.stdout + nc.stderr:
            self.fail("the README's examples need OpenBSD netcat (apt-get install netcat-openbsd)")
        folder = Path(os.path.abspath(self.mktemp()))
        folder.mkdir()
        environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        walked = []
        server = self.startServer(folder, [])
        for example in examples(README.read_text(encoding="utf-8")):
            options = serverOptions(example.command)
            if options is not None:
                self.assertEqual(server.stop(), 0, server.log)
                server = self.startServer(folder, options)
                continue
            if not example.output:
                continue
            command = example.command.replace(f" {EXAMPLE_PORT}", f" {server.port}")
            result = subprocess.run(["bash", "-c", command], cwd=folder, env=environ, capture_output=True,
                                    text=True, encoding="utf-8", timeout=60)
            self.assertEqual(TIMESTAMP.sub("<time>", result.stdout + result.stderr),
                             TIMESTAMP.sub("<time>", example.output),
                             f"README.md line {example.line}: {example.command}")
            walked.append(example.line)
        self.assertEqual(server.stop(), 0, server.log)
        self.assertGreaterEqual(len(walked), 6, "the page's examples were found and run")

    def startServer(self, folder: Path, options: list[str]) -> ServerProcess:
        """A server whose records go to the page's C{server_log.txt} in C{folder}, as C{make run} there would."""
        server = ServerProcess(str(folder / "server_log.txt"), *options)
        self.addCleanup(lambda: server.process.poll() is not None or server.stop())
        return server


# A stand-in for the interpreter: `-m venv DIR` makes DIR/bin/python (this same script); `-m pip install` takes
# a while and fails if another pip of the same venv is running at that moment.
FAKE_PYTHON = """#!/bin/sh
set -e
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0
fi
if [ "$3" = "install" ]; then
  here=$(dirname "$0")
  mkdir "$here/pip-running" 2>/dev/null || { echo overlap >> "$here/../../overlaps"; exit 1; }
  echo "$@" >> "$here/../../installs"
  sleep 0.5
  rmdir "$here/pip-running"
fi
"""


class MakeSetUpTests(SynchronousTestCase):
    """The README's two commands share one venv: started together, they set it up once, one after the other."""

    def test_runAndTestStartedTogether(self) -> None:
        """C{make} of the service's venv and of the test tools', started at once with the Makefile's own
        recipes (a stand-in interpreter): no two pips run at once, and the venv is set up once."""
        requireTool(self, "flock")
        folder = Path(self.mktemp()).resolve()
        folder.mkdir()
        fake = folder / "python"
        fake.write_text(FAKE_PYTHON)
        fake.chmod(0o755)
        makefile = README.parent / "Makefile"
        for name in ("setup.cfg", "pyproject.toml"):
            (folder / name).write_text((README.parent / name).read_text())
        starts = [subprocess.Popen(["make", "-s", "-f", str(makefile), f"PYTHON={fake}", "VENV=venv", target],
                                   cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                  for target in ("venv/.installed", "venv/.installed-test")]
        outputs = [start.communicate(timeout=60)[0].decode() for start in starts]
        self.assertEqual([start.returncode for start in starts], [0, 0], outputs)
        self.assertFalse((folder / "overlaps").exists(), "two pips ran in one venv at once")
        installs = (folder / "installs").read_text().splitlines()
        self.assertEqual(installs, ["-m pip install --quiet --upgrade pip", "-m pip install --quiet -e .",
                                    "-m pip install --quiet -e .[test,report]"])
