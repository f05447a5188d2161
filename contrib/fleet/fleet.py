"""Build the tests' namespaced fleet (tests/netns.py) and leave it up, to load it, break it and watch it by hand:
a database host with PostgreSQL, N primecount hosts writing one table, HAProxy (the shipped configuration) on
a host of its own, and a client host, on a private bridge with addresses from 198.18.0.0/15. As root.

    python contrib/fleet/fleet.py up [--apps 3] [--delay-ms 5] [--option=--keep-alive ...]
    python contrib/fleet/fleet.py status
    python contrib/fleet/fleet.py cut app1 db        # drop every packet between two hosts
    python contrib/fleet/fleet.py lose app1 db 1     # drop 1 % of them, each way
    python contrib/fleet/fleet.py heal app1
    python contrib/fleet/fleet.py run client -- primeload --host 198.18.0.3 --port 5050 ...
    python contrib/fleet/fleet.py down

Processes run detached, with their logs in the state folder (default /run/primecount-fleet, kept after
C{down}; C{--state DIR} before or after the command); C{down} stops them and removes the hosts and the database.
C{up} builds primeload (contrib/loadgen, with the system's C compiler) into the state folder, and C{run} finds it
there. See docs/scaling.md, "The fleet on a real network".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from twisted.trial.unittest import SkipTest  # noqa: E402

from primecount.tools.serverprocess import twistdCommand  # noqa: E402
from tests.helpers import accepts, scrape, waitUntil  # noqa: E402
from tests.netns import FleetNetwork, Host, enterNamespace  # noqa: E402
from tests.postgres import Cluster, requirePostgres  # noqa: E402
from tests.test_fleet import httpGet  # noqa: E402
from tests.test_haproxy import haproxyConfig  # noqa: E402

RELAY = ROOT / "contrib" / "fleet" / "delayrelay.py"
PORT, BACKEND_PORT, METRICS_PORT = 5050, 5051, 5059


class _Kept:
    """Stands for the test case the harness expects: it registers nothing to clean up (C{down} does that),
    and its failures end the script."""

    def addCleanup(self, *arguments: Any) -> None:
        """Kept up: nothing is cleaned up at exit."""

    def fail(self, why: str) -> None:
        """A missing tool or permission ends the script."""
        raise SystemExit(f"fleet.py: {why}")

    def mktemp(self) -> str:
        """Not used."""
        raise NotImplementedError


def detached(command: list[str], log: Path) -> int:
    """Start C{command} in a session of its own, its output to C{log}; its process id."""
    with log.open("ab") as output:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True).pid


def waitFor(what: str, check: Any, seconds: float = 30.0) -> None:
    """Wait until C{check()} is true; past C{seconds}, end the script saying what it waited for."""
    try:
        waitUntil(check, seconds, what)
    except AssertionError as error:
        raise SystemExit(f"fleet.py: {error}") from None


def up(arguments: argparse.Namespace) -> None:
    """Build the fleet and start everything on it; write the state file."""
    state = arguments.state / "fleet.json"
    if state.exists():
        raise SystemExit(f"fleet.py: a fleet is already up ({state}); run down first")
    arguments.state.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(["make", "--silent", "-C", str(ROOT / "contrib" / "loadgen"), f"OUT={arguments.state.resolve()}"],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"fleet.py: cannot build primeload (needs make and a C compiler):\n{built.stderr}")
    kept = _Kept()
    apps = [f"app{n}" for n in range(1, arguments.apps + 1)]
    try:
        network = FleetNetwork(kept, ["db", "lb", *apps, "client"], prefix=arguments.prefix)  # type: ignore[arg-type]
        binaries = requirePostgres(kept)  # type: ignore[arg-type]
    except SkipTest as reason:
        raise SystemExit(f"fleet.py: {reason}") from None
    db, lb = network["db"], network["lb"]
    saved: dict[str, Any] = {"prefix": arguments.prefix, "hosts": {name: host.address for name, host in network.hosts.items()},
                             "namespaces": [host.namespace for host in network.hosts.values()]
                             + [network.bridgeNamespace], "pids": {}}
    try:
        cluster = Cluster(binaries, prefix=db.prefix, listen=db.address)
        saved["postgres"] = {"binaries": binaries, "folder": cluster.folder, "data": cluster.data,
                             "prefix": db.prefix}
        cluster.start(durable=True)
        uri = cluster.tcpUri
        if arguments.delay_ms is not None:
            port = cluster.port + 1
            saved["pids"]["relay"] = detached(
                [*db.prefix, sys.executable, str(RELAY), f"{db.address}:{port}", f"{db.address}:{cluster.port}",
                 str(arguments.delay_ms / 1000)], arguments.state / "relay.log")
            uri = f"postgresql://primecount@{db.address}:{port}/postgres"
            waitFor("the relay", lambda: db.call(accepts, port, db.address))
        saved["uri"] = uri
        for name in apps:
            app = network[name]
            saved["pids"][name] = detached(
                [*app.prefix, *twistdCommand(), "-n", "--pidfile=", "primecount",
                 "--port", f"haproxy:tcp:{BACKEND_PORT}:interface={app.address}", "--proxy-from", f"{lb.address}/32",
                 "--metrics", f"tcp:{METRICS_PORT}:interface={app.address}", "--records", uri,
                 "--max-per-ip", "0", *arguments.option], arguments.state / f"{name}.log")
        for name in apps:
            app = network[name]
            waitFor(f"{name} to listen", lambda: app.call(accepts, BACKEND_PORT, app.address))
        config = arguments.state / "haproxy.cfg"
        config.write_text(haproxyConfig(f"{lb.address}:{PORT}",
                                        [f"{network[name].address}:{BACKEND_PORT}" for name in apps]))
        saved["pids"]["haproxy"] = detached([*lb.prefix, "haproxy", "-db", "-f", str(config)],
                                            arguments.state / "haproxy.log")
        waitFor("HAProxy to listen", lambda: network["client"].call(accepts, PORT, lb.address))
    finally:
        state.write_text(json.dumps(saved, indent=2))
    print(f"fleet up; state and logs in {arguments.state}")
    for name, address in saved["hosts"].items():
        print(f"  {name:8} {address:14} ip netns exec {arguments.prefix}-{name} ...")
    print(f"  clients connect to {lb.address}:{PORT} (HAProxy); the records are in {uri}")
    print(f"  e.g. python contrib/fleet/fleet.py run client -- primeload --host {lb.address} --port {PORT} "
          "--conns 50 --duration 10")


def load(arguments: argparse.Namespace) -> dict[str, Any]:
    """The state of the fleet that is up."""
    state = arguments.state / "fleet.json"
    if not state.exists():
        raise SystemExit(f"fleet.py: no fleet is up ({state} is missing)")
    return json.loads(state.read_text())


def host(saved: dict[str, Any], name: str) -> Host:
    """A host of the fleet that is up, for its faults and its namespace."""
    if name not in saved["hosts"]:
        raise SystemExit(f"fleet.py: no host {name!r}; the hosts are {', '.join(saved['hosts'])}")
    return Host.existing(f"{saved['prefix']}-{name}", name, saved["hosts"][name])


def status(arguments: argparse.Namespace) -> None:
    """Each primecount host's /readyz answer and request count, and HAProxy's view of it."""
    saved = load(arguments)
    for name, address in saved["hosts"].items():
        if not name.startswith("app"):
            continue
        app = host(saved, name)
        try:
            code, text = app.call(httpGet, METRICS_PORT, "/readyz", address)
            requests = int(sum(value for key, value in app.call(scrape, METRICS_PORT, address).items()
                               if key.startswith("primecount_requests_total")))
            print(f"{name:6} {address:14} /readyz {code} {text.strip():40} requests {requests}")
        except OSError as error:
            print(f"{name:6} {address:14} not answering ({error})")
    log = (arguments.state / "haproxy.log").read_text(errors="replace").splitlines()
    changes = [line for line in log if "[WARNING]" in line and (" is DOWN" in line or " is UP" in line)]
    print("HAProxy, last state changes:" if changes else "HAProxy: every server UP since it started")
    for line in changes[-5:]:
        print("  " + line.strip())


def down(arguments: argparse.Namespace) -> None:
    """Stop everything the fleet runs and remove its hosts."""
    saved = load(arguments)
    for pid in saved["pids"].values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 15
    for pid in saved["pids"].values():
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
                Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    postgres = saved.get("postgres")
    if postgres:
        cluster = Cluster.__new__(Cluster)  # the one "up" made: stopped, its files removed
        cluster.binaries, cluster.prefix, cluster.folder, cluster.data = (
            postgres["binaries"], postgres["prefix"], postgres["folder"], postgres["data"])
        cluster.destroy()
    for namespace in saved["namespaces"]:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
    (arguments.state / "fleet.json").unlink()
    print("fleet down")


def fault(arguments: argparse.Namespace) -> None:
    """cut, lose or heal."""
    saved = load(arguments)
    first = host(saved, arguments.host)
    if arguments.command == "heal":
        first.heal()
    elif arguments.command == "cut":
        first.cutFrom(host(saved, arguments.other))
    else:
        first.loseTo(host(saved, arguments.other), arguments.percent)


def run(arguments: argparse.Namespace) -> None:
    """Run a command on a host (in its namespace)."""
    saved = load(arguments)
    target = host(saved, arguments.host)
    enterNamespace(target.namespace)
    # primeload, built by "up" into the state folder, is found by its name.
    os.environ["PATH"] = os.pathsep.join([str(arguments.state.resolve()), os.environ.get("PATH", "")])
    os.execvp(arguments.command_line[0], arguments.command_line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=Path("/run/primecount-fleet"),
                        help="where the fleet's state, logs and primeload are kept (before or after the command)")
    # --state after the command too: each command takes it, and leaves the one given before it when not given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser = partial(commands.add_parser, parents=[common])  # type: ignore[method-assign]
    started = commands.add_parser("up", help="build the fleet and start it")
    started.add_argument("--apps", type=int, default=3, help="primecount hosts")
    started.add_argument("--prefix", default="pcfleet", help="the hosts' namespaces are PREFIX-db, PREFIX-app1, ...")
    started.add_argument("--delay-ms", type=float, default=None,
                         help="put the database behind a relay delaying every byte this long each way")
    started.add_argument("--option", action="append", default=[], metavar="OPTION",
                         help="a primecount option for every host, e.g. --option=--keep-alive (repeatable)")
    started.set_defaults(function=up)
    commands.add_parser("status", help="readiness and requests per host").set_defaults(function=status)
    commands.add_parser("down", help="stop everything and remove the hosts").set_defaults(function=down)
    for name, text in [("cut", "drop every packet between HOST and OTHER"),
                       ("lose", "drop PERCENT of the packets between HOST and OTHER, each way"),
                       ("heal", "remove HOST's faults")]:
        command = commands.add_parser(name, help=text)
        command.add_argument("host")
        if name != "heal":
            command.add_argument("other")
        if name == "lose":
            command.add_argument("percent", type=int)
        command.set_defaults(function=fault)
    ran = commands.add_parser("run", help="run a command on a host: run HOST -- COMMAND ...")
    ran.add_argument("host")
    ran.add_argument("command_line", nargs=argparse.REMAINDER)
    ran.set_defaults(function=run)
    arguments = parser.parse_args()
    if arguments.command == "run":
        if arguments.command_line[:1] == ["--"]:
            arguments.command_line = arguments.command_line[1:]
        if not arguments.command_line:
            raise SystemExit("fleet.py: run HOST -- COMMAND ...")
    arguments.function(arguments)


if __name__ == "__main__":
    main()
