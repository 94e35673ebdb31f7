"""Host I/O through the host API: ``splitmirror write|read|flush|checksum``."""

from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

from splitmirror.errors import SplitmirrorError
from splitmirror.sizes import format_size

from ..library import DEFAULT_CHUNK, Client
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


async def write(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    source, owned = _open_input(args.file)
    total = 0
    try:
        while True:
            window = source.read(IO_WINDOW)
            if not window:
                break
            total += await client.write(args.name, offset + total, window, fua=args.fua, depth=IO_DEPTH)
    finally:
        if owned:
            source.close()
    if total == 0:
        raise SplitmirrorError(f"{args.file}: nothing to write (empty input)")
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "written": total})
    else:
        out.text(f"wrote {format_size(total)} ({total} bytes) to {args.name} at offset {offset}")


async def read(client: Client, args: argparse.Namespace, out: Output) -> None:
    offset: int = args.offset
    length: int = args.length
    sink: BinaryIO | None = None
    owned = args.out is not None
    done = 0
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
            out.text(f"read {format_size(done)} ({done} bytes) from {args.name} at offset {offset} "
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
    reply = await client.checksum_reply(args.name, offset, length)
    if out.as_json:
        out.json({"volume": args.name, "offset": offset, "length": length,
                  "algorithm": reply.algorithm, "digest": reply.digest})
    else:
        out.text(f"{reply.digest}  {args.name}  ({reply.algorithm})")
