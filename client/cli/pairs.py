"""``splitmirror pair create|display|split|resync|delete|set-mode`` and ``verify``."""

from __future__ import annotations

import argparse

from ..library import Client
from . import roles
from .output import Output, WaitReporter, watch_activity

__all__ = ["pair", "verify"]


async def _wait_and_show(client: Client, out: Output, name: str, timeout: float | None) -> None:
    with WaitReporter(out, f"pair {name}") as reporter:
        await client.wait_pair(name, {"DUPLEX"}, timeout=timeout, on_progress=reporter)
    out.pairs(await client.display_pairs(name))


async def pair(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "create":
        rows = await client.create_pair(args.name, args.pvol, args.svol, peer=args.peer, mode=args.mode,
                                        group=args.group)
        if args.wait:
            await _wait_and_show(client, out, args.name, args.timeout)
        else:
            out.pairs(rows)
    elif args.action == "display":
        reply = await client.display(args.name)
        out.pairs(reply.rows, reply.groups)
    elif args.action == "split":
        out.pairs(await client.split_pair(args.name))
    elif args.action == "resync":
        rows = await client.resync_pair(args.name, reverse=args.reverse, force=args.force)
        if args.wait:
            await _wait_and_show(client, out, args.name, args.timeout)
        else:
            out.pairs(rows)
    elif args.action in roles.ACTIONS:
        await roles.role_change(client, args, out)
    elif args.action == "set-mode":
        out.pairs(await client.set_pair_mode(args.name, args.mode))
    elif args.action == "delete":
        await client.delete_pair(args.name)
        if out.as_json:
            out.json({"pair": args.name, "deleted": True})
        else:
            out.text(f"pair {args.name} deleted")


async def verify(client: Client, args: argparse.Namespace, out: Output) -> None:
    reply = await watch_activity(client, args.name, "verify", out, client.verify_pair(args.name, repair=args.repair))
    if out.as_json:
        out.json({"pair": reply.pair, "tracks_checked": int(reply.tracks_checked),
                  "mismatches": [int(t) for t in reply.mismatches], "repaired": bool(reply.repaired),
                  "algorithm": reply.algorithm})
        return
    out.text(f"pair {reply.pair}: {reply.tracks_checked} tracks checked ({reply.algorithm}), "
             f"{len(reply.mismatches)} mismatching")
    if reply.mismatches:
        shown = ", ".join(str(t) for t in reply.mismatches[:20])
        more = f" and {len(reply.mismatches) - 20} more" if len(reply.mismatches) > 20 else ""
        out.text(f"mismatching tracks: {shown}{more}")
        out.text("marked pending; resync started" if reply.repaired else "run with --repair to resync them")
