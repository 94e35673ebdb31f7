"""Shared parts of the data-path benchmarks (qemu_bench, flush_latency, pgbench).

Not a benchmark itself.  It holds:

- :class:`Daemons`: a primaryd and a secondaryd on loopback with NBD, and the
  three volume kinds every data-path bench compares -- a SIMPLEX volume, the
  PVOL of a sync DUPLEX pair and the PVOL of an async DUPLEX pair, all the
  same size on the same primaryd;
- :class:`CpuMeter`: CPU time (utime + stime from ``/proc``) of each daemon,
  in total and per thread, so a bench can print CPU microseconds per request;
- :class:`Profiler`: ``py-spy record`` of both daemons around a measured run
  (raw collapsed stacks, one thread per stack) and :func:`stage_costs`, which
  splits each daemon's measured CPU time into the stages of the data path.

Only stable interfaces are imported: ``splitmirror.testing``, ``client`` and
``splitmirror.sizes``; everything else (module and function names used to
recognise stages in stacks) is matched by name, so a stage the code no longer
has simply shows as 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import Client
from splitmirror.testing import Site, free_port

T = TypeVar("T")
MiB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One volume kind compared by the data-path benches."""

    label: str  # "SIMPLEX", "sync", "async"
    volume: str
    pair: str = ""  # empty for the SIMPLEX volume
    mode: str = ""


