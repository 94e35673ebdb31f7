"""``splitmirror events [--follow] [--since SEQ]``: the event stream, one event per line."""

from __future__ import annotations

import argparse
import json

from ..library import Client
from ..render import event_json, event_line
from .output import Output

__all__ = ["events"]


async def events(client: Client, args: argparse.Namespace, out: Output) -> None:
    """Print the events after ``--since`` (default: all kept), then, with
    ``--follow``, each new one as it happens until interrupted.  With
    ``--json`` each event is one JSON object on its own line."""
    async for event in client.events(since=args.since, follow=args.follow):
        line = json.dumps(event_json(event), separators=(",", ":")) if out.as_json else event_line(event)
        out.stdout.write(line + "\n")
        out.stdout.flush()
