"""``HOST:PORT`` settings (listen, interconnect, peers, NBD)."""

from __future__ import annotations

import ipaddress

from .errors import InvalidArgument


def parse_address(setting: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdecimal() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"{setting}: {value!r} is not HOST:PORT")
    return value


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` names this host only (127.0.0.0/8, ::1, localhost)."""
    host = address.rpartition(":")[0].strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything
