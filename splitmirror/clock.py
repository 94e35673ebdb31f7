"""Wall-clock times as the copy table and the host API show them."""

from __future__ import annotations

import datetime


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
