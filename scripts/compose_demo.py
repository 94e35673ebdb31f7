"""The three-site demo in containers: ``make compose-demo``.

Builds the image (scripts/build-images.sh), starts docker-compose.yml (site A:
primary-a + host-a, site C: primary-c + host-c, site B: secondary + host-b),
runs the scenario below from the host containers, printing every command and
what came back, checks the data at every step, and stops the sites (volumes
included) however it ends.

The deployment runs with mutual TLS (the compose file's tls-init service
makes the certificates): the scenario first shows a client without a
certificate refused, then every command of the hosts presents theirs.
The scenario: ext4 filesystems on new volumes at sites A and C (mke2fs -d +
nbdcopy over NBD with TLS), remote pairs into the one secondary (fan-in), backup
generations at site B, a write, a backup, damaged files, a restore of files
and a restore of the whole volume, both issued at host B; site C's volumes
are checked to be untouched throughout.

``tests/containers`` drives the same :class:`Compose` and :func:`run_scenario`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
IMAGE = os.environ.get("SPLITMIRROR_IMAGE", "splitmirror:latest")
PROMETHEUS_IMAGE = os.environ.get("SPLITMIRROR_PROMETHEUS_IMAGE", "splitmirror-prometheus:latest")

#: Each host container, the daemon of its site and that daemon's ports.
SITES = {
    "host-a": ("primary-a", 7001),
    "host-c": ("primary-c", 7001),
    "host-b": ("secondary", 7101),
}
NBD_PORT = 10809
#: Where docker-compose.yml mounts the deployment's certificates, and the
#: libnbd certificate directory of the hosts' identity (admin).
TLS_DIR = "/tls"
NBD_CERTIFICATES = f"{TLS_DIR}/nbd-admin"
#: Unsets the TLS settings of a host container (``Compose.exec(env=...)``).
PLAINTEXT = {"SPLITMIRROR_TLS_DIR": ""}
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
#: sha256 of every file of the tree under the current directory.
HASH_FILES = "find . -path ./lost+found -prune -o -type f -print0 | sort -z | xargs -0 -r sha256sum"


class ComposeError(RuntimeError):
    """A docker or docker-compose command failed."""


class ScenarioError(AssertionError):
    """A check of the scenario failed."""


def compose_command() -> list[str]:
    """``docker compose`` (v2) when installed, else ``docker-compose`` (1.29+);
    SPLITMIRROR_COMPOSE overrides."""
    override = os.environ.get("SPLITMIRROR_COMPOSE", "")
    if override:
        return shlex.split(override)
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise ComposeError("neither `docker compose` (v2) nor `docker-compose` is installed")


def docker_problem() -> str | None:
    """Why containers cannot run here, or None."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no Docker engine is reachable (docker info timed out)"
    if info.returncode != 0:
        lines = (info.stderr.strip() or info.stdout.strip() or "docker info failed").splitlines()
        return f"no Docker engine is reachable: {lines[-1]}"
    try:
        compose_command()
    except ComposeError as exc:
        return str(exc)
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing on this machine (the host containers mount volumes with FUSE)"
    return None


