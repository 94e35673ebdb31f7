"""``splitmirror pair takeover`` and ``swap``: disaster recovery commands."""

from __future__ import annotations

import argparse

from ..library import Client
from .output import Output

__all__ = ["ACTIONS", "role_change"]

ACTIONS = ("takeover", "swap")


async def role_change(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "swap":
        rows = await client.swap_pair(args.name, args.group)
        out.pairs(rows)
        if not out.as_json:
            for r in rows:
                where = "here" if r.primary else f"at system {r.pair_system_id}"
                out.text(f"pair {r.pair}: swapped at epoch {r.epoch}; the primary is {where} now; no data copied")
        return
    rows = await client.takeover_pair(args.name, args.group, force=args.force)
    out.pairs(rows)
    if not out.as_json:
        for r in rows:
            out.text(f"pair {r.pair}: system now primary at epoch {r.epoch}; volume {r.volume} is host-writable "
                     f"(gRPC and NBD); writes are tracked; when the old primary returns it is fenced, and "
                     f"'splitmirror pair resync {r.pair}' here copies back only the changed tracks")
