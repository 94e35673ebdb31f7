"""``splitmirror volume create|list|show|delete``."""

from __future__ import annotations

import argparse

from ..library import Client
from ..render import size_text, volume_detail_table, volume_json, volumes_table
from .output import Output

__all__ = ["volume"]


async def volume(client: Client, args: argparse.Namespace, out: Output) -> None:
    if args.action == "create":
        vol = await client.create_volume(args.name, args.size, args.track_size)
        if out.as_json:
            out.json(volume_json(vol))
        else:
            out.text(f"volume {vol.name} created: {size_text(vol.size)}, "
                     f"tracks of {size_text(vol.track_size)}")
    elif args.action == "list":
        volumes = await client.list_volumes()
        if out.as_json:
            out.json([volume_json(v) for v in volumes])
        elif volumes:
            out.show(volumes_table(volumes))
        else:
            out.text("no volumes")
    elif args.action == "show":
        vol = await client.get_volume(args.name)
        if out.as_json:
            out.json(volume_json(vol))
        else:
            out.show(volume_detail_table(vol))
    elif args.action == "delete":
        await client.delete_volume(args.name)
        if out.as_json:
            out.json({"volume": args.name, "deleted": True})
        else:
            out.text(f"volume {args.name} deleted")
