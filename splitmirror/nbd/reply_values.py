"""What the NBD server puts in its replies, decided without I/O.

Backend answers (an :class:`~splitmirror.nbd.backend.ExportError`, an
:class:`~splitmirror.nbd.backend.Export`'s properties, allocation extents)
become NBD wire values here: error numbers, option refusals, transmission
flags, the preferred block size, block status descriptors and the metadata
context this server offers.  The codec encodes them; the connection sends them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .backend import Export, ExportError
from .constants import (
    BASE_ALLOCATION,
    Command,
    Errno,
    Option,
    OptionReply,
    StateFlag,
    TransmissionFlag,
)

__all__ = [
    "ALLOCATION_ID",
    "command_name",
    "descriptors",
    "meta_context_id",
    "option_refusal",
    "preferred_block_size",
    "transmission_flags",
    "wire_errno",
]

ALLOCATION_ID: Final = 1  # context id of base:allocation
# Status reported for extents the backend calls unallocated: holes of a
# sparse volume read as zeroes, so clients may skip reading them.
_UNALLOCATED: Final = StateFlag.HOLE | StateFlag.ZERO
_BASE_FLAGS: Final = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.CAN_MULTI_CONN
)


def wire_errno(errno: int) -> Errno:
    """The NBD error for a backend errno; EIO for one NBD has no value for."""
    try:
        return Errno(errno)
    except ValueError:
        return Errno.EIO


def command_name(ctype: int) -> str:
    """A command type for the log, known or not."""
    try:
        return Command(ctype).name
    except ValueError:
        return f"command {ctype}"


def option_refusal(exc: ExportError) -> OptionReply:
    """The option error reply (to INFO/GO) for an export that cannot be opened."""
    if exc.errno == Errno.EPERM:
        return OptionReply.ERR_POLICY
    if exc.errno == Errno.ESHUTDOWN:
        return OptionReply.ERR_SHUTDOWN
    if exc.errno == Errno.EINVAL:
        return OptionReply.ERR_INVALID
    return OptionReply.ERR_UNKNOWN


def transmission_flags(export: Export, structured_replies: bool) -> TransmissionFlag:
    """The flags announced for ``export``; DF only once structured replies are on."""
    flags = _BASE_FLAGS
    if structured_replies:
        flags |= TransmissionFlag.SEND_DF
    if export.read_only():
        flags |= TransmissionFlag.READ_ONLY
    return flags


def preferred_block_size(export: Export, max_request: int) -> int:
    """A power of two >= 512 (as the spec wants), not above max_request."""
    size = export.block_size
    if size < 512 or size & (size - 1):
        size = 4096
    while size > max_request and size > 512:
        size //= 2
    return size


def meta_context_id(option: int, queries: Sequence[str]) -> int | None:
    """The id to announce ``base:allocation`` under in answer to LIST/SET_META_CONTEXT
    with ``queries``, or None when the client did not ask for it.

    A LIST without queries asks for every context; LIST answers carry id 0
    (ids are assigned by SET).
    """
    listing = option == Option.LIST_META_CONTEXT
    wanted = {BASE_ALLOCATION} | ({"base:"} if listing else set())
    queries = queries or ((BASE_ALLOCATION,) if listing else ())
    if not any(query in wanted for query in queries):
        return None
    return 0 if listing else ALLOCATION_ID


def descriptors(extents: Sequence[tuple[int, bool]], length: int, req_one: bool) -> list[tuple[int, int]]:
    """Backend extents -> merged NBD descriptors covering at most ``length``."""
    out: list[tuple[int, int]] = []
    covered = 0
    for extent_length, allocated in extents:
        if covered >= length:
            break
        if extent_length <= 0:
            continue
        extent_length = min(extent_length, length - covered)
        status = 0 if allocated else int(_UNALLOCATED)
        if out and out[-1][1] == status:
            out[-1] = (out[-1][0] + extent_length, status)
        else:
            out.append((extent_length, status))
        covered += extent_length
    if not out:
        out.append((length, 0))  # "status unknown" is always a safe answer
    return out[:1] if req_one else out
