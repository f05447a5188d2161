"""What the tests need from the system, and which of it is missing here: C{python -m tests.toolcheck} prints one
line naming each missing tool and the Debian package that has it (the tests that need one skip without it,
unless C{PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1}, as in CI), and nothing when every tool is here. C{make test} and
C{make test-slow} run it after the tests. .ci/run installs every package named here (test_layout checks it)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from typing import Optional

# Each tool a test runs, and the Debian package that has it.
TOOLS = {
    "jmeter": "jmeter jmeter-tcp", "javac": "default-jdk-headless", "haproxy": "haproxy", "logrotate": "logrotate",
    "systemd-analyze": "systemd", "systemd-socket-activate": "systemd", "nc": "netcat-openbsd",
    "openssl": "openssl", "initdb": "postgresql", "prometheus": "prometheus", "promtool": "prometheus",
    "ip": "iproute2", "nft": "nftables", "cc": "gcc", "make": "make", "pypy3": "pypy3 pypy3-venv",
    "prlimit": "util-linux", "flock": "util-linux", "chattr": "e2fsprogs", "setpriv": "util-linux",
    "taskset": "util-linux",
}
# Python modules the test extra installs on CPython only (no PyPy builds).
CPYTHON_MODULES = ("pandas", "duckdb")


def _found(tool: str) -> Optional[str]:
    """Where C{tool} is: on the PATH, or (PostgreSQL's) in Debian's versioned folder."""
    if tool == "initdb":
        from tests.postgres import postgresBinaries

        return postgresBinaries()
    return shutil.which(tool)


def missing() -> list[str]:
    """Each missing tool (with its package) and module, in words."""
    said = [f"{tool} (apt-get install {package})" for tool, package in TOOLS.items() if _found(tool) is None]
    if platform.python_implementation() == "CPython":
        said += [f"{name} (pip install '.[test]')" for name in CPYTHON_MODULES
                 if importlib.util.find_spec(name) is None]
    return said


def main() -> None:
    """Print the missing tools, if any, in one line."""
    gone = missing()
    if gone:
        strict = os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1"
        print(f"not installed here, so the tests that need them {'failed' if strict else 'were skipped'}: "
              + ", ".join(gone))


if __name__ == "__main__":
    main()
