"""NbdServer against real NBD clients (qemu-io, nbdinfo, nbdcopy) and a raw one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

import splitmirror.nbd.server as server_module
from splitmirror.nbd import ExportError, NbdServer
from splitmirror.nbd.constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    NBDMAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Errno,
    Info,
    Option,
    OptionReply,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)

MiB = 1024 * 1024
LOGGER = "test.nbd"
TOOL_TIMEOUT = 30.0


# ------------------------------------------------------------- in-memory backend


class MemoryExport:
    """A bytearray-backed export with a per-block allocation map."""

    def __init__(self, name: str, size: int, *, read_only: bool = False, block_size: int = 4096) -> None:
        self.name = name
        self.size = size
        self.block_size = block_size
        self.ro = read_only
        self.data = bytearray(size)
        self.allocated = bytearray(-(-size // block_size))
        self.fail: BaseException | None = None  # raised by every I/O call when set
        self.gates: dict[int, asyncio.Event] = {}  # read(offset) waits for gates[offset]
        self.active = 0
        self.max_active = 0
        self.fua_writes = 0
        self.flushes = 0

    def read_only(self) -> bool:
        return self.ro

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def _mark(self, offset: int, length: int, value: int) -> None:
        first, last = offset // self.block_size, (offset + length - 1) // self.block_size
        for block in range(first, last + 1):
            self.allocated[block] = value

    async def read(self, offset: int, length: int) -> bytes:
        self._check()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if offset in self.gates:
                await self.gates[offset].wait()
            return bytes(self.data[offset : offset + length])
        finally:
            self.active -= 1

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check()
        self.data[offset : offset + len(data)] = data
        self._mark(offset, len(data), 1)
        self.fua_writes += fua

    async def flush(self) -> None:
        self._check()
        self.flushes += 1

    async def trim(self, offset: int, length: int) -> None:
        self._check()
        self.data[offset : offset + length] = bytes(length)
        self._mark(offset, length, 0)

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        self._check()
        self.data[offset : offset + length] = bytes(length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        self._check()
        extents: list[tuple[int, bool]] = []
        position, end = offset, min(offset + length, self.size)
        while position < end:
            block = position // self.block_size
            step = min((block + 1) * self.block_size, end) - position
            state = bool(self.allocated[block])
            if extents and extents[-1][1] == state:
                extents[-1] = (extents[-1][0] + step, state)
            else:
                extents.append((step, state))
            position += step
        return extents


class MemoryCatalog:
    def __init__(self) -> None:
        self.exports = {
            "vol": MemoryExport("vol", 8 * MiB),
            "ro": MemoryExport("ro", MiB, read_only=True),
        }

    def export_names(self) -> list[str]:
        return sorted(self.exports)

    def open_export(self, name: str) -> MemoryExport:
        if name == "fenced":
            raise ExportError(Errno.EPERM, "volume 'fenced' fenced for restore")
        try:
            return self.exports[name]
        except KeyError:
            raise ExportError(2, f"no export named {name!r}") from None


@pytest.fixture
def catalog() -> MemoryCatalog:
    return MemoryCatalog()


async def _started(catalog: MemoryCatalog, **kwargs: int) -> NbdServer:
    server = NbdServer(catalog, "127.0.0.1", 0, logger=logging.getLogger(LOGGER), **kwargs)
    await server.start()
    return server


@pytest_asyncio.fixture
async def server(catalog: MemoryCatalog) -> AsyncIterator[NbdServer]:
    srv = await _started(catalog)
    yield srv
    await srv.close()


@pytest.fixture
def url(server: NbdServer) -> str:
    return f"nbd://127.0.0.1:{server.bound_port}"


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


async def run_tool(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ------------------------------------------------------------------- raw client


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def meta_data(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q.encode() for q in queries)


class RawClient:
    """Just enough of an NBD client to poke at exact bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, client_flags: int = 3) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert struct.unpack(">QQH", await reader.readexactly(18)) == (NBDMAGIC, IHAVEOPT, 3)
        writer.write(struct.pack(">I", client_flags))
        return cls(reader, writer)

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), 5)

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.writer.write(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            _, reply_opt, rtype, length = struct.unpack(">QIII", await self.read(20))
            assert reply_opt == opt
            replies.append((rtype, await self.read(length)))
            if rtype == OptionReply.ACK or rtype & (1 << 31):
                return replies

    async def go(self, name: str, *, structured: bool = False, meta: bool = False) -> tuple[int, int]:
        if structured:
            assert await self.option(Option.STRUCTURED_REPLY) == [(OptionReply.ACK, b"")]
        if meta:
            await self.option(Option.SET_META_CONTEXT, meta_data(name, (BASE_ALLOCATION,)))
        replies = await self.option(Option.GO, go_data(name, (Info.BLOCK_SIZE,)))
        assert replies[-1][0] == OptionReply.ACK, replies
        infos = {struct.unpack_from(">H", data)[0]: data for rtype, data in replies[:-1]}
        _, size, flags = struct.unpack(">HQH", infos[Info.EXPORT])
        return size, flags

    def send(self, cmd: int, handle: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> None:
        self.writer.write(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)

    async def simple_reply(self, length: int = 0) -> tuple[int, int, bytes]:
        """(handle, error, data); ``length`` bytes follow a successful read."""
        magic, error, handle = struct.unpack(">IIQ", await self.read(16))
        assert magic == SIMPLE_REPLY_MAGIC
        return handle, error, (await self.read(length) if length and not error else b"")

    async def chunk(self) -> tuple[int, int, int, bytes]:
        """(flags, type, handle, payload) of one structured reply chunk."""
        magic, flags, rtype, handle, length = struct.unpack(">IHHQI", await self.read(20))
        assert magic == STRUCTURED_REPLY_MAGIC
        return flags, rtype, handle, await self.read(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# ------------------------------------------------------------ third-party tools


@needs("qemu-io")
@pytest.mark.asyncio
async def test_qemu_io_write_then_read(url: str, catalog: MemoryCatalog) -> None:
    rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", f"{url}/vol")
    assert rc == 0, out
    assert catalog.exports["vol"].data[: 1 * MiB] == b"\xab" * MiB
    rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "read -P 0xab 0 1M", f"{url}/vol")
    assert rc == 0 and "read 1048576/1048576" in out, out
    rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "read -P 0xcd 0 4k", f"{url}/vol")
    assert "Pattern verification failed" in out


@needs("nbdinfo")
@pytest.mark.asyncio
async def test_nbdinfo_json_size_and_read_only(url: str) -> None:
    for name, size, read_only in [("vol", 8 * MiB, False), ("ro", MiB, True)]:
        rc, out = await run_tool("nbdinfo", "--json", f"{url}/{name}")
        assert rc == 0, out
        (info,) = json.loads(out)["exports"]
        assert info["export-size"] == size
        assert info["is_read_only"] is read_only
        assert info["block_size_preferred"] == 4096
        assert info["block_size_maximum"] == 32 * MiB
        assert info["can_multi_conn"] and info["can_fua"] and info["can_zero"] and info["can_trim"]
        assert info["contexts"] == [BASE_ALLOCATION]


@needs("nbdinfo")
@pytest.mark.asyncio
async def test_nbdinfo_list(url: str) -> None:
    rc, out = await run_tool("nbdinfo", "--list", "--json", url)
    assert rc == 0, out
    assert sorted(e["export-name"] for e in json.loads(out)["exports"]) == ["ro", "vol"]


@needs("nbdinfo")
@pytest.mark.asyncio
async def test_nbdinfo_refused_exports(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for name in ("fenced", "nope"):
        rc, out = await run_tool("nbdinfo", f"{url}/{name}")
        assert rc != 0, out
    assert any("refused export 'fenced': volume 'fenced' fenced for restore" in m for m in messages(caplog))


@needs("nbdcopy")
@pytest.mark.asyncio
async def test_nbdcopy_roundtrip(url: str, catalog: MemoryCatalog, tmp_path: Path) -> None:
    source, target = tmp_path / "in.img", tmp_path / "out.img"
    payload = os.urandom(8 * MiB)
    source.write_bytes(payload)
    target.write_bytes(b"")
    rc, out = await run_tool("nbdcopy", str(source), f"{url}/vol")
    assert rc == 0, out
    assert catalog.exports["vol"].data == payload
    rc, out = await run_tool("nbdcopy", f"{url}/vol", str(target))
    assert rc == 0, out
    assert target.read_bytes() == payload


@needs("qemu-io")
@pytest.mark.asyncio
async def test_qemu_io_write_to_read_only_export_fails(url: str, catalog: MemoryCatalog) -> None:
    rc, out = await run_tool("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 4k", f"{url}/ro")
    assert rc != 0, out
    assert catalog.exports["ro"].data == bytes(MiB)


@needs("qemu-io")
@pytest.mark.asyncio
async def test_revoking_write_access_fails_next_write(
    url: str, catalog: MemoryCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    export = catalog.exports["vol"]
    proc = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        f"{url}/vol",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def command(line: str) -> str:
        stdin.write(line.encode() + b"\n")
        await stdin.drain()
        return (await asyncio.wait_for(stdout.readuntil(b"qemu-io> "), TOOL_TIMEOUT)).decode()

    try:
        await asyncio.wait_for(stdout.readuntil(b"qemu-io> "), TOOL_TIMEOUT)
        assert "wrote 4096/4096" in await command("write -P 0x11 0 4k")
        export.ro = True
        assert "Operation not permitted" in await command("write -P 0x22 0 4k")
        assert "read 4096/4096" in await command("read -P 0x11 0 4k")
        export.ro = False
        assert "wrote 4096/4096" in await command("write -P 0x33 0 4k")
    finally:
        stdin.close()
        await asyncio.wait_for(proc.wait(), TOOL_TIMEOUT)
    assert export.data[:4096] == b"\x33" * 4096
    assert any("refused WRITE offset=0 length=4096 on export vol" in m for m in messages(caplog))


@needs("qemu-io")
@pytest.mark.asyncio
async def test_bad_clients_do_not_disturb_good_one(
    server: NbdServer, url: str, catalog: MemoryCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    good = asyncio.create_task(
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", "-c", "read -P 0x5a 0 4M", f"{url}/vol")
    )
    # A garbage handshake.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(256))
    assert await asyncio.wait_for(reader.read(), 5) == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    writer.close()
    # A client that dies in the middle of a WRITE payload.
    client = await RawClient.connect(server.bound_port)
    await client.go("vol")
    client.send(Command.WRITE, 1, 6 * MiB, MiB, data=b"\xee" * 1000)
    await client.writer.drain()
    client.writer.transport.abort()

    rc, out = await good
    assert rc == 0, out
    assert "read 4194304/4194304" in out
    await wait_for(lambda: any("mid-message" in m for m in messages(caplog)))
    assert catalog.exports["vol"].data[6 * MiB : 7 * MiB] == bytes(MiB)
    assert any("protocol error" in m and "unknown client flags" in m for m in messages(caplog))
    assert not [r for r in caplog.records if r.exc_info]  # no tracebacks for client mistakes
    # The server still serves new clients.
    again = await RawClient.connect(server.bound_port)
    assert await again.go("vol") == (8 * MiB, int(_flags(structured=False)))
    await again.close()


def _flags(*, structured: bool, read_only: bool = False) -> TransmissionFlag:
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
        | TransmissionFlag.CAN_MULTI_CONN
    )
    if structured:
        flags |= TransmissionFlag.SEND_DF
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    return flags


# --------------------------------------------------------------- raw protocol


@pytest.mark.asyncio
async def test_option_refusals_then_go(server: NbdServer) -> None:
    client = await RawClient.connect(server.bound_port)
    assert await client.option(Option.GO, go_data("fenced")) == [
        (OptionReply.ERR_POLICY, b"volume 'fenced' fenced for restore")
    ]
    assert await client.option(Option.INFO, go_data("nope")) == [(OptionReply.ERR_UNKNOWN, b"no export named 'nope'")]
    (reply,) = await client.option(99, b"whatever")
    assert reply[0] == OptionReply.ERR_UNSUP
    (reply,) = await client.option(Option.LIST, b"x")
    assert reply[0] == OptionReply.ERR_INVALID
    replies = await client.option(Option.LIST)
    assert replies == [
        (OptionReply.SERVER, b"\0\0\0\x02ro"),
        (OptionReply.SERVER, b"\0\0\0\x03vol"),
        (OptionReply.ACK, b""),
    ]
    replies = await client.option(Option.INFO, go_data("ro", (Info.NAME, Info.BLOCK_SIZE)))
    assert (
        OptionReply.INFO,
        struct.pack(">HQH", Info.EXPORT, MiB, _flags(structured=False, read_only=True)),
    ) in replies
    assert (OptionReply.INFO, struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 * MiB)) in replies
    assert (OptionReply.INFO, b"\0\x01ro") in replies
    assert await client.go("vol") == (8 * MiB, _flags(structured=False))
    await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("client_flags", "reply_length"), [(3, 10), (1, 134)])
async def test_export_name_option(server: NbdServer, client_flags: int, reply_length: int) -> None:
    client = await RawClient.connect(server.bound_port, client_flags)
    client.writer.write(struct.pack(">QII", IHAVEOPT, Option.EXPORT_NAME, 3) + b"vol")
    reply = await client.read(reply_length)
    assert struct.unpack_from(">QH", reply) == (8 * MiB, _flags(structured=False))
    client.send(Command.DISC, 1)
    assert await asyncio.wait_for(client.reader.read(), 5) == b""
    await client.close()
    # An unknown name cannot be answered with an error: the server hangs up.
    client = await RawClient.connect(server.bound_port)
    client.writer.write(struct.pack(">QII", IHAVEOPT, Option.EXPORT_NAME, 4) + b"nope")
    assert await asyncio.wait_for(client.reader.read(), 5) == b""
    await client.close()


@pytest.mark.asyncio
async def test_simple_commands_and_read_only(server: NbdServer, catalog: MemoryCatalog) -> None:
    vol = catalog.exports["vol"]
    client = await RawClient.connect(server.bound_port)
    await client.go("vol")
    client.send(Command.WRITE, 1, 512, 4, CommandFlag.FUA, b"abcd")
    assert await client.simple_reply() == (1, 0, b"")
    client.send(Command.READ, 2, 510, 8)
    assert await client.simple_reply(8) == (2, 0, b"\0\0abcd\0\0")
    client.send(Command.WRITE_ZEROES, 3, 512, 2, CommandFlag.NO_HOLE)
    client.send(Command.TRIM, 4, 514, 2, CommandFlag.FUA)
    client.send(Command.FLUSH, 5)
    assert sorted([await client.simple_reply() for _ in range(3)]) == [(3, 0, b""), (4, 0, b""), (5, 0, b"")]
    assert vol.data[510:518] == bytes(8) and vol.fua_writes == 1 and vol.flushes == 2
    client.send(Command.READ, 6, 8 * MiB - 1, 2)  # beyond the end
    assert await client.simple_reply() == (6, Errno.EINVAL, b"")
    client.send(Command.WRITE, 7, 0, 32 * MiB + 1)  # too large: refused, payload skipped
    client.writer.write(bytes(32 * MiB + 1))
    assert await client.simple_reply() == (7, Errno.EINVAL, b"")
    client.send(Command.READ, 8, 512, 1)
    assert await client.simple_reply(1) == (8, 0, b"\0")
    await client.close()

    client = await RawClient.connect(server.bound_port)
    assert await client.go("ro") == (MiB, _flags(structured=False, read_only=True))
    for handle, cmd in enumerate((Command.WRITE, Command.TRIM, Command.WRITE_ZEROES)):
        data = b"x" if cmd is Command.WRITE else b""
        client.send(cmd, handle, 0, 1, data=data)
        assert await client.simple_reply() == (handle, Errno.EPERM, b"")
    await client.close()


@pytest.mark.asyncio
async def test_structured_replies_and_backend_errors(
    server: NbdServer, catalog: MemoryCatalog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    vol = catalog.exports["vol"]
    vol.data[0:4] = b"abcd"
    client = await RawClient.connect(server.bound_port)
    assert await client.go("vol", structured=True) == (8 * MiB, _flags(structured=True))
    client.send(Command.READ, 1, 0, 4, CommandFlag.DF)
    assert await client.chunk() == (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 1, b"\0" * 8 + b"abcd")

    vol.fail = ExportError(Errno.ENOSPC, "pool is full")
    client.send(Command.WRITE, 2, 0, 4, data=b"wxyz")
    assert await client.chunk() == (
        ReplyFlag.DONE,
        ReplyType.ERROR,
        2,
        struct.pack(">IH", 28, 12) + b"pool is full",
    )
    vol.fail = RuntimeError("backend bug")
    client.send(Command.READ, 3, 0, 4)
    flags, rtype, handle, payload = await client.chunk()
    assert (flags, rtype, handle) == (ReplyFlag.DONE, ReplyType.ERROR, 3)
    assert struct.unpack_from(">I", payload)[0] == Errno.EIO
    vol.fail = None
    client.send(Command.BLOCK_STATUS, 4, 0, 4096)  # no metadata context negotiated
    flags, rtype, handle, payload = await client.chunk()
    assert (rtype, struct.unpack_from(">I", payload)[0]) == (ReplyType.ERROR, Errno.EINVAL)
    await client.close()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and "READ offset=0 length=4 on export vol" in errors[0].getMessage()
    assert any("refused WRITE" in m and "pool is full (ENOSPC)" in m for m in messages(caplog))


@pytest.mark.asyncio
async def test_block_status(server: NbdServer, catalog: MemoryCatalog) -> None:
    vol = catalog.exports["vol"]
    await vol.write(4096, b"x" * 8192, False)
    client = await RawClient.connect(server.bound_port)
    await client.go("vol", structured=True, meta=True)
    client.send(Command.BLOCK_STATUS, 1, 0, 16384)
    flags, rtype, handle, payload = await client.chunk()
    assert (flags, rtype, handle) == (ReplyFlag.DONE, ReplyType.BLOCK_STATUS, 1)
    hole = int(StateFlag.HOLE | StateFlag.ZERO)
    assert struct.unpack(">7I", payload) == (1, 4096, hole, 8192, 0, 4096, hole)
    client.send(Command.BLOCK_STATUS, 2, 4096, 16384, CommandFlag.REQ_ONE)
    assert (await client.chunk())[3] == struct.pack(">III", 1, 8192, 0)
    await client.close()


@pytest.mark.asyncio
async def test_out_of_order_replies_and_bounded_in_flight(catalog: MemoryCatalog) -> None:
    server = await _started(catalog, max_in_flight=4)
    vol = catalog.exports["vol"]
    try:
        vol.gates = {handle * 512: asyncio.Event() for handle in range(10)}
        client = await RawClient.connect(server.bound_port)
        await client.go("vol")
        for handle in range(10):
            client.send(Command.READ, handle, handle * 512, 512)
        await wait_for(lambda: vol.active == 4)
        await asyncio.sleep(0.05)
        assert vol.active == 4  # the fifth request is not dispatched yet
        vol.gates[3 * 512].set()
        assert (await client.simple_reply(512))[0] == 3
        for gate in vol.gates.values():
            gate.set()
        handles = {(await client.simple_reply(512))[0] for _ in range(9)}
        assert handles == set(range(10)) - {3}
        assert vol.max_active == 4
        await client.close()
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_close_ends_connections(catalog: MemoryCatalog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    server = await _started(catalog)
    port = server.bound_port
    idle = await RawClient.connect(port)
    attached = await RawClient.connect(port)
    await attached.go("vol")
    host, client_port = attached.writer.get_extra_info("sockname")[:2]
    attached_peer = f"{host}:{client_port}"
    await asyncio.wait_for(server.close(), 5)
    assert await asyncio.wait_for(idle.reader.read(), 5) == b""
    assert await asyncio.wait_for(attached.reader.read(), 5) == b""
    await idle.close()
    await attached.close()
    closed = f"nbd {attached_peer}: connection closed (export vol): server shutting down"
    assert messages(caplog).count(closed) == 1
    assert not [r for r in caplog.records if r.name == "asyncio"]  # no noise from cancelled tasks
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_works_on_uvloop(catalog: MemoryCatalog) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        server = await _started(catalog)
        try:
            client = await RawClient.connect(server.bound_port)
            await client.go("vol", structured=True)
            client.send(Command.WRITE, 1, 0, 3, data=b"uvl")
            assert await client.simple_reply() == (1, 0, b"")
            client.send(Command.READ, 2, 0, 3)
            assert (await client.chunk())[3] == b"\0" * 8 + b"uvl"
            await client.close()
            if shutil.which("qemu-io"):
                url = f"nbd://127.0.0.1:{server.bound_port}/vol"
                rc, out = await run_tool(
                    "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "read -P 0x77 0 1M", url
                )
                assert rc == 0, out
        finally:
            await server.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.asyncio
async def test_in_flight_commands_on_disconnect_and_shutdown(
    catalog: MemoryCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "_SHUTDOWN_GRACE", 0.2)
    server = await _started(catalog)
    vol = catalog.exports["vol"]
    vol.gates = {0: asyncio.Event(), 512: asyncio.Event()}
    # A client leaving does not cancel its command: the backend call completes.
    client = await RawClient.connect(server.bound_port)
    await client.go("vol")
    client.send(Command.READ, 1, 0, 512)
    await wait_for(lambda: vol.active == 1)
    await client.close()
    await asyncio.sleep(0.05)
    vol.gates[0].set()
    await wait_for(lambda: vol.active == 0)
    # On shutdown a stuck command is cancelled after the grace period.
    client = await RawClient.connect(server.bound_port)
    await client.go("vol")
    client.send(Command.READ, 2, 512, 512)
    await wait_for(lambda: vol.active == 1)
    await asyncio.wait_for(server.close(), 2)
    assert vol.active == 0
    assert await asyncio.wait_for(client.reader.read(), 5) == b""
    await client.close()


LIBNBD_ORDER = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
slow, fast = nbd.Buffer(4096), nbd.Buffer(4096)
cookies = {"slow": h.aio_pread(slow, 0), "fast": h.aio_pread(fast, 4096)}
done = set()
while len(done) < 2:
    h.poll(-1)
    for name, cookie in cookies.items():
        if name not in done and h.aio_command_completed(cookie):
            done.add(name)
            print(name, flush=True)
print(slow.to_bytearray()[:2].hex(), fast.to_bytearray()[:2].hex(), flush=True)
h.shutdown()
"""


@pytest.mark.skipif(not Path("/usr/lib/python3/dist-packages/nbd.py").exists(), reason="python3-libnbd is missing")
@pytest.mark.asyncio
async def test_replies_in_completion_order_with_libnbd(url: str, catalog: MemoryCatalog) -> None:
    """libnbd's asynchronous API: the READ sent second completes first while the
    first waits in the backend; both carry the right data."""
    vol = catalog.exports["vol"]
    vol.data[0:2], vol.data[4096:4098] = b"\x01\x02", b"\x03\x04"
    vol.gates = {0: asyncio.Event()}
    proc = await asyncio.create_subprocess_exec(
        "/usr/bin/python3", "-c", LIBNBD_ORDER, f"{url}/vol", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), TOOL_TIMEOUT)
        assert first == b"fast\n"
        assert vol.active == 1  # the slow READ is still in the backend
        vol.gates[0].set()
        rest = await asyncio.wait_for(proc.stdout.read(), TOOL_TIMEOUT)
        assert rest.decode().split() == ["slow", "0102", "0304"]
    finally:
        vol.gates[0].set()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


@needs("qemu-io")
@pytest.mark.asyncio
async def test_qemu_io_aio_write_bursts(url: str, catalog: MemoryCatalog) -> None:
    """Bursts of asynchronous writes (many in flight on one connection), flushed, read back."""
    commands = [f"aio_write -P {0x10 + n} {n * 64}k 64k" for n in range(32)] + ["aio_flush"]
    commands += [f"read -P {0x10 + n} {n * 64}k 64k" for n in range(32)]
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    rc, out = await run_tool(*argv, f"{url}/vol")
    assert rc == 0 and "Pattern verification failed" not in out, out
    data = catalog.exports["vol"].data
    assert all(data[n * 65536 : (n + 1) * 65536] == bytes([0x10 + n]) * 65536 for n in range(32))
    assert catalog.exports["vol"].flushes >= 1
