"""The Prometheus metrics of a storage system, read from its state when scraped.

:class:`SystemCollector` is a ``prometheus_client`` custom collector: it
keeps no gauges of its own and the data path updates none; a scrape walks
the pairs, links, volumes and host I/O series as they are at that moment
(on the event loop thread, see :mod:`splitmirror.ports.metrics_http`).  The
metric names and labels listed in :data:`METRICS` are a contract that
dashboards and alert rules rely on (``deploy/``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ..clock import timestamp_of
from ..datapath.system import StorageSystem
from ..pairstate.pair import EndRole, Pair
from ..procedures.backup import BackupManager
from ..replication.link import PeerLink
from ..status import MIRRORING, PairStatus
from .events import EventLog
from .iometer import IoMeter

#: name -> (type, labels, help).  Counters are exposed with ``_total``.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "splitmirror_info": ("gauge", ("system_id", "role"), "This storage system (always 1)."),
    "splitmirror_pair_status": ("gauge", ("pair", "role", "peer", "mode", "status"),
                                "1 for the pair's current status, 0 for the others (a state set); role is the "
                                "end held here (primary, mirror), peer the other system or 'local'."),
    "splitmirror_pair_status_since_timestamp_seconds": ("gauge", ("pair",),
                                                        "When the pair's status last changed (from the event log)."),
    "splitmirror_pair_pending_bytes": ("gauge", ("pair",), "Bytes of the tracks marked in the pending bitmap(s) "
                                                           "held here."),
    "splitmirror_pair_pending_tracks": ("gauge", ("pair",), "Tracks marked in the pending bitmap(s) held here."),
    "splitmirror_pair_lag_seconds": ("gauge", ("pair",),
                                     "Age of the oldest write acknowledged to the host and not yet applied at the "
                                     "mirror (0 when in step). Primary end only."),
    "splitmirror_pair_queue_bytes": ("gauge", ("pair",), "Bytes waiting on the ordered stream. Primary end only."),
    "splitmirror_pair_split_brain": ("gauge", ("pair",),
                                     "1 when both ends were written while suspended (a resync was refused) and no "
                                     "status change has happened since."),
    "splitmirror_pair_role_epoch": ("gauge", ("pair",), "Role epoch of the end held here: grows at every takeover "
                                                        "and swap. Remote pairs only."),
    "splitmirror_pair_fenced": ("gauge", ("pair",), "1 while the end held here is an old primary fenced because the "
                                                    "other end took the role over (until resynced). Remote pairs."),
    "splitmirror_resync_remaining_bytes": ("gauge", ("pair",), "Bytes a running copy still has to move."),
    "splitmirror_resync_bytes": ("counter", ("pair",), "Bytes moved by initial copies and resyncs (sent or "
                                                       "received here) since the daemon started."),
    "splitmirror_replicated_bytes": ("counter", ("pair",), "Host write bytes replicated (acknowledged by the "
                                                           "mirror, or applied here) since the daemon started."),
    "splitmirror_replicated_writes": ("counter", ("pair",), "Host writes replicated since the daemon started."),
    "splitmirror_link_up": ("gauge", ("peer",), "1 while the peer answers its keepalive."),
    "splitmirror_link_rtt_seconds": ("gauge", ("peer",), "Round trip time of the last keepalive answered."),
    "splitmirror_backup_last_success_timestamp_seconds": ("gauge", ("pair",),
                                                          "When the newest backup of a remote pair was taken."),
    "splitmirror_group_backup_last_success_timestamp_seconds": ("gauge", ("group",),
                                                                "When the newest backup of a consistency group "
                                                                "was taken (at the primary)."),
    "splitmirror_generation_split_timestamp_seconds": ("gauge", ("generation", "pair"),
                                                       "When a backup generation was split (its backup time); "
                                                       "pair is the remote pair it backs up."),
    "splitmirror_backup_check_passed": ("gauge", ("generation", "pair"),
                                        "1 when the newest check of the backup a generation holds passed, 0 when "
                                        "it failed (backup check); absent when not checked."),
    "splitmirror_backup_check_failures": ("counter", (), "Backup checks that failed since the daemon started."),
    "splitmirror_host_io_seconds": ("histogram", ("volume", "op"), "Latency of host I/O (gRPC and NBD)."),
    "splitmirror_host_io_bytes": ("counter", ("volume", "op"), "Bytes of host I/O (gRPC and NBD)."),
    "splitmirror_host_io_errors": ("counter", ("volume", "op"), "Host I/O requests refused or failed."),
    "splitmirror_nbd_connections": ("gauge", ("export",), "NBD connections attached to each export."),
    "splitmirror_volume_fenced": ("gauge", ("volume",), "1 while host I/O on the volume is fenced (restore)."),
    "splitmirror_events": ("counter", (), "Events emitted since the daemon started."),
    "splitmirror_interconnect_calls": ("counter", ("peer", "method"),
                                       "Interconnect calls received from each peer since the daemon started, by "
                                       "method (a mass recovery's pair commands travel many to a PairCommands call)."),
    "splitmirror_copytable_commits": ("counter", (), "Transactions committed to the copy table since the daemon "
                                                     "started (changes saved at once share one)."),
    "splitmirror_copytable_syncs": ("counter", (), "Fsyncs of the copy table's write-ahead log since the daemon "
                                                   "started (callers at once share one)."),
    "splitmirror_event_sequence": ("gauge", (), "Sequence number of the newest event committed."),
}


class SystemCollector(Collector):
    """Everything a storage system shows Prometheus, read at scrape time."""

    def __init__(self, system: StorageSystem, links: Mapping[int, PeerLink], events: EventLog,
                 backups: BackupManager, meter: IoMeter | None = None,
                 nbd_connections: Callable[[], dict[str, int]] | None = None) -> None:
        self.system = system
        self.links = links
        self.events = events
        self.backups = backups
        self.meter = meter
        self.nbd_connections = nbd_connections

    def _family(self, name: str) -> Metric:
        kind, labels, text = METRICS[name]
        if kind == "counter":
            return CounterMetricFamily(name, text, labels=labels)
        if kind == "histogram":
            return HistogramMetricFamily(name, text, labels=labels)
        return GaugeMetricFamily(name, text, labels=labels)

    def describe(self) -> Iterator[Metric]:
        for name in METRICS:
            yield self._family(name)

    def collect(self) -> Iterator[Metric]:
        f: dict[str, Any] = {name: self._family(name) for name in METRICS}
        system = self.system
        now = time.time()
        f["splitmirror_info"].add_metric([str(system.system_id), system.role], 1)
        for name, pair in sorted(system.pairs.items()):
            self._pair(f, name, pair, now)
        for peer, link in sorted(self.links.items()):
            f["splitmirror_link_up"].add_metric([str(peer)], 1 if link.up else 0)
            if link.rtt is not None:
                f["splitmirror_link_rtt_seconds"].add_metric([str(peer)], link.rtt)
        for group, when in sorted(self.backups.group_backups.items()):
            stamp = timestamp_of(when)
            if stamp is not None:
                f["splitmirror_group_backup_last_success_timestamp_seconds"].add_metric([group], stamp)
        self._volumes(f)
        f["splitmirror_backup_check_failures"].add_metric([], self.backups.check_failures)
        f["splitmirror_events"].add_metric([], self.events.emitted)
        for (peer, method), calls in sorted(system.calls_received.items()):
            f["splitmirror_interconnect_calls"].add_metric([str(peer), method], calls)
        f["splitmirror_copytable_commits"].add_metric([], system.table.commits)
        f["splitmirror_copytable_syncs"].add_metric([], system.table.syncs)
        f["splitmirror_event_sequence"].add_metric([], self.events.committed)
        yield from f.values()

    def _pair(self, f: dict[str, Any], name: str, pair: Pair, now: float) -> None:
        row = pair.row
        peer = str(pair.peer_id) if pair.remote else "local"
        for status in PairStatus:
            f["splitmirror_pair_status"].add_metric([name, pair.role.value, peer, row.mode, status.value],
                                                    1 if pair.status is status else 0)
        since = self.events.status_since.get(name)
        if since is not None:
            f["splitmirror_pair_status_since_timestamp_seconds"].add_metric([name], since)
        tracks = sum(len(end.bitmap) for end in pair.ends)
        pending = sum(min(len(end.bitmap) * end.volume.track_size, end.volume.size) for end in pair.ends)
        f["splitmirror_pair_pending_tracks"].add_metric([name], tracks)
        f["splitmirror_pair_pending_bytes"].add_metric([name], pending)
        f["splitmirror_pair_split_brain"].add_metric([name], 1 if name in self.events.split_brain else 0)
        if pair.remote:
            f["splitmirror_pair_role_epoch"].add_metric([name], row.epoch)
            f["splitmirror_pair_fenced"].add_metric([name], 1 if row.role.fenced_by else 0)
        if pair.role is EndRole.PRIMARY:
            f["splitmirror_pair_lag_seconds"].add_metric([name], lag_seconds(pair, pending, since, now))
            f["splitmirror_pair_queue_bytes"].add_metric([name], pair.queued_bytes())
        f["splitmirror_resync_remaining_bytes"].add_metric([name], remaining_bytes(pair, pending))
        c = pair.counters
        f["splitmirror_resync_bytes"].add_metric([name], c.resync_bytes_sent + c.resync_bytes_received)
        f["splitmirror_replicated_bytes"].add_metric([name], c.replicated_bytes)
        f["splitmirror_replicated_writes"].add_metric([name], c.replicated_writes)
        if pair.remote and row.backup_time:
            stamp = timestamp_of(row.backup_time)
            if stamp is not None:
                f["splitmirror_backup_last_success_timestamp_seconds"].add_metric([name], stamp)
        if not pair.remote and pair.primary is not None and row.backup_time:
            into = self.system.pair_into(pair.primary.volume)
            stamp = timestamp_of(row.backup_time)
            if into is not None and into.remote and stamp is not None:
                f["splitmirror_generation_split_timestamp_seconds"].add_metric([name, into.name], stamp)
            verdict = self.backups.check_fields(pair).get("check_verdict")
            if into is not None and verdict:
                f["splitmirror_backup_check_passed"].add_metric([name, into.name], 1 if verdict == "passed" else 0)

    def _volumes(self, f: dict[str, Any]) -> None:
        system = self.system
        connections = self.nbd_connections() if self.nbd_connections is not None else None
        for name in sorted(system.volumes):
            f["splitmirror_volume_fenced"].add_metric([name], 1 if name in system.fences else 0)
            if connections is not None:
                f["splitmirror_nbd_connections"].add_metric([name], connections.get(name, 0))
        if self.meter is None:
            return
        self.meter.forget(set(system.volumes))
        histogram = f["splitmirror_host_io_seconds"]
        assert isinstance(histogram, HistogramMetricFamily)
        for volume, op, series in self.meter.series():
            histogram.add_metric([volume, op], series.cumulative(), series.sum)
            f["splitmirror_host_io_bytes"].add_metric([volume, op], series.bytes)
            f["splitmirror_host_io_errors"].add_metric([volume, op], series.errors)


def lag_seconds(pair: Pair, pending_bytes: int, status_since: float | None, now: float) -> float:
    """The pair's RPO as seen at its primary end.

    Mirroring: an async pair's oldest unacknowledged write (a sync pair
    acknowledges nothing the mirror has not applied: 0).  SUSPENDED with
    tracks pending: the time since the pair was suspended, since when host
    writes reach only this end (0 when the time is unknown).  SPLIT is on
    request and shows no lag; its age is the split time.
    """
    if pair.status in MIRRORING:
        return pair.lag_seconds() if pair.row.mode == "async" else 0.0
    if pair.status is PairStatus.SUSPENDED and pending_bytes and status_since is not None:
        return max(0.0, now - status_since)
    return 0.0


def remaining_bytes(pair: Pair, pending_bytes: int) -> int:
    if pair.status is not PairStatus.COPY:
        return 0
    progress = pair.progress
    if progress is not None:
        return max(0, progress.total_tracks - progress.done_tracks) * progress.track_size
    return pending_bytes
