"""Running one transmission command on an export, and what its reply holds.

:func:`execute` calls the export and returns the reply as a list of byte
strings to be written in order: a READ's data follows its header as the
export returned it, never copied into one buffer.
"""

from __future__ import annotations

import logging

from .backend import Export, ExportError
from .codec import CommandRequest, NbdCodec
from .constants import Command, CommandFlag, Errno
from .reply_values import ALLOCATION_ID, command_name, descriptors, wire_errno

__all__ = ["Reply", "cost", "execute", "log_refused", "reply_to"]

Reply = list[bytes | bytearray | memoryview]


def cost(request: CommandRequest) -> int:
    """Payload bytes a command holds from its request until its reply is sent."""
    return request.length if request.type in (Command.READ, Command.WRITE) else 0


def _check_writable(export: Export) -> None:
    if export.read_only():
        raise ExportError(Errno.EPERM, "export is read-only")


async def execute(export: Export, codec: NbdCodec, request: CommandRequest) -> Reply:
    """Run one transmission command on ``export``; returns the encoded reply.

    Raises :class:`ExportError` for what the export refuses.
    """
    handle, offset, length = request.handle, request.offset, request.length
    fua = CommandFlag.FUA in request.flags
    match request.type:
        case Command.READ:
            data = await export.read(offset, length)
            if len(data) != length:
                raise ExportError(Errno.EIO, f"backend returned {len(data)} of {length} bytes")
            return [codec.send_read_header(handle, offset, length), data]
        case Command.WRITE:
            _check_writable(export)
            await export.write(offset, request.data, fua)
        case Command.FLUSH:
            await export.flush()
        case Command.TRIM:
            _check_writable(export)
            await export.trim(offset, length)
            if fua:
                await export.flush()
        case Command.WRITE_ZEROES:
            _check_writable(export)
            await export.write_zeroes(offset, length, fua)
        case Command.BLOCK_STATUS:
            extents = await export.allocation(offset, length)
            req_one = CommandFlag.REQ_ONE in request.flags
            return [codec.send_block_status(handle, ALLOCATION_ID, descriptors(extents, length, req_one))]
        case _:
            raise ExportError(Errno.EINVAL, f"unsupported command {request.type.name}")
    return [codec.send_ok(handle)]


def log_refused(log: logging.Logger, peer: str, export: str, ctype: int, offset: int, length: int, error: int,
                message: str) -> None:
    log.warning("nbd %s: refused %s offset=%d length=%d on export %s: %s (%s)", peer, command_name(ctype), offset,
                length, export, message, wire_errno(error).name)


async def reply_to(export: Export, codec: NbdCodec, request: CommandRequest, log: logging.Logger, peer: str) -> Reply:
    """The reply to ``request``: its result, or the error the export gave (EIO for a failure of ours)."""
    try:
        return await execute(export, codec, request)
    except ExportError as exc:
        errno = wire_errno(exc.errno)
        log_refused(log, peer, export.name, request.type, request.offset, request.length, errno, exc.message)
        return [codec.send_error(request.handle, errno, exc.message)]
    except Exception:
        log.exception("nbd %s: %s offset=%d length=%d on export %s failed", peer, request.type.name, request.offset,
                      request.length, export.name)
        return [codec.send_error(request.handle, Errno.EIO, "internal server error")]
