"""Names a user gives to volumes and pairs: one rule for both."""

from __future__ import annotations

import re

from .errors import InvalidArgument

#: Matched whole (``fullmatch``): ``$`` would let a trailing newline through.
VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(kind: str, name: str) -> None:
    if not VOLUME_NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', not starting with a symbol")
