"""Hosts on one machine, for the fleet tests that need a network: network namespaces joined by veth links on a
private bridge (itself in a namespace of its own, so nothing of the machine's network changes), each host with an
address from the benchmarking range 198.18.0.0/15, and faults made with nftables in a host's namespace. Built and
torn down by the test; it needs root and C{ip netns} (skipped with the reason where not permitted, failed where
C{PRIMECOUNT_REQUIRE_SYSTEM_TOOLS=1})."""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess
import threading
from typing import Any, Callable, Optional, TypeVar

from twisted.trial.unittest import SkipTest, SynchronousTestCase

SUBNET = "198.18.0"  # 198.18.0.0/15 is set aside for benchmarking (RFC 2544): never a real host's address
CLONE_NEWNET = 0x40000000
_networks = itertools.count(1)
_Result = TypeVar("_Result")


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True, timeout=30)


class Host:
    """One host: a network namespace with C{lo} and C{eth0} at C{address} on the fleet's bridge."""

    def __init__(self, network: "FleetNetwork", name: str, number: int) -> None:
        self.name = name
        self.namespace = f"{network.prefix}-{name}"
        self.address = f"{SUBNET}.{number}"
        self._network = network
        self._link = f"v{number}"  # its end on the bridge's side
        _ip("netns", "add", self.namespace)
        _ip("-n", network.bridgeNamespace, "link", "add", self._link, "type", "veth", "peer", "name", "eth0",
            "netns", self.namespace)
        _ip("-n", network.bridgeNamespace, "link", "set", self._link, "master", "br0", "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.namespace, "link", "set", "eth0", "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")

    @classmethod
    def existing(cls, namespace: str, name: str, address: str) -> "Host":
        """A host made earlier (by another process): its faults and namespace, nothing made now."""
        host = cls.__new__(cls)
        host.name, host.namespace, host.address = name, namespace, address
        return host

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host."""
        return ["ip", "netns", "exec", self.namespace]

    def nft(self, script: str) -> None:
        """Run an nftables script in this host's namespace."""
        subprocess.run([*self.prefix, "nft", "-f", "-"], input=script, check=True, capture_output=True, text=True,
                       timeout=30)

    def cutFrom(self, other: "Host") -> None:
        """Drop every packet between this host and C{other}, both ways, silently (a partition, not a refusal)."""
        self.nft(f"""table inet primecount_faults {{
  chain input {{ type filter hook input priority 0; ip saddr {other.address} drop; }}
  chain output {{ type filter hook output priority 0; ip daddr {other.address} drop; }}
}}""")

    def loseTo(self, other: "Host", percent: int) -> None:
        """Drop C{percent} per cent of the packets between this host and C{other}, each way, at random."""
        self.nft(f"""table inet primecount_faults {{
  chain input {{ type filter hook input priority 0; ip saddr {other.address} numgen random mod 100 < {percent} drop; }}
  chain output {{ type filter hook output priority 0; ip daddr {other.address} numgen random mod 100 < {percent} drop; }}
}}""")

    def heal(self) -> None:
        """Remove every fault of this host."""
        subprocess.run([*self.prefix, "nft", "delete", "table", "inet", "primecount_faults"], capture_output=True,
                       timeout=30)

    def call(self, function: Callable[..., _Result], *args: Any) -> _Result:
        """C{function(*args)} run in a thread of this process that has entered this host's namespace (its sockets
        are this host's); its result, or its exception raised here."""
        result: list[Any] = []

        def run() -> None:
            try:
                enterNamespace(self.namespace)
                result.append((True, function(*args)))
            except BaseException as error:  # handed to the caller
                result.append((False, error))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        ok, value = result[0]
        if not ok:
            raise value
        return value


def enterNamespace(namespace: str) -> None:
    """Move the calling thread (only it) into the network namespace C{namespace}: the sockets it opens from now
    on belong to that host."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    finally:
        os.close(fd)


class FleetNetwork:
    """Hosts named C{names} (198.18.0.2 for the first, .3 for the next, ...) on one private bridge, removed
    with everything on them after the test; their namespaces are named C{prefix}-name (by default, a prefix of
    this process's own)."""

    def __init__(self, test: SynchronousTestCase, names: list[str], prefix: Optional[str] = None) -> None:
        self._requirePermitted(test)
        self.prefix = prefix or f"pc{os.getpid()}n{next(_networks)}"
        self.bridgeNamespace = f"{self.prefix}-bridge"
        self.hosts: dict[str, Host] = {}
        test.addCleanup(self.destroy)
        _ip("netns", "add", self.bridgeNamespace)
        _ip("-n", self.bridgeNamespace, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridgeNamespace, "link", "set", "br0", "up")
        for number, name in enumerate(names, 2):
            self.hosts[name] = Host(self, name, number)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    @staticmethod
    def _requirePermitted(test: SynchronousTestCase) -> None:
        problem: Optional[str] = None
        if os.geteuid() != 0:
            problem = "network namespaces need root"
        elif shutil.which("ip") is None or shutil.which("nft") is None:
            problem = "ip (iproute2) or nft (nftables) is not installed"
        else:
            probe = subprocess.run(["ip", "netns", "add", f"pc{os.getpid()}probe"], capture_output=True, text=True)
            if probe.returncode != 0:
                problem = f"ip netns is not permitted here: {probe.stderr.strip()}"
            else:
                subprocess.run(["ip", "netns", "del", f"pc{os.getpid()}probe"], capture_output=True)
        if problem is None:
            return
        if os.environ.get("PRIMECOUNT_REQUIRE_SYSTEM_TOOLS") == "1":
            test.fail(problem)
        raise SkipTest(problem)

    def destroy(self) -> None:
        """Remove every host and the bridge (their links go with them)."""
        for namespace in [host.namespace for host in self.hosts.values()] + [self.bridgeNamespace]:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
