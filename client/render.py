"""How the CLI shows host API objects: JSON-ready dicts and rich tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.table import Table

from splitmirror.v1 import host_pb2

JsonObject = dict[str, Any]

#: The keys of one ``pair display --json`` object, in order.
PAIR_KEYS = (
    "pair", "volume", "copy_type", "pair_system_id", "mirror_volume", "primary", "status", "mode",
    "group", "pending_tracks", "progress", "split_time", "status_since",
)


def pair_row_json(row: host_pb2.PairRow) -> JsonObject:
    """One copy-table row with exactly the documented keys.

    Async rows (primary end) add ``queue_bytes`` and ``lag_seconds``; rows
    in COPY add ``rate_bytes_per_s`` and ``eta_seconds``; remote pairs that
    were backed up add ``backup_time`` and ``backup_age_seconds``.
    """
    obj: JsonObject = {
        "pair": row.pair,
        "volume": row.volume,
        "copy_type": row.copy_type,
        "pair_system_id": int(row.pair_system_id),
        "mirror_volume": row.mirror_volume,
        "primary": bool(row.primary),
        "status": row.status,
        "mode": row.mode,
        "group": row.group,
        "pending_tracks": int(row.pending_tracks),
        "progress": float(row.progress) if row.has_progress else None,
        "split_time": row.split_time or None,
        "status_since": row.status_since or None,
    }
    if row.primary and row.mode == "async":
        obj["queue_bytes"] = int(row.queue_bytes)
        obj["lag_seconds"] = round(float(row.lag_seconds), 3)
    if row.has_progress:
        obj["rate_bytes_per_s"] = float(row.rate_bytes_per_s)
        obj["eta_seconds"] = float(row.eta_seconds)
    if row.activity:
        obj["activity"] = row.activity
    if row.backup_time:  # remote pairs that were backed up
        obj["backup_time"] = row.backup_time
        obj["backup_age_seconds"] = round(float(row.backup_age_seconds), 1)
    if row.epoch > 1 or row.role_change or row.fenced_by:  # a remote pair whose roles changed (issue 18)
        obj.update(epoch=int(row.epoch), role_change=row.role_change or None, role_since=row.role_since or None,
                   role_seq=int(row.role_seq), fenced_by=int(row.fenced_by) or None,
                   divergent_volume=row.divergent_volume or None)
    return obj


def role_text(r: host_pb2.PairRow) -> str:
    """The ROLE cell: how this end got its role, since when, and the epoch."""
    if r.fenced_by:
        text = f"fenced: system {r.fenced_by} is primary"
    elif r.role_change == "takeover":
        text = f"taken over {r.role_since}, last seq {r.role_seq}"
    elif r.role_change:
        text = f"{r.role_change} {r.role_since}"
    else:
        text = "-"
    if r.divergent_volume:
        text += f"; divergent tracks kept in {r.divergent_volume}"
    return f"{text} (epoch {r.epoch})" if r.epoch else text


def group_backup_json(g: host_pb2.GroupBackup) -> JsonObject:
    """A consistency group's newest backup, as ``pair display --json`` lists it after the rows."""
    return {"group": g.group, "backup_time": g.backup_time, "backup_age_seconds": round(float(g.backup_age_seconds), 1)}


def progress_json(row: host_pb2.PairRow) -> JsonObject:
    """One ``--wait --json`` progress line."""
    obj: JsonObject = {
        "pair": row.pair,
        "progress": float(row.progress) if row.has_progress else None,
        "rate_bytes_per_s": float(row.rate_bytes_per_s),
        "eta_seconds": float(row.eta_seconds),
    }
    if row.activity:
        obj["activity"] = row.activity
    return obj


def volume_json(vol: host_pb2.Volume) -> JsonObject:
    return {
        "name": vol.name,
        "size": int(vol.size),
        "track_size": int(vol.track_size),
        "tracks": int(vol.tracks),
        "allocated_bytes": int(vol.allocated_bytes),
        "role": vol.role,
        "host_writable": bool(vol.host_writable),
        "fence_reason": vol.fence_reason,
    }