def build_images(out: IO[str] | None = None) -> None:
    """scripts/build-images.sh; its output goes to ``out`` (None: inherited)."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], cwd=ROOT, text=True, timeout=1800,
                          stdout=subprocess.PIPE if out is not None else None, stderr=subprocess.STDOUT)
    if out is not None and proc.stdout:
        out.write(proc.stdout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout or "").strip().splitlines()[-15:])
        raise ComposeError(f"scripts/build-images.sh exited with {proc.returncode}\n{tail}")


def unique_project(prefix: str = "smdemo") -> str:
    """A compose project name that names this process: ``<prefix><pid>x<random>``."""
    return f"{prefix}{os.getpid()}x{uuid.uuid4().hex[:6]}"


class Compose:
    """One deployment of docker-compose.yml under its own project name."""

    def __init__(self, project: str, *, link_timeout: float = 3.0, health_interval: str = "2s",
                 out: IO[str] | None = None) -> None:
        self.project = project
        self.link_timeout = link_timeout
        self.out = out
        self.base = [*compose_command(), "-p", project, "-f", str(COMPOSE_FILE)]
        self.env = dict(os.environ, SPLITMIRROR_IMAGE=IMAGE, SPLITMIRROR_PROMETHEUS_IMAGE=PROMETHEUS_IMAGE,
                        SPLITMIRROR_LINK_TIMEOUT=f"{link_timeout:g}",
                        SPLITMIRROR_HEALTH_INTERVAL=health_interval)
        self.env.pop("COMPOSE_FILE", None)
        self.env.pop("COMPOSE_PROJECT_NAME", None)
        self._ids: dict[str, str] = {}

    # -- compose --------------------------------------------------------------------------------
    def compose(self, *args: str, timeout: float = 300) -> str:
        return run([*self.base, *args], env=self.env, timeout=timeout)

    def up(self) -> float:
        """Create and start every service; returns once the daemons are healthy
        (the hosts depend on them with condition: service_healthy)."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-build", timeout=600)
        for service in ("secondary", "primary-a", "primary-c", "host-a", "host-b", "host-c"):
            self.container(service)
        for daemon in ("secondary", "primary-a", "primary-c"):
            self.wait_healthy(daemon)
        return time.monotonic() - started

    def down(self) -> None:
        """Stop and remove the containers, networks and volumes of the project."""
        self.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=300)
        self._ids.clear()

    def container(self, service: str) -> str:
        """The container id of ``service`` (kept: it stays valid across kill and start)."""
        if service not in self._ids:
            out = run(["docker", "ps", "-a", "--no-trunc", "--filter", f"label={PROJECT_LABEL}={self.project}",
                       "--format", f'{{{{.ID}}}} {{{{.Label "{SERVICE_LABEL}"}}}}'])
            found: dict[str, list[str]] = {}
            for line in out.splitlines():
                cid, _, name = line.partition(" ")
                found.setdefault(name.strip(), []).append(cid)
            ids = found.get(service, [])
            if len(ids) != 1:
                raise ComposeError(f"service {service}: expected one container, found {len(ids)}")
            self._ids[service] = ids[0]
        return self._ids[service]

    def logs(self, service: str) -> str:
        return run(["docker", "logs", self.container(service)], stderr_too=True)

    # -- containers -----------------------------------------------------------------------------
    def exec(self, service: str, *argv: str, check: bool = True, timeout: float = 180,
             input: bytes | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """``docker exec``; ``env`` overrides variables of the container's environment."""
        options = [*(["-i"] if input is not None else []), *(f"--env={k}={v}" for k, v in (env or {}).items())]
        cmd = ["docker", "exec", *options, self.container(service), *argv]
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ComposeError(f"[{service}] {shlex.join(argv)} exited with {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace').strip()}")
        return proc

    def popen(self, service: str, *argv: str, stderr: Any = subprocess.PIPE) -> subprocess.Popen[str]:
        """A long-running command in a container; its stdout is line-buffered text."""
        return subprocess.Popen(["docker", "exec", self.container(service), *argv], stdout=subprocess.PIPE,
                                stderr=stderr, text=True, bufsize=1)

    def prometheus(self, expr: str) -> list[str]:
        """The series of an instant query to the deployment's Prometheus, one
        ``{labels} => value @[time]`` line each (promtool's format)."""
        out = self.exec("prometheus", "promtool", "query", "instant", "http://127.0.0.1:9090", expr, timeout=60)
        return [line for line in out.stdout.decode().splitlines() if "=>" in line]

    def cli(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``splitmirror ARGS`` in a host container, against its site's daemon."""
        return self.exec(host, "splitmirror", *args, check=check)

    def cli_json(self, host: str, *args: str) -> Any:
        return json.loads(self.cli(host, "--json", *args).stdout)

    def pair_row(self, host: str, pair: str, primary: bool | None = None) -> dict[str, Any]:
        rows = self.cli_json(host, "pair", "display", pair)
        for row in rows:
            if row["pair"] == pair and (primary is None or row["primary"] == primary):
                return dict(row)
        raise ScenarioError(f"[{host}] pair {pair} has no {'primary ' if primary else ''}row: {rows}")

    def checksum(self, host: str, volume: str) -> str:
        return str(self.cli_json(host, "checksum", volume)["digest"])

    def stats(self, host: str) -> dict[str, Any]:
        return dict(self.cli_json(host, "stats"))

    def pair_stats(self, host: str, pair: str) -> dict[str, int]:
        for p in self.stats(host)["pairs"]:
            if p["pair"] == pair:
                return dict(p)
        return {}

    def wait_status(self, host: str, pair: str, statuses: Sequence[str], timeout: float = 60,
                    primary: bool | None = True) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            row = self.pair_row(host, pair, primary)
            if row["status"] in statuses:
                return row
            if time.monotonic() > deadline:
                raise ScenarioError(f"[{host}] pair {pair} is {row['status']}, not {'/'.join(statuses)}, "
                                    f"after {timeout:g}s: {row}")
            time.sleep(0.3)

    def state(self, service: str) -> dict[str, Any]:
        out = run(["docker", "inspect", "--format", "{{json .State}}", self.container(service)])
        return dict(json.loads(out))

    def wait_healthy(self, service: str, timeout: float = 90) -> float:
        started = time.monotonic()
        while True:
            state = self.state(service)
            health = (state.get("Health") or {}).get("Status", "")
            if health == "healthy":
                return time.monotonic() - started
            if not state.get("Running"):
                raise ComposeError(f"{service} is not running ({state.get('Status')}, exit code "
                                   f"{state.get('ExitCode')}):\n{self.logs(service)[-3000:]}")
            if time.monotonic() - started > timeout:
                raise ComposeError(f"{service} is still {health or 'without health'} after {timeout:g}s:\n"
                                   f"{self.logs(service)[-3000:]}")
            time.sleep(0.2)

    def kill(self, service: str) -> None:
        """``docker kill -s KILL``: the daemon gets no chance to clean up."""
        run(["docker", "kill", "-s", "KILL", self.container(service)])

    def start(self, service: str) -> float:
        """Start a stopped container again (same data volume); returns seconds until healthy."""
        run(["docker", "start", self.container(service)])
        return self.wait_healthy(service)

    def network(self, service: str, name: str) -> str:
        """The full name of compose network ``name`` as attached to ``service``."""
        out = run(["docker", "inspect", "--format", "{{json .NetworkSettings.Networks}}", self.container(service)])
        for full in json.loads(out):
            if full == f"{self.project}_{name}" or full.endswith(f"_{name}"):
                return str(full)
        raise ComposeError(f"{service} is not attached to network {name}")

    def disconnect(self, service: str, name: str) -> str:
        full = self.network(service, name)
        run(["docker", "network", "disconnect", full, self.container(service)])
        return full

    def connect(self, service: str, full_network: str) -> None:
        """Attach again, under the service's name (the alias the peers dial)."""
        run(["docker", "network", "connect", "--alias", service, full_network, self.container(service)])


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
        stderr_too: bool = False) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise ComposeError(f"{shlex.join(argv)} exited with {proc.returncode}:\n"
                           f"{(proc.stderr or proc.stdout).strip()[-3000:]}")
    return proc.stdout + (proc.stderr if stderr_too else "")


@contextlib.contextmanager
def deployment(compose: Compose) -> Iterator[Compose]:
    """``up``; then ``down -v`` however the block ends (failure and Ctrl-C included)."""
    try:
        compose.up()
        yield compose
    finally:
        with contextlib.suppress(Exception):
            compose.down()


# ------------------------------------------------------------------------------- the scenario


class Narrator:
    """Prints each step, each command with its output, and each check."""

    def __init__(self, compose: Compose, out: IO[str]) -> None:
        self.c = compose
        self.out = out
        self.tty = out.isatty()

    def step(self, title: str) -> None:
        self.say(f"\n\033[1m== {title}\033[0m" if self.tty else f"\n== {title}")

    def say(self, text: str) -> None:
        self.out.write(text.rstrip("\n") + "\n")
        self.out.flush()

    def run(self, host: str, *argv: str, check: bool = True, show: Callable[[bytes], str] | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run and print a command in a host container; ``show`` condenses its output."""
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
        self.say(f"[{host}]$ {prefix}{shlex.join(argv)}")
        proc = self.c.exec(host, *argv, check=False, env=env)
        if show is not None and proc.returncode == 0:
            text = show(proc.stdout)
        else:
            text = (proc.stdout + proc.stderr).decode(errors="replace").rstrip()
        if text:
            self.say(text)
        if check and proc.returncode != 0:
            raise ScenarioError(f"[{host}] {shlex.join(argv)} exited with {proc.returncode}")
        return proc

    def sm(self, host: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return self.run(host, "splitmirror", *args, check=check)

    def sm_json(self, host: str, *args: str) -> Any:
        """``splitmirror --json ARGS``, its result printed on one line."""
        proc = self.run(host, "splitmirror", "--json", *args,
                        show=lambda out: json.dumps(json.loads(out), separators=(", ", ": ")))
        return json.loads(proc.stdout)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            raise ScenarioError(what)
        self.say(f"   ok: {what}")

    def same(self, a: object, b: object, what: str) -> None:
        if a != b:
            raise ScenarioError(f"{what}: {a!r} != {b!r}")
        self.say(f"   ok: {what}")


def nbd_url(host: str, volume: str) -> str:
    """The export ``volume`` of ``host``'s daemon: NBD with STARTTLS, the host's certificates."""
    return f"nbds://{SITES[host][0]}:{NBD_PORT}/{volume}?tls-certificates={NBD_CERTIFICATES}"


def parse_hashes(text: str) -> dict[str, str]:
    hashes = {}
    for line in text.splitlines():
        digest, _, path = line.partition("  ")
        if path:
            hashes[path.removeprefix("./")] = digest
    return hashes


def _hash_summary(out: bytes) -> str:
    hashes = parse_hashes(out.decode())
    return f"   (sha256 of {len(hashes)} files: {', '.join(hashes)})"


def tree_hashes(n: Narrator, host: str, tree: str) -> dict[str, str]:
    return parse_hashes(n.run(host, "sh", "-c", f"cd {tree} && {HASH_FILES}", show=_hash_summary).stdout.decode())


def volume_hashes(n: Narrator, host: str, volume: str) -> dict[str, str]:
    """Mount the volume's filesystem read-only (nbdfuse + fuse2fs) and hash every file."""
    out = n.run(host, "splitmirror-fs", "run", nbd_url(host, volume), "--", "sh", "-c", HASH_FILES,
                show=_hash_summary).stdout
    return parse_hashes(out.decode())


def in_filesystem(n: Narrator, host: str, volume: str, script: str) -> None:
    """Run a shell script in the root of the volume's filesystem, mounted read-write."""
    n.run(host, "splitmirror-fs", "run", "--rw", nbd_url(host, volume), "--", "sh", "-c", script)


def checksums_agree(n: Narrator, pvol: tuple[str, str], *others: tuple[str, str]) -> str:
    """The checksum of ``pvol`` (host, volume), equal to each of ``others``."""
    want = n.c.checksum(*pvol)
    for host, volume in others:
        n.same(n.c.checksum(host, volume), want,
               f"{volume} at {SITES[host][0]} is identical to {pvol[1]} at {SITES[pvol[0]][0]} (checksum)")
    return want


def run_scenario(compose: Compose, out: IO[str] = sys.stdout) -> dict[str, float]:
    """The demo; raises :class:`ScenarioError` at the first check that fails.

    Returns the seconds each step took."""
    n = Narrator(compose, out)
    timings: dict[str, float] = {}
    clock = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        timings[name] = now - clock[0]
        clock[0] = now

    n.step("mutual TLS: the hosts present client certificates; a client without one is refused")
    n.sm("host-a", "volume", "list")
    refused = n.run("host-a", "splitmirror", "volume", "list", env=PLAINTEXT, check=False)
    n.check(refused.returncode != 0, "primary-a refuses a host API client without TLS")
    lap("tls")

    n.step("site A: an ext4 filesystem on a new 64 MiB volume (mke2fs -d, then nbdcopy over NBD with TLS)")
    n.run("host-a", "splitmirror-fs", "sample-tree", "/root/tree", "--seed", "1")
    n.sm("host-a", "volume", "create", "fs", "--size", "64M")
    n.run("host-a", "splitmirror-fs", "mkfs", nbd_url("host-a", "fs"), "--tree", "/root/tree", "--size", "64M")
    tree_a = tree_hashes(n, "host-a", "/root/tree")
    n.same(volume_hashes(n, "host-a", "fs"), tree_a, "every file on the volume matches the tree")

    n.step("site C: another primary, its own filesystem volume")
    n.run("host-c", "splitmirror-fs", "sample-tree", "/root/tree", "--seed", "3")
    n.sm("host-c", "volume", "create", "mail", "--size", "32M")
    n.run("host-c", "splitmirror-fs", "mkfs", nbd_url("host-c", "mail"), "--tree", "/root/tree", "--size", "32M")
    tree_c = tree_hashes(n, "host-c", "/root/tree")
    lap("filesystems")

    n.step("remote pairs: both primaries mirror into the one secondary (fan-in)")
    n.sm("host-a", "pair", "create", "a-fs", "--pvol", "fs", "--svol", "a-fs-r", "--peer", "2001", "--wait")
    n.sm("host-c", "pair", "create", "c-mail", "--pvol", "mail", "--svol", "c-mail-r", "--peer", "2001", "--wait")
    checksums_agree(n, ("host-a", "fs"), ("host-b", "a-fs-r"))
    checksums_agree(n, ("host-c", "mail"), ("host-b", "c-mail-r"))
    n.sm("host-b", "pair", "display")

    n.step("site C cannot take site A's SPVOL: the secondary refuses it")
    n.sm("host-c", "volume", "create", "other", "--size", "64M")
    refused = n.sm("host-c", "pair", "create", "c-other", "--pvol", "other", "--svol", "a-fs-r", "--peer", "2001",
                   check=False)
    n.check(refused.returncode != 0 and b"a-fs-r" in refused.stderr,
            "pair create naming another primary's SPVOL is refused, naming the volume")
    n.same(n.c.pair_row("host-b", "a-fs")["pair_system_id"], 1001, "a-fs still belongs to system 1001")
    lap("pairs")

    n.step("backup generations at site B: local pairs from each SPVOL")
    for gen in ("a-fs-gen1", "a-fs-gen2"):
        n.sm("host-b", "pair", "create", gen, "--pvol", "a-fs-r", "--svol", gen.replace("gen", "svol"), "--wait")
    n.sm("host-b", "pair", "create", "c-mail-gen1", "--pvol", "c-mail-r", "--svol", "c-mail-svol1", "--wait")
    lap("generations")

    n.step("write: a new file on site A's filesystem, then a backup of each primary")
    n.run("host-a", "sh", "-c", "mkdir -p /root/tree/reports && "
          "seq 1 20000 | sed 's/^/line /' > /root/tree/reports/q3.txt")
    in_filesystem(n, "host-a", "fs", "mkdir -p reports && cp /root/tree/reports/q3.txt reports/")
    tree_a = tree_hashes(n, "host-a", "/root/tree")
    n.same(volume_hashes(n, "host-a", "fs"), tree_a, "the volume holds the new file")
    n.sm("host-a", "backup", "a-fs", "--wait")
    n.sm("host-c", "backup", "c-mail", "--wait")
    n.sm("host-b", "backups", "a-fs")
    n.sm("host-b", "backups", "c-mail")
    gens_a = {g["local_pair"]: g for g in n.c.cli_json("host-b", "backups", "a-fs")}
    gens_c = {g["local_pair"]: g for g in n.c.cli_json("host-b", "backups", "c-mail")}
    n.same(sorted(gens_a), ["a-fs-gen1", "a-fs-gen2"], "site A's pair lists only its own generations")
    n.same(sorted(gens_c), ["c-mail-gen1"], "site C's pair lists only its own generation")
    n.check(gens_a["a-fs-gen1"]["status"] == "SPLIT" and bool(gens_a["a-fs-gen1"]["backup_time"]),
            "a-fs-gen1 holds the backup")
    checksums_agree(n, ("host-a", "fs"), ("host-b", "a-fs-svol1"))
    c_before = {"mail": n.c.checksum("host-c", "mail"), "c-mail-r": n.c.checksum("host-b", "c-mail-r"),
                "c-mail-svol1": n.c.checksum("host-b", "c-mail-svol1")}
    n.same(c_before["c-mail-svol1"], c_before["mail"], "site C's backup is its volume as of the backup")
    lap("backups")

    n.step("damage files on site A (through an NBD + FUSE mount at host A)")
    in_filesystem(n, "host-a", "fs", "echo 'threads = oops' > etc/app.conf && "
                  "dd if=/dev/urandom of=data/blob.bin bs=4096 count=25 seek=100 conv=notrunc 2>/dev/null && "
                  "rm docs/README.txt")
    damaged = volume_hashes(n, "host-a", "fs")
    n.check(damaged.get("etc/app.conf") != tree_a["etc/app.conf"]
            and damaged.get("data/blob.bin") != tree_a["data/blob.bin"] and "docs/README.txt" not in damaged,
            "etc/app.conf and data/blob.bin are damaged, docs/README.txt is gone")
    lap("damage")

    n.step("restore those files from generation a-fs-gen1, at site B (host B is the restore agent)")
    report = n.sm_json("host-b", "restore", "files", "a-fs", "--generation", "a-fs-gen1",
                       "/etc/app.conf", "/data/blob.bin", "/docs/README.txt", "--yes")
    n.same(volume_hashes(n, "host-a", "fs"), tree_a, "every file on site A's volume is back as backed up")
    n.check(0 < report["bytes_sent"] < report["volume_size"] // 10,
            f"only {report['bytes_sent']} bytes crossed the interconnect for a {report['volume_size']}-byte volume")
    n.same(n.c.pair_row("host-a", "a-fs")["status"], "DUPLEX", "a-fs is DUPLEX again")
    checksums_agree(n, ("host-a", "fs"), ("host-b", "a-fs-r"))
    lap("restore files")

    n.step("wreck the whole filesystem on site A, then restore the volume from a-fs-gen1")
    in_filesystem(n, "host-a", "fs", "rm -rf etc data docs reports && mkdir junk && "
                  "dd if=/dev/urandom of=junk/x bs=65536 count=32 2>/dev/null")
    report = n.sm_json("host-b", "restore", "volume", "a-fs", "--generation", "a-fs-gen1", "--yes")
    checksums_agree(n, ("host-b", "a-fs-svol1"), ("host-a", "fs"), ("host-b", "a-fs-r"))
    n.same(volume_hashes(n, "host-a", "fs"), tree_a, "every file is back")
    n.check(report["bytes_sent"] < report["volume_size"] // 4,
            f"the restore sent {report['bytes_sent']} bytes (changed blocks only), not the whole volume")
    n.same(n.c.pair_row("host-a", "a-fs")["status"], "DUPLEX", "a-fs is DUPLEX again")
    lap("restore volume")

    n.step("site C was never touched")
    n.same({v: n.c.checksum("host-c" if v == "mail" else "host-b", v) for v in c_before}, c_before,
           "site C's PVOL, SPVOL and generation are unchanged")
    n.same(volume_hashes(n, "host-c", "mail"), tree_c, "site C's files are intact")
    n.same(n.c.pair_row("host-c", "c-mail")["status"], "DUPLEX", "c-mail stayed DUPLEX")
    n.sm("host-b", "pair", "display")
    lap("site C")

    n.step("Prometheus (Debian's package) scrapes every site over HTTPS with the viewer certificate")
    deadline = time.monotonic() + 90
    while len(up := n.c.prometheus('up{job="splitmirror"} == 1')) < 3 and time.monotonic() < deadline:
        time.sleep(2)
    for line in up:
        n.say(line)
    n.check(len(up) == 3, "Prometheus scrapes primary-a, secondary and primary-c")
    while len(pairs := n.c.prometheus('splitmirror_pair_status{peer!="local"} == 1')) < 4 \
            and time.monotonic() < deadline:
        time.sleep(2)
    for line in pairs:
        n.say(line)
    n.check(len(pairs) == 4 and all('status="DUPLEX"' in line for line in pairs),
            "both remote pairs are DUPLEX at both ends, as Prometheus sees them")
    for line in n.c.prometheus("time() - splitmirror_backup_last_success_timestamp_seconds"):
        n.say(f"backup age (s): {line}")
    lap("prometheus")
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="use the existing image")
    parser.add_argument("--keep", action="store_true", help="leave the sites running (stop: docker-compose "
                        "-p PROJECT down -v)")
    parser.add_argument("--project", default="splitmirror-demo", help="compose project name")
    args = parser.parse_args(argv)
    out = sys.stdout
    problem = docker_problem()
    if problem:
        print(f"compose-demo: {problem}", file=sys.stderr)
        return 1
    started = time.monotonic()
    if not args.no_build:
        build_images()
    compose = Compose(args.project, out=out)
    say: Callable[[str], None] = Narrator(compose, out).step
    with contextlib.suppress(ComposeError):
        compose.down()  # a deployment left over by an earlier run
    say(f"start the three sites (compose project {args.project})")
    try:
        print(f"sites up and healthy in {compose.up():.1f}s", flush=True)
        print(compose.compose("ps").rstrip(), flush=True)
        timings = run_scenario(compose, out)
    except (ScenarioError, ComposeError) as exc:
        print(f"\ncompose-demo FAILED: {exc}", file=sys.stderr)
        for service in ("secondary", "primary-a", "primary-c"):
            with contextlib.suppress(Exception):
                print(f"--- {service} log (tail)\n{compose.logs(service)[-2500:]}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            say("stop the sites (containers, networks and volumes)")
            compose.down()
    say("done: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f"; {time.monotonic() - started:.0f}s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
