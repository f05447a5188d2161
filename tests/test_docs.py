"""Every Python snippet the docs show runs: each fenced Python block of README.md, docs/ and jmeter/README.md
(beside a small records file), each C{python -c "..."} of their shell examples, and each Python name they cite
(C{primecount.records.parseRecords}) resolves. The README's shell examples have their own walk (test_readme)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "jmeter" / "README.md"]
FENCED = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
DASH_C = re.compile(r"python3? -c \"([^\"]+)\"")
# A dotted name in a code span: primecount.x.y, with a call's arguments or nothing after it.
CITED = re.compile(r"`(primecount(?:\.[A-Za-z_]\w*)+)(?:\(|`)")
# Code spans that name files, not Python: unit files, the JMeter plan.
NOT_PYTHON = (".socket", ".service", ".jmx")


def snippets() -> list[tuple[str, str]]:
    """Every fenced Python block and every C{python -c} program of the pages: where it is, and its text."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCED.finditer(text) or ():
            found.append((f"{page.name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
        for match in DASH_C.finditer(text):
            found.append((f"{page.name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1)))
    return found


def cited() -> list[tuple[str, str]]:
    """Every dotted C{primecount.} name a page cites in a code span (not a unit file's): where, and the name."""
    return [(f"{page.name}:{text[:match.start()].count(chr(10)) + 1}", match.group(1))
            for page in PAGES for text in [page.read_text(encoding="utf-8")]
            for match in CITED.finditer(text) if not match.group(1).endswith(NOT_PYTHON)]


def resolve(name: str) -> object:
    """The object a dotted name names: the longest module prefix imported, the rest as attributes."""
    parts = name.split(".")
    for length in range(len(parts), 0, -1):
        try:
            found: object = importlib.import_module(".".join(parts[:length]))
        except ImportError:
            continue
        for attribute in parts[length:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(name)


class SnippetTests(SynchronousTestCase):
    """The docs' Python runs as shown."""

    def test_thereAreSnippets(self) -> None:
        """The pages hold the snippets this walk runs (a change in how they are written is noticed)."""
        self.assertGreaterEqual(len(snippets()), 2)
        self.assertIn("primecount.records.parseRecords", [name for _, name in cited()])

    def test_everySnippetRuns(self) -> None:
        """Each snippet runs with this interpreter, in a folder holding a records file C{server_log.txt} written
        by a real twistd (a quoted message among its records), without an error."""
        from primecount.tools.serverprocess import ServerProcess
        from tests.helpers import ask, expectedReply

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        server = ServerProcess(str(folder / "server_log.txt"))
        self.addCleanup(server.stop)
        for message in ("abc2a", 'say "hi"'):
            self.assertEqual(ask(server.port, message.encode() + b"\n"), expectedReply(message))
        self.assertEqual(server.stop(), 0)
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        for where, code in snippets():
            result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True,
                                    timeout=60, env=environment)
            self.assertEqual(result.returncode, 0, f"{where}:\n{code}\n{result.stderr}")

    def test_everyCitedNameExists(self) -> None:
        """Each C{primecount.…} name a page cites imports or is an attribute of what does."""
        for where, name in cited():
            try:
                resolve(name)
            except (ImportError, AttributeError) as error:
                self.fail(f"{where}: {name}: {error}")