KINDS: tuple[Kind, ...] = (
    Kind("SIMPLEX", "simplex"),
    Kind("sync", "pvol-sync", "pair-sync", "sync"),
    Kind("async", "pvol-async", "pair-async", "async"),
)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (0 < q <= 100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rotated(items: Sequence[Kind], r: int) -> list[Kind]:
    """``items`` starting at round ``r``'s position: each kind leads a round in turn."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


# ----------------------------------------------------------------- daemons


class Daemons:
    """primaryd + secondaryd with NBD, and the volumes of :data:`KINDS`."""

    def __init__(self, base: Path, size: int, kinds: Sequence[Kind] = KINDS, link_timeout: float = 5.0,
                 grpc_stream: bool = False) -> None:
        self.size = size
        self.kinds = list(kinds)
        self.primary = Site("primary", 1001, base, link_timeout=link_timeout, nbd=True)
        self.secondary = Site("secondary", 2001, base, link_timeout=link_timeout, nbd=True)
        if grpc_stream:
            self.secondary.data_port = 0  # --data off: the write streams go over the gRPC Replicate call
        self.primary.peer_with(self.secondary)

    def start(self) -> None:
        self.secondary.start()
        self.primary.start()
        asyncio.run(self._create())

    async def _create(self) -> None:
        async with Client(self.primary.address) as c:
            for kind in self.kinds:
                await c.create_volume(kind.volume, self.size)
                if kind.pair:
                    await c.create_pair(kind.pair, kind.volume, kind.volume + "-r",
                                        peer=self.secondary.system_id, mode=kind.mode)
            for kind in self.kinds:
                if kind.pair:
                    await c.wait_pair(kind.pair, timeout=120, interval=0.1)

    def stop(self) -> None:
        for site in (self.primary, self.secondary):
            try:
                site.stop()
            except Exception as exc:  # keep stopping the other one
                print(f"warning: stopping {site.role}d: {exc}", file=sys.stderr)

    def uri(self, kind: Kind) -> str:
        return f"nbd://127.0.0.1:{self.primary.nbd_port}/{kind.volume}"

    @property
    def pids(self) -> dict[str, int]:
        out = {}
        for name, site in (("primaryd", self.primary), ("secondaryd", self.secondary)):
            assert site.proc is not None
            out[name] = site.proc.pid
        return out

    def settle(self, kind: Kind, timeout: float = 120.0) -> str:
        """Wait until ``kind``'s pair has nothing queued; returns its status
        (``"-"`` for SIMPLEX).  A status other than DUPLEX means the run
        measured something else, and the benches say so."""
        if not kind.pair:
            return "-"
        return asyncio.run(self._settle(kind, timeout))

    async def _settle(self, kind: Kind, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        async with Client(self.primary.address) as c:
            while True:
                rows = [r for r in await c.display_pairs(kind.pair) if r.primary]
                row = rows[0]
                if row.status != "DUPLEX" or row.queue_bytes == 0 or time.monotonic() > deadline:
                    return str(row.status)
                await asyncio.sleep(0.05)

    def replicated_writes(self) -> dict[str, int]:
        """Pair name -> writes replicated so far (the primary's counters)."""
        async def get() -> dict[str, int]:
            async with Client(self.primary.address) as c:
                stats = await c.stats()
            return {p.pair: int(p.replicated_writes) for p in stats.pairs}
        return asyncio.run(get())

    def checksums_match(self) -> dict[str, bool]:
        """Pair name -> PVOL and SPVOL hold the same bytes (after settling)."""
        async def get() -> dict[str, bool]:
            out = {}
            async with Client(self.primary.address) as p, Client(self.secondary.address) as s:
                for kind in self.kinds:
                    if kind.pair:
                        out[kind.pair] = await p.checksum(kind.volume) == await s.checksum(kind.volume + "-r")
            return out
        for kind in self.kinds:
            self.settle(kind)
        return asyncio.run(get())


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclasses.dataclass(frozen=True)
class Target:
    """One NBD export a bench drives: the ``nbdkit file`` reference or a daemon's export of a kind."""
    label: str
    uri: str
    kind: Kind | None = None  # None: nbdkit


def start_nbdkit(base: Path, size: int) -> tuple[subprocess.Popen[bytes], Target]:
    """``nbdkit file`` serving a sparse image of ``size`` bytes on loopback: the reference server.
    The caller stops it with :func:`stop_process` (it also exits with its parent)."""
    image = base / "nbdkit.img"
    with image.open("wb") as f:
        f.truncate(size)
    port = free_port()
    proc = subprocess.Popen(["nbdkit", "--exit-with-parent", "-f", "-i", "127.0.0.1", "-p", str(port),
                             "file", str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc, Target("nbdkit", f"nbd://127.0.0.1:{port}/")


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------- CPU time


def _stat_ticks(path: Path) -> tuple[str, int] | None:
    """(comm, utime + stime) from a /proc .../stat file."""
    try:
        raw = path.read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    return comm, int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


@dataclasses.dataclass
class CpuSnapshot:
    total: int  # ticks of the whole process (exited threads included)
    threads: dict[int, tuple[str, int]]  # tid -> (comm, ticks)


class CpuMeter:
    """CPU time of processes, whole and per thread, between two snapshots."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._start: dict[str, CpuSnapshot] = {}

    @staticmethod
    def snapshot(pid: int) -> CpuSnapshot:
        whole = _stat_ticks(Path(f"/proc/{pid}/stat"))
        threads: dict[int, tuple[str, int]] = {}
        task_dir = Path(f"/proc/{pid}/task")
        for entry in task_dir.iterdir() if task_dir.exists() else ():
            got = _stat_ticks(entry / "stat")
            if got is not None:
                threads[int(entry.name)] = got
        return CpuSnapshot(whole[1] if whole else 0, threads)

    def start(self) -> None:
        self._start = {name: self.snapshot(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, CpuUse]:
        """CPU used since :meth:`start`, per process."""
        out = {}
        for name, pid in self.pids.items():
            end = self.snapshot(pid)
            begin = self._start[name]
            threads = {}
            for tid, (comm, ticks) in end.threads.items():
                threads[tid] = (comm, (ticks - begin.threads.get(tid, (comm, 0))[1]) / CLK_TCK)
            out[name] = CpuUse((end.total - begin.total) / CLK_TCK, threads)
        return out


@dataclasses.dataclass
class CpuUse:
    seconds: float
    threads: dict[int, tuple[str, float]]  # tid -> (comm, CPU seconds)


def add_cpu(into: dict[str, list[CpuUse]], use: dict[str, CpuUse]) -> None:
    for name, u in use.items():
        into.setdefault(name, []).append(u)


# ----------------------------------------------------------------- profiling


def py_spy() -> str | None:
    """The py-spy executable (the venv's first, it is a dev extra)."""
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """``py-spy record`` of several processes at once; raw collapsed stacks.

    ``--threads`` puts the thread id at the root of each stack (so a thread's
    samples can be matched with its CPU time).  ``--native`` adds C frames
    (gRPC core, protobuf) but needs py-spy to pause the process for each
    sample; without it ``--nonblocking`` leaves the daemons running.  Either
    way the profiled run is slower: take figures from unprofiled runs.
    """

    def __init__(self, out_dir: Path, tag: str, pids: dict[str, int], rate: int = 200,
                 native: bool = False) -> None:
        self.out_dir = out_dir
        self.tag = tag
        self.pids = pids
        self.rate = rate
        self.native = native
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.files: dict[str, Path] = {}

    def __enter__(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy not found: pip install py-spy (it is in the dev extras)")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            path = self.out_dir / f"{self.tag}-{name}.txt"
            argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--threads",
                    "--rate", str(self.rate), "--full-filenames", "-o", str(path)]
            argv.append("--native" if self.native else "--nonblocking")
            self.procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.files[name] = path
        time.sleep(0.5)  # py-spy attaches
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"py-spy on {name} exited: {err.strip()}")
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# Stages of the data path, recognised in a stack from the leaf towards the
# root: the first frame that matches a rule names the stage, so the cost of
# asyncio primitives (locks, futures, task creation) counts for the stage that
# uses them.  A main-thread sample that reaches the root unmatched is the
# event loop's own work (uvloop, task stepping); on another thread it counts
# as "other threads".
STAGES = (
    "NBD parse (codec)",
    "NBD socket I/O (streams, uvloop)",
    "NBD dispatch (server, export)",
    "write checks, pair lookups",
    "write ordering (RangeOrder)",
    "write-intent log",
    "local write (pwrite)",
    "local read (pread)",
    "thread pool hop (executor)",
    "stream enqueue (push, seq)",
    "stream encode (framing)",
    "stream encode (protobuf)",
    "gRPC send/receive (grpc.aio)",
    "stream decode (framing)",
    "stream decode (protobuf)",
    "Replicate handler, acks (mirror)",
    "data connection (datalink, dataport)",
    "apply at the secondary",
    "ack handling",
    "write path (other)",
    "NBD replies",
    "flush (fdatasync, WAL fsync)",
    "copy table (SQLite)",
    "host API, keepalive, background",
    "event loop / scheduling",
    "gRPC poller, C-core threads",
    "other threads",
)

_SOURCE_RULES: tuple[tuple[str, str, str | None], ...] = (
    # (file suffix or "/dir/", function regex, stage); function "" matches any;
    # stage None: not a stage of its own, the caller's stage counts (the
    # daemon's main runs the loop; foundation modules serve every stage).
    # tests/test_bench_rules.py checks that each file exists and each function regex names one of its functions.
    ("splitmirror/daemon/main.py", r"^main$|^run_loop$|^serve$", None),
    ("splitmirror/nbd/codec.py", r"^send_", "NBD replies"),
    ("splitmirror/nbd/codec.py", "", "NBD parse (codec)"),
    ("splitmirror/nbd/connection.py", r"^_reply$|^_flush$|^_write$", "NBD replies"),
    ("splitmirror/nbd/connection.py", r"^data_received$|^eof_received$|^_update_reading$",
     "NBD socket I/O (streams, uvloop)"),
    ("/splitmirror/nbd/", "", "NBD dispatch (server, export)"),
    ("splitmirror/ports/nbdexport.py", r"read_only|_live", "write checks, pair lookups"),
    ("splitmirror/ports/nbdexport.py", "", "NBD dispatch (server, export)"),
    ("splitmirror/ports/nbdmeter.py", "", "NBD dispatch (server, export)"),
    ("asyncio/streams.py", "", "NBD socket I/O (streams, uvloop)"),
    ("splitmirror/storage/ordering.py", "", "write ordering (RangeOrder)"),
    ("splitmirror/storage/intent.py", "", "write-intent log"),
    ("splitmirror/storage/sqlthread.py", r"^sync$|fsync", "flush (fdatasync, WAL fsync)"),
    ("splitmirror/storage/sqlthread.py", "", "copy table (SQLite)"),
    ("splitmirror/storage/copytable.py", "", "copy table (SQLite)"),
    ("splitmirror/storage/volume.py", r"fdatasync|^flush$", "flush (fdatasync, WAL fsync)"),
    ("splitmirror/storage/volume.py", r"^run$", "thread pool hop (executor)"),
    ("splitmirror/storage/volume.py", r"read", "local read (pread)"),
    ("splitmirror/storage/volume.py", "", "local write (pwrite)"),
    ("splitmirror/storage/files.py", "", None),  # the open-file cache: the read or write that uses it
    ("splitmirror/storage/bitmap.py", "", None),  # pending bits: the write path or copy that sets them
    ("splitmirror/storage/scopes.py", "", None),
    ("splitmirror/procedures/verified_reads.py", "", "local read (pread)"),  # a generation's reads, checked
    ("concurrent/futures/thread.py", "", "thread pool hop (executor)"),
    ("asyncio/futures.py", r"_call_set_state|_copy_future_state|_set_state|wrap_future|_chain_future",
     "thread pool hop (executor)"),
    ("asyncio/threads.py", "", "thread pool hop (executor)"),
    ("splitmirror/replication/queue.py", r"^ack$", "ack handling"),
    ("splitmirror/replication/queue.py", r"take_batch", "stream encode (framing)"),
    ("splitmirror/replication/queue.py", "", "stream enqueue (push, seq)"),
    ("splitmirror/replication/framing.py", r"^(decode|frames_of|from_entry|accept)$", "stream decode (framing)"),
    ("splitmirror/replication/framing.py", "", "stream encode (framing)"),
    ("splitmirror/replication/stream.py", r"^push$", "stream enqueue (push, seq)"),
    ("splitmirror/replication/stream.py", r"^(_send|messages)$", "stream encode (framing)"),
    ("splitmirror/replication/stream.py", r"^_acked_to$|^run$", "ack handling"),
    ("splitmirror/replication/dataproto.py", r"^(batch|marker|ack|open_channel|hello|error)$",
     "stream encode (framing)"),
    ("splitmirror/replication/dataproto.py", "", "stream decode (framing)"),
    ("splitmirror/replication/datalink.py", "", "data connection (datalink, dataport)"),
    ("splitmirror/ports/dataport.py", "", "data connection (datalink, dataport)"),
    ("/splitmirror/replication/", "", "host API, keepalive, background"),
    ("splitmirror/pairstate/channel.py", r"^push$", "stream enqueue (push, seq)"),
    ("splitmirror/pairstate/pair.py", "", "write checks, pair lookups"),
    ("splitmirror/pairstate/index.py", "", "write checks, pair lookups"),
    ("splitmirror/ports/interconnect.py", r"^_?[Rr]eplicate$|^reader$", "Replicate handler, acks (mirror)"),
    ("splitmirror/pairs/manager.py", r"^mirror_apply", "apply at the secondary"),
    ("splitmirror/pairs/mirror_end.py", r"apply|_backup_point", "apply at the secondary"),
    ("splitmirror/datapath/local_channel.py", "", "apply at the secondary"),  # SPVOL -> SVOL (a generation)
    ("splitmirror/datapath/writes.py", r"flush", "flush (fdatasync, WAL fsync)"),
    ("splitmirror/datapath/writes.py", r"read", "local read (pread)"),
    ("splitmirror/datapath/writes.py", r"_mirroring|write_refusal|check_host_writable|^volume$|_track",
     "write checks, pair lookups"),
    ("splitmirror/datapath/writes.py", "", "write path (other)"),
    ("splitmirror/datapath/system.py", r"pairs_of|pairs_from|pair_into|write_refusal|^volume$",
     "write checks, pair lookups"),
    ("splitmirror/datapath/system.py", "", "write path (other)"),
    ("splitmirror/observe/iometer.py", "", None),  # host I/O metering: the request it measures
    ("splitmirror/eventsink.py", "", None),
    ("splitmirror/clock.py", "", None),
    ("/grpc/", "", "gRPC send/receive (grpc.aio)"),
    ("/splitmirror/", "", "host API, keepalive, background"),
    ("/grpc_health/", "", "host API, keepalive, background"),
)

# Native frames (py-spy --native): (regex on the frame, stage); None: keep looking up.
_NATIVE_RULES: tuple[tuple[str, str | None], ...] = (
    (r"fdatasync|fsync", "flush (fdatasync, WAL fsync)"),
    (r"pwrite", "local write (pwrite)"),
    (r"pread", "local read (pread)"),
    (r"sqlite", "copy table (SQLite)"),
    (r"PyUpb_Message_Serialize|upb_Encode", "stream encode (protobuf)"),
    (r"PyUpb_Message_(MergeFromString|FromString|ParseFromString)|upb_Decode", "stream decode (protobuf)"),
    (r"cygrpc|libgrpc|grpc_", "gRPC send/receive (grpc.aio)"),
    (r"UVStream|uv__read|uv__write|uv__stream|uv_try_write", "NBD socket I/O (streams, uvloop)"),
)

# A sample whose innermost frames wait (no CPU used) is dropped: py-spy's
# idle detection does not work with --native.
_IDLE = re.compile(r"^(epoll_p?wait|poll|ppoll|select|pselect6?|nanosleep|clock_nanosleep|accept4?|"
                   r"pthread_cond_(timed)?wait|sem_(timed|clock)?wait|__futex\w*|futex_wait\w*|"
                   r"PyThread_acquire_lock_timed|_queue_SimpleQueue_get\w*|do_futex_wait\w*|"
                   r"__GI___poll|__libc_recv|__lll_lock_wait)\b")

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame)
    return (m.group("func"), m.group("file")) if m else (frame, "")


def _frame_stage(frame: str) -> str | None:
    func, file = _split(frame)
    # The method a frame belongs to: "StorageSystem._mirroring.<locals>.<listcomp>" -> "_mirroring".
    short = func.split(".<locals>", 1)[0].rsplit(".", 1)[-1]
    if file.endswith(".py"):
        for suffix, func_re, source_stage in _SOURCE_RULES:
            if (file.endswith(suffix) or (suffix.startswith("/") and suffix in file)) and \
                    (not func_re or re.search(func_re, short)):
                return source_stage
        return None
    for pattern, native_stage in _NATIVE_RULES:
        if re.search(pattern, frame):
            return native_stage
    return None


def idle(frames: Sequence[str]) -> bool:
    """True when the innermost resolved frames show a wait, not work."""
    for frame in reversed(frames[-4:]):
        func, _ = _split(frame)
        if _IDLE.match(func):
            return True
        if not func.startswith("0x"):  # an unresolved address may be a libc wait: look one further
            return False
    return False


def classify(frames: Sequence[str], main_thread: bool = True) -> str:
    """The stage of one sampled stack (root first, as py-spy writes it)."""
    for frame in reversed(frames):
        stage = _frame_stage(frame)
        if stage is not None:
            return stage
    return "event loop / scheduling" if main_thread else "other threads"


_THREAD = re.compile(r"thread \((0x[0-9a-fA-F]+|\d+)\)(?::\s*(?P<name>.*))?")


def read_profile(path: Path) -> dict[int, tuple[str, collections.Counter[str]]]:
    """Raw py-spy output -> OS tid -> (thread name, stage -> busy samples).

    Every thread py-spy saw is listed, even one whose samples were all idle.
    """
    out: dict[int, tuple[str, collections.Counter[str]]] = {}
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        m = _THREAD.match(frames[0]) if frames else None
        if m is None:
            continue
        tid = int(m.group(1), 0)
        name = (m.group("name") or "").strip()
        frames = frames[1:]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        counter = out.setdefault(tid, (name, collections.Counter()))[1]
        if not idle(frames):
            counter[classify(frames, name == "MainThread")] += int(count)
    return out


def _is_grpc_thread(comm: str, name: str) -> bool:
    return "_poll_wrapper" in name or comm.startswith(
        ("grpc", "event_engine", "default-executo", "resolver-execu", "timer_manager", "global-executo"))


def stage_costs(profile: Path, cpu: CpuUse) -> dict[str, float]:
    """CPU seconds per stage.

    Threads are grouped by name (``volume-io_0`` .. ``_7`` are one group), and
    each group's CPU time is split by its busy samples' stages.  gRPC's
    threads (its C-core threads and the grpc.aio poller thread) count as
    "gRPC poller, C-core threads"; a group without busy samples, and threads
    that ended during the run (their CPU is in the process total only),
    count as "other threads".
    """
    samples = read_profile(profile)
    groups: dict[str, tuple[float, collections.Counter[str]]] = {}
    costs: dict[str, float] = collections.defaultdict(float)
    for tid, (comm, seconds) in cpu.threads.items():
        name, counter = samples.get(tid, ("", collections.Counter()))
        if _is_grpc_thread(comm, name):
            costs["gRPC poller, C-core threads"] += seconds
            continue
        key = re.sub(r"\d+", "", name) or f"tid {tid}"
        got_seconds, got_counter = groups.get(key, (0.0, collections.Counter()))
        groups[key] = (got_seconds + seconds, got_counter + counter)
    for seconds, counter in groups.values():
        total = sum(counter.values())
        if not total:
            costs["other threads"] += seconds
            continue
        for stage, n in counter.items():
            costs[stage] += seconds * n / total
    leftover = cpu.seconds - sum(s for _, s in cpu.threads.values())
    if leftover > 0:
        costs["other threads"] += leftover
    return dict(costs)


def profiled(out_dir: Path, tag: str, pids: dict[str, int], rate: int, native: bool,
             workload: Callable[[], T]) -> tuple[T, dict[str, CpuUse], dict[str, dict[str, float]]]:
    """Run ``workload`` under :class:`Profiler` and :class:`CpuMeter`.

    Returns its result, the CPU each daemon used, and each daemon's CPU
    seconds per stage (see :func:`stage_costs`).
    """
    meter = CpuMeter(pids)
    with Profiler(out_dir, tag, pids, rate=rate, native=native) as prof:
        meter.start()
        result = workload()
        use = meter.stop()
    costs = {name: stage_costs(prof.files[name], use[name]) for name in pids}
    return result, use, costs


def print_stage_table(title: str, costs: dict[str, dict[str, float]], requests: dict[str, int],
                      unit: str = "request") -> None:
    """µs of CPU per request per stage; ``costs`` is column -> stage -> CPU seconds."""
    columns = list(costs)
    print(title)
    print(f"{'stage':<36}" + "".join(f"{c:>14}" for c in columns))
    for stage in STAGES:
        values = [costs[c].get(stage, 0.0) / max(1, requests[c]) * 1e6 for c in columns]
        if any(v >= 0.05 for v in values):
            print(f"{stage:<36}" + "".join(f"{v:>14.1f}" for v in values))
    totals = [sum(costs[c].values()) / max(1, requests[c]) * 1e6 for c in columns]
    print(f"{f'total (us CPU / {unit})':<36}" + "".join(f"{v:>14.1f}" for v in totals))


def merge_costs(parts: Iterable[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for part in parts:
        for stage, seconds in part.items():
            out[stage] += seconds
    return dict(out)


def add_profile_args(parser: argparse.ArgumentParser, seconds: float) -> None:
    parser.add_argument("--grpc-stream", action="store_true",
                        help="the secondary offers no data port: write streams over the gRPC Replicate call "
                             "(the path before the data port, for a before/after comparison)")
    group = parser.add_argument_group("profiling (after the measured rounds, not counted in the figures)")
    group.add_argument("--profile", metavar="DIR", type=Path,
                       help="profile both daemons with py-spy for each kind and print CPU us per request "
                            "per stage; raw stacks go to DIR")
    group.add_argument("--profile-seconds", type=float, default=seconds,
                       help=f"length of each profiled run (default {seconds:g})")
    group.add_argument("--profile-rate", type=int, default=25,
                       help="py-spy samples per second (default 25; --native pauses the process per sample)")
    group.add_argument("--no-native", action="store_true",
                       help="Python frames only (no pauses, but C work run by the event loop shows as "
                            "'event loop / scheduling')")


def print_profiles(costs: dict[str, dict[str, dict[str, float]]], requests: dict[str, int], unit: str) -> None:
    """``costs``: column -> daemon -> stage -> CPU seconds; one table per daemon."""
    daemons = sorted({d for by_daemon in costs.values() for d in by_daemon})
    for daemon in daemons:
        print_stage_table(f"{daemon}: CPU us per {unit}, by stage (py-spy)",
                          {col: by_daemon.get(daemon, {}) for col, by_daemon in costs.items()}, requests, unit)