def stats_json(stats: host_pb2.Stats) -> JsonObject:
    return {
        "system_id": int(stats.system_id),
        "role": stats.role,
        "interconnect_bytes_sent": int(stats.interconnect_bytes_sent),
        "interconnect_bytes_received": int(stats.interconnect_bytes_received),
        "nbd_port": int(stats.nbd_port) or None,
        "pairs": [
            {
                "pair": p.pair,
                "replicated_writes": int(p.replicated_writes),
                "replicated_bytes": int(p.replicated_bytes),
                "resync_tracks_sent": int(p.resync_tracks_sent),
                "resync_bytes_sent": int(p.resync_bytes_sent),
                "resync_tracks_received": int(p.resync_tracks_received),
                "resync_bytes_received": int(p.resync_bytes_received),
                **({"lag_seconds": round(float(p.lag_seconds), 3), "lag_bytes": int(p.lag_bytes)}
                   if p.primary and p.mode == "async" else {}),
            }
            for p in stats.pairs
        ],
    }


# ---------------------------------------------------------------------- text

_BINARY_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")


def size_text(n: int | float) -> str:
    """A size in binary units, one decimal: ``512 B``, ``8.0 KiB``, ``1.0 GiB``
    (the one form every size of the CLI is shown in)."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for suffix in _BINARY_UNITS:
        value /= 1024
        if value < 1023.95 or suffix == _BINARY_UNITS[-1]:
            return f"{value:.1f} {suffix}"
    raise AssertionError("unreachable")


def percent_text(part: float, whole: float = 100.0) -> str:
    """``part`` of ``whole`` as a percentage that is never rounded to 0% or
    up to 100%: ``0.0%`` only for nothing, ``100.0%`` only for all of it."""
    if whole <= 0:
        return "-"
    pct = 100.0 * part / whole
    if pct <= 0:
        return "0.0%"
    if pct >= 100:
        return "100.0%"
    if pct < 0.1:  # two significant digits, never an exponent
        return f"{pct:.{1 - math.floor(math.log10(pct))}f}%"
    return f"{int(pct * 10) / 10:.1f}%"  # truncated: 99.96% of a copy is not 100.0%



def format_rate(bytes_per_s: float) -> str:
    """``12.5 MiB/s``."""
    return f"{size_text(max(0.0, bytes_per_s))}/s"


def format_age(seconds: float) -> str:
    """``42s``, ``5m12s``, ``3h05m``, ``2d04h``."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    if total < 86400:
        return f"{total // 3600}h{total % 3600 // 60:02d}m"
    return f"{total // 86400}d{total % 86400 // 3600:02d}h"


def format_eta(seconds: float) -> str:
    """``0:01:05``; ``-`` when unknown."""
    if seconds <= 0 or seconds != seconds or seconds == float("inf"):
        return "-"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _table(*columns: str, right: Sequence[str] = ()) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left", no_wrap=True)
    return table


def _bytes(n: int) -> str:
    """The size, and the exact count where the unit rounds it."""
    return size_text(n) if n < 1024 else f"{size_text(n)} ({n} bytes)"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def volumes_table(volumes: Sequence[host_pb2.Volume]) -> Table:
    table = _table(
        "NAME", "SIZE", "TRACK", "TRACKS", "ALLOCATED", "ROLE", "WRITABLE", "FENCE",
        right=("SIZE", "TRACK", "TRACKS", "ALLOCATED"),
    )
    for v in volumes:
        table.add_row(
            v.name, size_text(v.size), size_text(v.track_size), str(v.tracks),
            size_text(v.allocated_bytes), v.role or "SIMPLEX", _yes(v.host_writable), v.fence_reason or "-",
        )
    return table


def volume_detail_table(vol: host_pb2.Volume) -> Table:
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value")
    table.add_row("name", vol.name)
    table.add_row("size", _bytes(vol.size))
    table.add_row("track size", size_text(vol.track_size))
    table.add_row("tracks", str(vol.tracks))
    table.add_row("allocated", _bytes(vol.allocated_bytes))
    table.add_row("role", vol.role or "SIMPLEX")
    table.add_row("host writable", _yes(vol.host_writable))
    table.add_row("fence", vol.fence_reason or "-")
    return table


def _since(row: host_pb2.PairRow) -> str:
    """When the pair entered its status: ``10:33:46 (12s ago)`` (UTC)."""
    if not row.status_since:
        return "-"
    clock = row.status_since.partition("T")[2][:8] or row.status_since
    return f"{clock} ({format_age(row.status_age_seconds)} ago)"


