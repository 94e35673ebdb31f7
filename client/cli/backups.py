"""``splitmirror backup`` (issued at the primary) and ``backups`` (the generations of a pair)."""

from __future__ import annotations

import argparse

from splitmirror.errors import SplitmirrorError

from ..library import Client
from ..render import backup_json, generation_json, generations_table
from .output import Output

__all__ = ["backup", "backups"]


async def backup(client: Client, args: argparse.Namespace, out: Output) -> None:
    if not args.name and not args.group:
        raise SplitmirrorError("backup: name a remote pair or give --group")
    reply = await client.backup(args.name, group=args.group, generation=args.generation, wait=args.wait)
    if out.as_json:
        out.json({"latency_seconds": reply.latency_seconds, "prepare_seconds": reply.prepare_seconds,
                  "backups": [backup_json(b) for b in reply.backups]})
        return
    for b in reply.backups:
        out.text(f"pair {b.pair}: backup {b.state} in generation {b.generation} (SVOL {b.svol}) at {b.backup_time}"
                 f"{f', #{b.sequence}' if b.sequence else ''}; {b.resynced_tracks} tracks resynced first")
    out.text(f"latency {reply.latency_seconds * 1000:.0f} ms (bringing generations in sync: "
             f"{reply.prepare_seconds * 1000:.0f} ms)")


async def backups(client: Client, args: argparse.Namespace, out: Output) -> None:
    gens = await client.list_backups(args.name)
    if out.as_json:
        out.json([generation_json(g) for g in gens])
    else:
        out.show(generations_table(gens))
