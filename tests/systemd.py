"""A real systemd (Debian's) as PID 1 of a PID and mount namespace of the test's own, for the shipped units:
it sees only the units the test gives it (C{SYSTEMD_UNIT_PATH}), with empty stand-ins for the system's targets,
so that it starts nothing of the machine's (no tmpfiles cleaning, no journald, no sysctl), and a private C{/run}
of its own, where its control socket lives; it shares the network, so the test reaches its sockets on loopback.
The rest of the file system is the machine's: the test's folder may be anywhere, /tmp included."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

SYSTEMD = "/lib/systemd/systemd"
# The targets the shipped units name or get by default dependencies; empty here, so that none pulls in the
# machine's own units.
STAND_IN_TARGETS = ("sysinit", "basic", "shutdown", "sockets", "network", "multi-user", "paths", "slices", "timers",
                    "local-fs")
_BOOT = """#!/bin/sh
set -e
mount -t tmpfs primecount-run /run
export SYSTEMD_UNIT_PATH={units}
export container=primecount-test
exec {systemd} --system --unit=primecount-test.target --log-target=console --show-status=no
"""


class NamespacedSystemd:
    """systemd in namespaces of its own, with C{units} (file name to text, drop-ins as C{name.d/file.conf});
    killed, with everything it started, after the test."""

    def __init__(self, test: SynchronousTestCase, units: dict[str, str]) -> None:
        for tool in ("unshare", "nsenter", "systemctl"):
            if shutil.which(tool) is None or not os.path.exists(SYSTEMD):
                self._unavailable(f"{tool} or {SYSTEMD} is not installed")
        if os.geteuid() != 0:
            self._unavailable("systemd as PID 1 of a namespace needs root")
        self.folder = Path(test.mktemp()).resolve()
        unitFolder = self.folder / "units"
        unitFolder.mkdir(parents=True)
        for name in STAND_IN_TARGETS + ("primecount-test",):
            (unitFolder / f"{name}.target").write_text(f"[Unit]\nDescription={name} (stand-in)\n")
        (unitFolder / "system.slice").write_text("[Unit]\nDescription=system slice (stand-in)\n")
        for name, text in units.items():
            (unitFolder / name).parent.mkdir(parents=True, exist_ok=True)
            (unitFolder / name).write_text(text)
        boot = self.folder / "boot.sh"
        boot.write_text(_BOOT.format(units=unitFolder, systemd=SYSTEMD))
        boot.chmod(0o755)
        self._unshare = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--uts", "--mount-proc", "--propagation", "private", str(boot)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        test.addCleanup(self.kill)
        self.pid = self._systemdPid()
        deadline = time.monotonic() + 30
        while self.systemctl("is-system-running", check=False).returncode not in (0, 1) or \
                not self.systemctl("show", "-P", "SystemState", check=False).stdout.strip():
            if time.monotonic() > deadline or self._unshare.poll() is not None:
                self._unavailable("systemd did not start in its namespace")
            time.sleep(0.1)

    @staticmethod
    def _unavailable(why: str) -> None:
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1":
            raise AssertionError(why)
        raise SkipTest(why)

    def _systemdPid(self) -> int:
        """The pid, seen from here, of the child of unshare: systemd, once the boot script has exec'd it."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids and Path(f"/proc/{pids[0]}/exe").resolve() == Path(SYSTEMD).resolve():
                return int(pids[0])
            time.sleep(0.05)
        self._unavailable("systemd did not start in its namespace")
        raise AssertionError("unreachable")

    def systemctl(self, *arguments: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        """Run systemctl against this systemd."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "systemctl", "--no-pager", *arguments],
                              capture_output=True, text=True, timeout=60, check=check)

    def kill(self) -> None:
        """Kill systemd; the kernel kills everything else in its PID namespace with it."""
        if self._unshare.poll() is None:
            try:
                os.kill(self.pid, 9)
            except (ProcessLookupError, AttributeError):
                pass
            self._unshare.wait(timeout=30)