def pairs_table(rows: Sequence[host_pb2.PairRow]) -> Table:
    with_reason = any(r.reason for r in rows)
    with_queue = any(r.primary and r.mode == "async" for r in rows)
    with_backup = any(r.backup_time for r in rows)
    with_role = any(r.epoch > 1 or r.role_change or r.fenced_by for r in rows)
    columns = [
        "PAIR", "VOLUME", "TYPE", "PEER", "MIRROR", "P/S", "STATUS", "MODE", "GROUP", "PENDING",
        "PROGRESS", "SPLIT TIME",
    ]
    columns.insert(7, "SINCE")
    if with_queue:
        columns += ["QUEUE", "LAG"]
    if with_backup:
        columns.append("NEWEST BACKUP")
    if with_role:
        columns.append("ROLE")
    if with_reason:
        columns.append("REASON")
    table = _table(*columns, right=("PEER", "SINCE", "PENDING", "PROGRESS", "QUEUE", "LAG", "NEWEST BACKUP"))
    for r in rows:
        cells = [
            r.pair, r.volume, r.copy_type, str(r.pair_system_id), r.mirror_volume, "P" if r.primary else "S",
            r.status, _since(r), r.mode, r.group or "-", str(r.pending_tracks),
            percent_text(r.progress) if r.has_progress else "-", r.split_time or "-",
        ]
        if r.has_progress:
            cells[11] += f" {format_rate(r.rate_bytes_per_s)} ETA {format_eta(r.eta_seconds)}"
            if r.activity:
                cells[11] = f"{r.activity} {cells[11]}"
        if with_queue:
            is_async = r.primary and r.mode == "async"
            cells += [_bytes(r.queue_bytes) if is_async else "-", f"{r.lag_seconds:.2f}s" if is_async else "-"]
        if with_backup:
            cells.append(f"{format_age(r.backup_age_seconds)} ago" if r.backup_time else "-")
        if with_role:
            cells.append(role_text(r))
        if with_reason:
            cells.append(r.reason or "-")
        table.add_row(*cells)
    return table


def stats_tables(stats: host_pb2.Stats) -> list[Table]:
    summary = Table(box=None, show_header=False, pad_edge=False)
    summary.add_column("field", style="bold", no_wrap=True)
    summary.add_column("value")
    summary.add_row("system id", str(stats.system_id))
    summary.add_row("role", stats.role or "-")
    summary.add_row("interconnect sent", _bytes(stats.interconnect_bytes_sent))
    summary.add_row("interconnect received", _bytes(stats.interconnect_bytes_received))
    tables = [summary]
    if stats.pairs:
        pairs = _table(
            "PAIR", "REPL WRITES", "REPL BYTES", "TRACKS SENT", "BYTES SENT", "TRACKS RECV", "BYTES RECV",
            right=("REPL WRITES", "REPL BYTES", "TRACKS SENT", "BYTES SENT", "TRACKS RECV", "BYTES RECV"),
        )
        for p in stats.pairs:
            pairs.add_row(
                p.pair, str(p.replicated_writes), size_text(p.replicated_bytes),
                str(p.resync_tracks_sent), size_text(p.resync_bytes_sent),
                str(p.resync_tracks_received), size_text(p.resync_bytes_received),
            )
        tables.append(pairs)
    return tables


def backup_json(b: host_pb2.BackupResult) -> JsonObject:
    return {"pair": b.pair, "generation": b.generation, "svol": b.svol, "backup_time": b.backup_time,
            "resynced_tracks": int(b.resynced_tracks), "state": b.state, "sequence": int(b.sequence)}


def generation_json(g: host_pb2.Generation) -> JsonObject:
    return {"remote_pair": g.remote_pair, "local_pair": g.local_pair, "svol": g.svol, "status": g.status,
            "backup_time": g.backup_time or None, "changed_tracks": int(g.changed_tracks),
            "sequence": int(g.sequence),
            "check": {"verdict": g.check_verdict, "time": g.check_time, "seconds": g.check_seconds,
                      "reason": g.check_reason} if g.check_verdict else None,
            # Reads refused since the daemon started: a track that no longer matched the receipt.
            "read_refusals": int(g.read_refusals), "read_refusal": g.read_refusal or None}


