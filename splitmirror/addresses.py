"""``HOST:PORT`` settings (listen, interconnect, peers, NBD)."""

from __future__ import annotations

from .errors import InvalidArgument


def parse_address(setting: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdecimal() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"{setting}: {value!r} is not HOST:PORT")
    return value
