"""``splitmirror stats``: replication and interconnect counters."""

from __future__ import annotations

import argparse

from ..library import Client
from ..render import stats_json, stats_tables
from .output import Output

__all__ = ["stats"]


async def stats(client: Client, args: argparse.Namespace, out: Output) -> None:
    stats = await client.stats()
    if out.as_json:
        out.json(stats_json(stats))
    else:
        for table in stats_tables(stats):
            out.show(table)
