"""Running one transmission command on an export, and what its reply holds.

:func:`execute` calls the export and returns the reply as a list of byte
strings to be written in order: a READ's data follows its header as the
export returned it, never copied into one buffer.
"""

from __future__ import annotations

from .backend import Export, ExportError
from .codec import CommandRequest, NbdCodec
from .constants import Command, CommandFlag, Errno
from .reply_values import ALLOCATION_ID, descriptors

__all__ = ["cost", "execute"]

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
