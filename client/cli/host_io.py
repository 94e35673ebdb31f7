"""Host I/O through the host API: ``splitmirror write|read|flush|checksum``."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from typing import BinaryIO

from splitmirror.errors import OutOfRange, SplitmirrorError

from ..library import DEFAULT_CHUNK, Client, ClientError
from ..render import size_text
from .output import Output

__all__ = ["IO_DEPTH", "IO_WINDOW", "checksum", "flush", "read", "write"]

#: Host I/O of the CLI moves the file through the client in windows of this
#: many bytes, so memory stays bounded whatever the file size.
IO_WINDOW = 16 * DEFAULT_CHUNK
IO_DEPTH = 4


def _open_input(path: str) -> tuple[BinaryIO, bool]:
    if path == "-":
        return sys.stdin.buffer, False
    return open(path, "rb"), True


def _open_output(path: str | None) -> BinaryIO:
    if path is None:
        return sys.stdout.buffer
    return open(path, "wb")


async def past_end(client: Client, name: str, op: str, offset: int, length: int, known: bool = True) -> OutOfRange:
    """The error for I/O beyond a volume's end, in the user's offset and length (not the RPCs')."""
    size = (await client.get_volume(name)).size
    amount = f"{size_text(length)} ({length} bytes)" if known else f"at least {size_text(length)} ({length} bytes)"
    return OutOfRange(f"{op} of {amount} at offset {offset} on volume {name!r} goes past its end: "
                      f"the volume holds {size_text(size)} ({size} bytes), so offset + length must be at most {size}")


async def _check_range(client: Client, name: str, op: str, offset: int, length: int) -> None:
    size = (await client.get_volume(name)).size
    if offset + length > size:
        raise await past_end(client, name, op, offset, length)


async def write(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    source, owned = _open_input(args.file)
    total = 0
    try:
        info = os.fstat(source.fileno())
        if owned and stat.S_ISREG(info.st_mode):  # a regular file: its size is known before a byte is sent
            await _check_range(client, args.name, "write", offset, info.st_size)
        while True:
            window = source.read(IO_WINDOW)
            if not window:
                break
            try:
                total += await client.write(args.name, offset + total, window, fua=args.fua, depth=IO_DEPTH)
            except ClientError as err:
                if err.code != "OUT_OF_RANGE":
                    raise
                raise await past_end(client, args.name, "write", offset, total + len(window), known=False) from None
    finally:
        if owned:
            source.close()
    if total == 0:
        raise SplitmirrorError(f"{args.file}: nothing to write (empty input)")
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "written": total})
    else:
        out.text(f"wrote {size_text(total)} ({total} bytes) to {args.name} at offset {offset}")


async def read(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    length: int = args.length
    sink: BinaryIO | None = None
    owned = args.out is not None
    done = 0
    await _check_range(client, args.name, "read", offset, length)  # before anything is written out
    try:
        while done < length:
            n = min(IO_WINDOW, length - done)
            data = await client.read(args.name, offset + done, n, depth=IO_DEPTH)
            if sink is None:  # opened only once the volume answered
                sink = _open_output(args.out)
            sink.write(data)
            done += len(data)
        if sink is not None:
            sink.flush()
    finally:
        if owned and sink is not None:
            sink.close()
    if owned:
        if out.as_json:
            out.json({"volume": args.name, "offset": offset, "length": done, "out": args.out})
        else:
            out.text(f"read {size_text(done)} ({done} bytes) from {args.name} at offset {offset} "
                     f"into {args.out}")


async def flush(client: Client, args: argparse.Namespace, out: Output) -> None:
    await client.flush(args.name)
    if out.as_json:
        out.json({"volume": args.name, "flushed": True})
    else:
        out.text(f"flushed {args.name}")


async def checksum(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    length: int = args.length
    if length:
        await _check_range(client, args.name, "checksum", offset, length)
    reply = await client.checksum_reply(args.name, offset, length)
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "length": length,
                  "algorithm": reply.algorithm, "digest": reply.digest})
    else:
        out.text(f"{reply.digest}  {args.name}  ({reply.algorithm})")
