"""The README's application-consistent backup examples, run for real.

An ext4 made on the PVOL through NBD (nbdfuse -> loop -> mount) at the
primary: (1) ``fsfreeze -f``/``-u`` as the pre/post-backup hooks leave a
generation whose filesystem needs no journal replay and holds a file written
just before; (2) a PostgreSQL 15 cluster on it with ``CHECKPOINT`` as the
pre-backup hook; ``backup check`` with a probe starts PostgreSQL on the
copy-on-write copy of the generation and counts the rows.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site, free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
TOOLS = ("nbdfuse", "nbdkit", "losetup", "mkfs.ext4", "mount", "umount", "fsfreeze", "runuser", "dumpe2fs")
pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS) or not Path("/dev/fuse").exists(),
                                reason="needs nbdfuse, nbdkit, loop devices, e2fsprogs, fsfreeze and FUSE")


#: The README's probe: start PostgreSQL on the mounted copy (own port and
#: socket; the copy's postmaster.pid is the primary's), count, stop.
PROBE = """set -u
{bin}/pg_controldata pgdata | grep "Latest checkpoint location"
rm -f pgdata/postmaster.pid
mkdir -p run2 && chown postgres run2
pg() {{ runuser -u postgres -- {bin}/pg_ctl -D "$SPLITMIRROR_MOUNT/pgdata" -w -t 120 "$@"; }}
pg -l "$SPLITMIRROR_MOUNT/run2/log" -o "-p {port} -k $SPLITMIRROR_MOUNT/run2 -c listen_addresses=''" start \
    || {{ cat run2/log; exit 1; }}
rows=$(runuser -u postgres -- {bin}/psql -h "$SPLITMIRROR_MOUNT/run2" -p {port} -tAc 'SELECT count(*) FROM orders' \
    postgres)
rc=$?
pg -m fast stop
echo "rows=$rows"
exit $rc
"""


def run(argv: list[str], user: str | None = None, timeout: float = 120) -> str:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr or result.stdout}")
    return result.stdout


def checkpoint(data: Path) -> str:
    """``Latest checkpoint location: 0/...`` of a cluster, from its pg_control."""
    line = next(x for x in run([str(PG_BIN / "pg_controldata"), str(data)]).splitlines()
                if x.startswith("Latest checkpoint location"))
    return " ".join(line.split())


@contextlib.contextmanager
def mounted_pvol(primary: Site, volume: str, base: Path) -> Iterator[Path]:
    """The PVOL's NBD export as a file (nbdfuse), a loop device on it, ext4 on that, mounted."""
    fuse, mnt, pidfile = base / "fuse", base / "mnt", base / "nbdfuse.pid"
    fuse.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(fuse / "disk"),
                             f"nbd://127.0.0.1:{primary.nbd_port}/{volume}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = ""
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "nbdfuse did not start"
            time.sleep(0.05)
        loop = run(["losetup", "-f", "--show", str(fuse / "disk")]).strip()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop], timeout=300)
        run(["mount", "-o", "noatime", loop, str(mnt)])
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        for _ in range(20):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0 \
                    or subprocess.run(["mountpoint", "-q", str(mnt)]).returncode != 0:
                break
            time.sleep(0.25)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", str(fuse)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def base() -> Iterator[Path]:
    # World-traversable: the postgres user reaches its data directory (and the check's mount) through it.
    path = Path(tempfile.mkdtemp(prefix="sm-examples-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_sites(base: Path, hooks: list[str]) -> tuple[Site, Site]:
    primary = Site("primary", 1001, base, nbd=True)
    secondary = Site("secondary", 2001, base)
    primary.peer_with(secondary)
    primary.extra_args = hooks
    secondary.start()
    primary.start()
    primary.cli("volume", "create", "db", "--size", "256M")
    primary.cli("pair", "create", "p", "--pvol", "db", "--svol", "db-r", "--peer", "2001", "--wait")
    secondary.cli("pair", "create", "g1", "--pvol", "db-r", "--svol", "s1", "--wait")
    return primary, secondary


def test_fsfreeze_hooks_give_a_clean_filesystem(base: Path) -> None:
    mnt = base / "pvol" / "mnt"
    (base / "pvol").mkdir()
    primary, secondary = start_sites(base, ["--pre-backup-hook", f"fsfreeze -f {mnt}",
                                            "--post-backup-hook", f"fsfreeze -u {mnt}"])
    try:
        with mounted_pvol(primary, "db", base / "pvol"):
            (mnt / "orders.txt").write_text("order 42\n")  # in the page cache only: fsfreeze -f writes it out
            primary.cli("backup", "p", "--wait")
            (mnt / "after.txt").write_text("thawed\n")  # writable again: the post-hook ran
        svol = secondary.data_dir / "volumes" / "s1.vol"
        features = run(["dumpe2fs", "-h", str(svol)])
        assert "needs_recovery" not in features.split("Filesystem features:")[1].splitlines()[0]
        report = secondary.cli_json("backup", "check", "g1", "--probe", "cat orders.txt; test ! -e after.txt")
        assert report["verdict"] == "passed" and "order 42" in report["output"], report
    finally:
        primary.kill()
        secondary.kill()


@pytest.mark.skipif(not (PG_BIN / "pg_ctl").exists(), reason="needs PostgreSQL 15 (postgresql-15)")
def test_postgresql_checkpoint_hook_and_probe(base: Path) -> None:
    port, socket = free_port(), base / "pvol" / "mnt" / "run"
    (base / "pvol").mkdir()
    psql = f"runuser -u postgres -- {PG_BIN}/psql -h {socket} -p {port} -v ON_ERROR_STOP=1 postgres"
    primary, secondary = start_sites(base, ["--pre-backup-hook", f"{psql} -c CHECKPOINT"])
    try:
        with mounted_pvol(primary, "db", base / "pvol") as mnt:
            data = mnt / "pgdata"
            for d in (data, socket):
                d.mkdir()
                shutil.chown(d, "postgres", "postgres")
            data.chmod(0o700)
            run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"],
                user="postgres", timeout=300)
            log = base / "pg.log"
            log.touch()
            shutil.chown(log, "postgres", "postgres")
            pg = [str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "120"]
            run([*pg, "-l", str(log), "-o", f"-p {port} -k {socket} -c listen_addresses=''", "start"],
                user="postgres", timeout=180)
            try:
                run(["sh", "-c", f"{psql} -c 'CREATE TABLE orders AS SELECT g AS id FROM generate_series(1, 1000) g'"])
                before = checkpoint(data)
                primary.cli("backup", "p", "--wait")  # the CHECKPOINT runs just before the backup point
                hooked = checkpoint(data)
                assert hooked != before
                run(["sh", "-c", f"{psql} -c 'INSERT INTO orders SELECT 1000 + g FROM generate_series(1, 5) g'"])
            finally:
                run([*pg, "-m", "fast", "stop"], user="postgres", timeout=180)
        # At the secondary: PostgreSQL starts on the copy (crash recovery in the overlay) and answers.
        script = base / "probe.sh"
        script.write_text(PROBE.format(bin=PG_BIN, port=port + 1))
        probe = f"sh {script}"
        report = secondary.cli_json("backup", "check", "g1", "--probe", probe)
        assert report["verdict"] == "passed", report
        assert "rows=1000" in report["output"], report["output"]
        # The copy starts from the checkpoint the pre-backup hook made (short recovery).
        copied = [" ".join(x.split()) for x in report["output"].splitlines() if x.startswith("Latest checkpoint loc")]
        assert copied == [hooked], report["output"]
    finally:
        primary.kill()
        secondary.kill()
