"""Finding and starting JMeter: upstream JMeter as it is, Debian's 2.13 through a small launcher that lets it load plans."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import Mapping, NamedTuple, Optional, Sequence

# Package data, so that an installed primecount finds them from any folder (installs are plain folders,
# so the resources are real files JMeter and javac can be given).
_PLAN_FILES = files("primecount.tools.loadtest.plan")
DEFAULT_PLAN = Path(str(_PLAN_FILES / "primecount.jmx"))
LAUNCHER_SOURCE = Path(str(_PLAN_FILES / "PermissiveJMeter.java"))
LAUNCHER_CLASS = "PermissiveJMeter"
# Result-file settings the summary relies on, whatever the installation's defaults.
SAVE_SETTINGS = {
    "jmeter.save.saveservice.output_format": "csv",
    "jmeter.save.saveservice.print_field_names": "true",
    "jmeter.save.saveservice.assertion_results_failure_message": "true",
    "jmeter.save.saveservice.timestamp_format": "ms",
    "tcp.charset": "UTF-8",
}


class JMeterMissing(Exception):
    """No usable JMeter installation was found."""


class JMeterInstall(NamedTuple):
    """A JMeter installation: its home folder and version."""

    home: Path
    version: str

    @property
    def major(self) -> int:
        """The major version number (2 for Debian's 2.13)."""
        return int(re.match(r"\d+", self.version).group()) if re.match(r"\d+", self.version) else 0


def findJMeter(environ: Mapping[str, str] = os.environ) -> JMeterInstall:
    """Locate JMeter: C{$JMETER_HOME} if set, else the C{jmeter} on C{PATH}; raise L{JMeterMissing}."""
    if environ.get("JMETER_HOME"):
        home = Path(environ["JMETER_HOME"])
    else:
        script = shutil.which("jmeter", path=environ.get("PATH"))
        if script is None:
            raise JMeterMissing("no jmeter on PATH and JMETER_HOME is not set (Debian: apt-get install jmeter jmeter-tcp)")
        home = _homeOf(Path(script))
    jar = home / "bin" / "ApacheJMeter.jar"
    if not jar.exists():
        raise JMeterMissing(f"{jar} not found: is {home} a JMeter installation?")
    return JMeterInstall(home, _versionOf(jar))


def _homeOf(script: Path) -> Path:
    """JMeter's home for a C{jmeter} script: beside it (upstream) or named in it (Debian's wrapper)."""
    resolved = script.resolve()
    if (resolved.parent / "ApacheJMeter.jar").exists():
        return resolved.parent.parent
    match = re.search(r"-Djmeter\.home=(\S+)", resolved.read_text(errors="replace"))
    if match:
        return Path(match.group(1))
    raise JMeterMissing(f"cannot tell where JMeter is installed from {resolved}; set JMETER_HOME")


def _versionOf(jar: Path) -> str:
    with zipfile.ZipFile(jar) as archive:
        manifest = archive.read("META-INF/MANIFEST.MF").decode("utf-8", errors="replace")
    match = re.search(r"^Implementation-Version:\s*(\S+)", manifest, re.MULTILINE)
    return match.group(1) if match else "unknown"


def _cacheDir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "primecount"


def launcherCommand(install: JMeterInstall, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The command that starts JMeter: its own script from 3.0 on, the permissive launcher for 2.x."""
    if install.major >= 3:
        return [str(install.home / "bin" / "jmeter")]
    classpath = os.pathsep.join(
        [str(install.home / "bin" / "ApacheJMeter.jar"), str(install.home / "lib" / "ext" / "*"),
         str(install.home / "lib" / "*"), *[str(p) for p in _xstreamJars(install)]]
    )
    classes = _launcherClasses(install, classpath, environ)
    java = shutil.which("java", path=environ.get("PATH")) or "java"
    # 2.13's GUI sets the X11 application name by reflection, which Java 9+ only allows when opened.
    opens = ["--add-opens", "java.desktop/sun.awt.X11=ALL-UNNAMED"]
    return [java, *opens, f"-Djmeter.home={install.home}", "-cp", os.pathsep.join([str(classes), classpath]),
            LAUNCHER_CLASS]


def _launcherClasses(install: JMeterInstall, classpath: str, environ: Mapping[str, str]) -> Path:
    """The compiled launcher's folder, one per JMeter version and launcher source, compiled on first use.

    It is compiled into a folder of its own and renamed into place whole, so that runs starting at once
    (trial -j, several benches) each see a complete launcher or none, never another run's half-written class.
    """
    digest = hashlib.sha256(LAUNCHER_SOURCE.read_bytes()).hexdigest()[:16]
    classes = _cacheDir(environ) / f"jmeter-{install.version}-launcher-{digest}"
    if (classes / f"{LAUNCHER_CLASS}.class").exists():
        return classes
    javac = shutil.which("javac", path=environ.get("PATH"))
    if javac is None:
        raise JMeterMissing("JMeter 2.x needs javac to build its launcher (apt-get install default-jdk-headless)")
    classes.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f"{classes.name}.building-", dir=classes.parent))
    try:
        subprocess.run([javac, "-nowarn", "-cp", classpath, "-d", str(building), str(LAUNCHER_SOURCE)], check=True)
        try:
            building.rename(classes)
        except OSError:  # another run renamed its complete launcher into place first
            if not (classes / f"{LAUNCHER_CLASS}.class").exists():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return classes


def _xstreamJars(install: JMeterInstall) -> list[Path]:
    """XStream's jar, needed to compile the launcher: in JMeter's lib or, on Debian, the system's Java folder."""
    found = sorted((install.home / "lib").glob("xstream*.jar"))
    system = Path("/usr/share/java/xstream.jar")
    return found or ([system] if system.exists() else [])


def planArguments(
    plan: Path, results: Path, log: Path, properties: Mapping[str, object], extra: Sequence[str] = ()
) -> list[str]:
    """JMeter's non-GUI arguments for C{plan}, writing C{results} and C{log}, with C{-J} properties."""
    settings = {**SAVE_SETTINGS, **{k: str(v) for k, v in properties.items()}}
    return ["-n", "-t", str(plan), "-l", str(results), "-j", str(log),
            *[f"-J{name}={value}" for name, value in settings.items()], *extra]


def runPlan(
    install: JMeterInstall,
    plan: Path,
    results: Path,
    log: Path,
    properties: Mapping[str, object],
    output: Optional[int] = None,
    prefix: Sequence[str] = (),
) -> int:
    """Run C{plan} headless (after C{prefix}, e.g. taskset); return JMeter's own exit status."""
    if results.exists():
        results.unlink()  # JMeter appends to an existing result file
    command = [*prefix, *launcherCommand(install), *planArguments(plan, results, log, properties)]
    return subprocess.run(command, stdout=output, stderr=subprocess.STDOUT if output else None).returncode
