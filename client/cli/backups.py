"""``splitmirror backup`` (issued at the primary) and ``backups`` (the generations of a pair)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable

from splitmirror.errors import SplitmirrorError
from splitmirror.v1 import host_pb2

from ..library import Client, ClientError
from ..render import backup_json, check_json, generation_json, generations_table, schedule_json, schedules_table
from .output import Output, WaitReporter, progress_interval, watch_activity

__all__ = ["backup", "backups", "check", "schedule", "verify"]



async def backup(client: Client, args: argparse.Namespace, out: Output) -> None:
    if not args.name and not args.group:
        raise SplitmirrorError("backup: name a remote pair or give --group")
    work = client.backup(args.name, group=args.group, generation=args.generation, wait=args.wait)
    reply = await _watch_backup(client, args.name, out, work) if args.name else await work
    if out.as_json:
        out.json({"latency_seconds": reply.latency_seconds, "prepare_seconds": reply.prepare_seconds,
                  "backups": [backup_json(b) for b in reply.backups], "warning": reply.warning})
        return
    for b in reply.backups:
        out.text(f"pair {b.pair}: backup {b.state} in generation {b.generation} (SVOL {b.svol}) at {b.backup_time}"
                 f"{f', #{b.sequence}' if b.sequence else ''}; {b.resynced_tracks} tracks resynced first")
    out.text(f"latency {reply.latency_seconds * 1000:.0f} ms (bringing generations in sync: "
             f"{reply.prepare_seconds * 1000:.0f} ms)")
    if reply.warning:
        out.text(f"warning: {reply.warning}")


#: Seconds between looks at the generation a backup brings up to date (at most).
BACKUP_POLL = 0.5


async def _watch_backup(client: Client, name: str, out: Output, work: Awaitable[host_pb2.BackupReply],
                        ) -> host_pb2.BackupReply:
    """Run the backup while showing how far its generation's resync at the secondary is
    (the generation's tracks still to copy, as the primary relays them)."""
    task = asyncio.ensure_future(work)
    track_size = 0
    first_seen: dict[str, tuple[int, float]] = {}
    with WaitReporter(out, f"backup {name}") as reporter:
        while not task.done():
            await asyncio.wait({task}, timeout=min(BACKUP_POLL, progress_interval() or BACKUP_POLL))
            if task.done():
                break
            with contextlib.suppress(ClientError):  # progress is a courtesy: the backup's answer decides
                if not track_size:
                    rows = [r for r in await client.display_pairs(name) if r.primary]
                    track_size = (await client.get_volume(rows[0].volume)).track_size if rows else 0
                for gen in await client.list_backups(name):
                    if gen.status == "COPY" and track_size:
                        reporter(_generation_row(gen, track_size, first_seen))
    return task.result()


def _generation_row(gen: host_pb2.Generation, track_size: int,
                    first_seen: dict[str, tuple[int, float]]) -> host_pb2.PairRow:
    now = time.monotonic()
    left = int(gen.changed_tracks)
    first_left, since = first_seen.setdefault(gen.local_pair, (left, now))
    done = max(0, first_left - left)
    rate = done * track_size / (now - since) if now > since else 0.0
    return host_pb2.PairRow(pair=gen.local_pair, status="COPY", activity="backup", has_progress=True,
                            progress=100.0 * done / first_left if first_left else 0.0, rate_bytes_per_s=rate,
                            eta_seconds=left * track_size / rate if rate > 0 else 0.0)


async def backups(client: Client, args: argparse.Namespace, out: Output) -> None:
    if bool(args.name) == bool(args.group):
        raise SplitmirrorError("backups: name a remote pair or give --group, not both")
    listing = await (client.group_backup_listing(args.group) if args.group else client.backup_listing(args.name))
    gens = list(listing.generations)
    if out.as_json:
        # A list of generations; schedules (at the primary) in their own command's JSON.
        out.json([generation_json(g) for g in gens])
        return
    out.show(generations_table(gens, with_pair=bool(args.group)))
    if listing.schedules:
        out.text("")
        out.show(schedules_table(listing.schedules))


async def schedule(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``backup schedule set|list|delete``."""
    if args.action == "set":
        if not args.name and not args.group:
            raise SplitmirrorError("backup schedule set: name a remote pair or give --group")
        ring = [g.strip() for g in args.generations.split(",") if g.strip()]
        sched = await client.set_schedule(host_pb2.Schedule(
            name=args.schedule, pair=args.name, group=args.group, every_seconds=args.every, at=args.at, ring=ring,
            check=args.check, probe=args.probe, pre_hook=args.pre_backup_hook, post_hook=args.post_backup_hook,
            hook_timeout_seconds=args.hook_timeout))
        if out.as_json:
            out.json(schedule_json(sched))
        else:
            out.text(f"schedule {sched.name}: backup of {f'group {sched.group}' if sched.group else sched.pair} "
                     f"every {sched.every_seconds:g}s into {', '.join(sched.ring) or 'every generation'}; "
                     f"next run at {sched.next_run}")
        return
    if args.action == "list":
        found = await client.list_schedules(args.name, args.group)
    else:
        if not args.name and not args.group:
            raise SplitmirrorError("backup schedule delete: name a schedule or a remote pair, or give --group")
        found = await client.delete_schedule(args.name, args.group)
    if out.as_json:
        out.json([schedule_json(s) for s in found])
    elif args.action == "delete":
        for s in found:
            out.text(f"schedule {s.name} deleted")
    else:
        out.show(schedules_table(found))


async def check(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``backup check GENERATION``: a failed verdict exits with status 1."""
    report = await watch_activity(client, args.generation, "check", out,
                                 client.check_backup(args.generation, args.probe, args.probe_timeout))
    if out.as_json:
        out.json(check_json(report))
    else:
        for line in report.output.splitlines()[-12:]:
            out.text(f"  | {line}")
        out.text(f"generation {report.generation} (backup #{report.sequence} of pair {report.remote_pair} at "
                 f"{report.backup_time}): {report.verdict} in {report.seconds:.1f}s; SVOL unchanged "
                 f"(xxh3-128 {report.svol_digest})")
    if report.verdict != "passed":
        raise SplitmirrorError(f"generation {report.generation} failed its check: {report.reason}")


async def verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    """``backup verify GENERATION``: a mismatch exits with status 1."""
    r = await watch_activity(client, args.generation, "verify", out, client.verify_backup(args.generation))
    if out.as_json:
        out.json({"generation": r.generation, "svol": r.svol, "sequence": int(r.sequence),
                  "backup_time": r.backup_time, "root": r.root, "root_ok": r.root_ok, "signature": r.signature,
                  "signer": r.signer, "track_size": int(r.track_size), "tracks_checked": int(r.tracks_checked),
                  "mismatched": int(r.mismatched), "tracks": [int(t) for t in r.tracks], "seconds": r.seconds,
                  "receipt_time": r.receipt_time, "receipt_changed_tracks": int(r.receipt_changed_tracks),
                  "ok": r.ok})
    else:
        out.text(f"generation {r.generation} (SVOL {r.svol}, backup #{r.sequence} at {r.backup_time}): receipt "
                 f"{r.root} of {r.receipt_time}, signature {r.signature}{f' ({r.signer})' if r.signer else ''}")
        out.text(f"{r.tracks_checked} tracks re-read in {r.seconds:.1f}s: {r.mismatched} differ"
                 + (f" (tracks {', '.join(str(t) for t in r.tracks[:20])}"
                    f"{', ...' if r.mismatched > 20 else ''}; bytes at track x {r.track_size})" if r.mismatched
                    else ""))
    if not r.ok:
        raise SplitmirrorError(f"generation {r.generation} fails verification: {r.mismatched} track(s) no longer "
                               f"match its receipt{'' if r.root_ok else '; the receipt is damaged'}"
                               f"{'; its signature is invalid' if r.signature == 'invalid' else ''}")
