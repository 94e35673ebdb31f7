"""Binary size strings: ``64K``, ``1M`` (1 MiB), ``16G``, ``1T``, plain bytes."""

from __future__ import annotations

from .errors import InvalidArgument

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Parse a size; ``KiB``/``KB``/``K`` all mean 1024 bytes."""
    raw = text.strip().upper().replace("IB", "").removesuffix("B")
    digits = raw.rstrip("KMGTP")
    unit = raw[len(digits):]
    if not digits.isdecimal() or unit not in _UNITS:
        raise InvalidArgument(f"invalid size {text!r}: use a number with an optional K/M/G/T suffix")
    return int(digits) * _UNITS[unit]


def format_size(n: int) -> str:
    """Shortest exact binary form when there is one (``8K``), else ``1.5 GiB``."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    for suffix, unit in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= unit:
            return f"{n / unit:.1f} {suffix}"
    return f"{n}B" if n else "0"
