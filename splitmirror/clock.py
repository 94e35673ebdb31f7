"""Wall-clock times as the copy table and the host API show them."""

from __future__ import annotations

import datetime
import time


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_time(timestamp: float) -> str:
    """Seconds since the epoch as the copy table writes times."""
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def timestamp_of(iso: str) -> float | None:
    """Seconds since the epoch of a time written by :func:`utc_now`, or None."""
    try:
        then = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.UTC)
    return then.timestamp()


def seconds_since(iso: str) -> float:
    """Age of a time written by :func:`utc_now` (0 when it does not parse)."""
    then = timestamp_of(iso)
    return 0.0 if then is None else max(0.0, time.time() - then)
