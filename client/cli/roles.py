"""``splitmirror pair takeover`` (and later ``swap``): disaster recovery commands."""

from __future__ import annotations

import argparse

from ..library import Client
from .output import Output

__all__ = ["ACTIONS", "role_change"]

ACTIONS = ("takeover",)


async def role_change(client: Client, args: argparse.Namespace, out: Output) -> None:
    rows = await client.takeover_pair(args.name, args.group, force=args.force)
    out.pairs(rows)
    if not out.as_json:
        for r in rows:
            out.text(f"pair {r.pair}: system now primary at epoch {r.epoch}; volume {r.volume} is host-writable "
                     f"(gRPC and NBD); writes are tracked; when the old primary returns it is fenced, and "
                     f"'splitmirror pair resync {r.pair}' here copies back only the changed tracks")