def generations_table(gens: Sequence[host_pb2.Generation], with_pair: bool = False) -> Table:
    """The generations (``with_pair``: of several remote pairs, each row naming its pair)."""
    table = _table(*(("PAIR",) if with_pair else ()), "GENERATION", "SVOL", "STATUS", "BACKUP TIME", "#",
                   "CHANGED SINCE", "LAST CHECK", right=("#", "CHANGED SINCE"))
    for g in gens:
        check = "-"
        if g.check_verdict:
            check = f"{g.check_verdict} {g.check_time} ({g.check_seconds:.1f}s)"
            if g.check_reason:
                check += f": {g.check_reason}"
        table.add_row(*((g.remote_pair,) if with_pair else ()), g.local_pair, g.svol, g.status, g.backup_time or "-",
                      str(g.sequence) if g.sequence else "-",
                      f"{g.changed_tracks} tracks" if g.backup_time else "-", check)
    return table


def check_json(c: host_pb2.BackupCheck) -> JsonObject:
    return {"generation": c.generation, "remote_pair": c.remote_pair, "backup_time": c.backup_time,
            "sequence": int(c.sequence), "verdict": c.verdict, "checked_at": c.checked_at, "seconds": c.seconds,
            "reason": c.reason, "svol_digest": c.svol_digest, "output": c.output}


#: The keys of one schedule object (``backup schedule list --json``, ``backups --json``).
SCHEDULE_KEYS = ("name", "pair", "group", "every_seconds", "at", "ring", "check", "probe", "pre_hook", "post_hook",
                 "hook_timeout_seconds", "next_run", "last_run", "last_result", "last_error", "last_generations",
                 "runs", "last_check")


def schedule_json(s: host_pb2.Schedule) -> JsonObject:
    obj: JsonObject = {key: getattr(s, key) for key in SCHEDULE_KEYS}
    obj["ring"] = list(s.ring)
    obj["runs"] = int(s.runs)
    return obj


def schedules_table(schedules: Sequence[host_pb2.Schedule]) -> Table:
    table = _table("SCHEDULE", "TARGET", "EVERY", "RING", "NEXT RUN", "LAST RUN", "LAST RESULT", "CHECK",
                   right=("EVERY",))
    for s in schedules:
        every = f"{s.every_seconds:g}s" + (f" at {s.at}" if s.at else "")
        result = s.last_result or "-"
        if s.last_error:
            result += f": {s.last_error}"
        check = (s.last_check or "pending") if s.check else "-"
        table.add_row(s.name, f"group {s.group}" if s.group else s.pair, every, ",".join(s.ring) or "all",
                      s.next_run, s.last_run or "-", result, check)
    return table


# ---------------------------------------------------------------------- events

#: The keys of one ``events --json`` object, in order (empty fields are left out).
EVENT_KEYS = ("seq", "time", "timestamp", "kind", "pair", "volume", "peer", "generation", "op", "old_status",
              "status", "reason", "tracks", "bytes", "progress", "detail")


def event_json(e: host_pb2.Event) -> JsonObject:
    obj: JsonObject = {"seq": int(e.seq), "time": e.time, "timestamp": float(e.timestamp), "kind": e.kind}
    for key in EVENT_KEYS[4:]:
        value = getattr(e, key)
        if value:
            obj[key] = value if not isinstance(value, int) else int(value)
    return obj


def _quoted(value: str) -> str:
    return value if value and not any(c.isspace() or c == '"' for c in value) else '"' + value.replace('"', "'") + '"'


def event_line(e: host_pb2.Event) -> str:
    """One event on one line, like ``drbdsetup events2``:
    ``SEQ TIME KIND key:value ...`` (a status change as ``OLD->NEW``)."""
    parts = [str(e.seq), e.time, e.kind]
    for key in ("pair", "volume", "peer", "generation", "op"):
        value = getattr(e, key)
        if value:
            parts.append(f"{key}:{_quoted(str(value))}")
    if e.status:
        parts.append(f"{e.old_status}->{e.status}" if e.old_status else f"status:{e.status}")
    if e.reason:
        parts.append(f"reason:{_quoted(e.reason)}")
    if e.tracks:
        parts.append(f"tracks:{e.tracks}")
    if e.bytes:
        parts.append(f"bytes:{size_text(e.bytes)}")
    if e.kind.startswith("resync-") and e.kind != "resync-start":
        parts.append(f"progress:{percent_text(e.progress)}")
    if e.detail:
        parts.append(f"detail:{_quoted(e.detail)}")
    return " ".join(parts)
