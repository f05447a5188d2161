"""The shape of the package, read from its source: no import circle, the protocol and its factory apart, and
Twisted's insides reached only from L{primecount.internals}."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

import primecount
from primecount.factory import PrimeCountFactory
from primecount.protocol import ConnectionObserver

PACKAGE = Path(primecount.__file__).parent
# Methods and attributes of Twisted's concrete classes that no interface promises, and its testing reactor.
BENEATH_INTERFACES = {"doRead", "numberAccepts", "sessionno", "stopReading", "startReading", "stopWriting",
                      "dataBuffer", "_tempDataBuffer", "MemoryReactor"}
# Underscored names that are public API: a named tuple's.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def modules() -> dict[str, ast.Module]:
    """Every module of the package by its dotted name, parsed."""
    parsed = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        parsed[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"))
    return parsed


def nodesOutsideTypeChecking(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node of C{tree} that runs: not inside an C{if TYPE_CHECKING:} block."""
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for node in ast.walk(block)}
    return (node for node in ast.walk(tree) if id(node) not in skipped)


def importGraph() -> dict[str, set[str]]:
    """Which of the package's modules each one imports, at its top or inside a function."""
    parsed = modules()
    graph: dict[str, set[str]] = {}
    for name, tree in parsed.items():
        imported = set()
        for node in nodesOutsideTypeChecking(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("primecount"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in parsed else node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("primecount"))
        graph[name] = {module for module in imported if module in parsed and module != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of C{graph}, each as the path that closes it."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                found.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


class ImportGraphTests(SynchronousTestCase):
    """What imports what."""

    def test_noCircle(self) -> None:
        """No module imports, however indirectly, one that imports it."""
        graph = importGraph()
        self.assertIn("primecount.connection", graph["primecount.protocol"], "the graph is read")
        self.assertEqual(circles(graph), [])

    def test_circleFound(self) -> None:
        """The circle finder finds a circle (so the test above can fail)."""
        self.assertEqual(circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}), [["a", "b", "c", "a"]])

    def test_protocolAndFactoryApart(self) -> None:
        """Neither protocol.py nor factory.py imports the other."""
        graph = importGraph()
        self.assertNotIn("primecount.factory", graph["primecount.protocol"])
        self.assertNotIn("primecount.protocol", graph["primecount.factory"])

    def test_factoryIsTheObserver(self) -> None:
        """The factory has every member the protocol's L{ConnectionObserver} asks for, taking the same
        arguments."""
        factory = PrimeCountFactory(None, None, None, protocol=object, busyProtocol=object)  # type: ignore[arg-type]
        for name, member in vars(ConnectionObserver).items():
            if name.startswith("_") or not callable(member):
                continue
            expected = list(inspect.signature(member).parameters)[1:]
            self.assertEqual(list(inspect.signature(getattr(factory, name)).parameters)[:len(expected)], expected,
                             name)
        self.assertTrue(hasattr(factory, "metrics"))


class TwistedInsidesTests(SynchronousTestCase):
    """Twisted's private names and its concrete classes' methods are reached only in internals.py."""

    def test_onlyInInternals(self) -> None:
        """Outside internals.py no module imports a private Twisted module or name, reads an underscored
        attribute of another object, or uses a name from L{BENEATH_INTERFACES} on one."""
        reaching = []
        for name, tree in modules().items():
            if name == "primecount.internals":
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                    if any(part.startswith("_") for part in node.module.split(".")) or any(
                            alias.name.startswith("_") or alias.name in BENEATH_INTERFACES for alias in node.names):
                        reaching.append(f"{name}:{node.lineno} imports from {node.module}")
                elif isinstance(node, ast.Attribute):
                    own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
                    private = node.attr.startswith("_") and not node.attr.startswith("__")
                    if not own and ((private and node.attr not in PUBLIC_UNDERSCORED)
                                    or node.attr in BENEATH_INTERFACES):
                        reaching.append(f"{name}:{node.lineno} {ast.unparse(node)}")
        self.assertEqual(reaching, [])


class ContribScriptsTests(SynchronousTestCase):
    """The bench and fleet scripts under contrib/ still import: they use the package's and the tests' names,
    which a change can move or rename without any test running the scripts themselves."""

    def test_everyScriptImports(self) -> None:
        """Each script loads as a module (its main() is not run); a name it imports that no longer exists fails."""
        import importlib.util
        import sys

        root = Path(primecount.__file__).resolve().parents[1] / "contrib"
        scripts = sorted(script for script in [*root.glob("bench/*.py"), *root.glob("fleet/*.py")]
                         if 'if __name__ == "__main__":' in script.read_text())  # not the bare servers
        self.assertGreater(len(scripts), 10)
        path = list(sys.path)
        self.addCleanup(sys.path.__setitem__, slice(None), path)
        for script in scripts:
            spec = importlib.util.spec_from_file_location(f"contrib_{script.parent.name}_{script.stem}", script)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(script.parent))  # as when run: its folder first (loadgen_compare)
            try:
                spec.loader.exec_module(module)
            except ImportError as error:
                self.fail(f"{script.relative_to(root.parent)}: {error}")

    def test_everyScriptTakesHelp(self) -> None:
        """Each script under contrib/ (the bench, the probes, the fleet, the servers they run) answers --help
        with its usage and exit status 0, and does nothing else."""
        import subprocess
        import sys
        from concurrent.futures import ThreadPoolExecutor

        root = Path(primecount.__file__).resolve().parents[1] / "contrib"
        scripts = sorted([*root.glob("bench/*.py"), *root.glob("fleet/*.py")])

        def helped(script: Path) -> tuple[Path, "subprocess.CompletedProcess[str]"]:
            return script, subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                                          timeout=60)

        with ThreadPoolExecutor(4) as pool:
            for script, result in pool.map(helped, scripts):
                self.assertEqual((result.returncode, result.stdout[:6]), (0, "usage:"),
                                 f"{script.relative_to(root.parent)}: {result.stdout[-300:]}{result.stderr[-600:]}")


class ToolListTests(SynchronousTestCase):
    """The tools the tests need are one list (tests/toolcheck.py), and CI installs every package on it."""

    def test_ciInstallsEveryPackage(self) -> None:
        """Each Debian package tests.toolcheck names is in .ci/run's apt-get line."""
        import re

        from tests.toolcheck import TOOLS

        ci = (Path(primecount.__file__).resolve().parents[1] / ".ci" / "run").read_text()
        installed = set(re.search(r"apt-get install -y -qq \\\n(.*?)>/dev/null", ci, re.S).group(1).split())  # type: ignore[union-attr]
        self.assertEqual({package for packages in TOOLS.values() for package in packages.split()} - installed, set())
