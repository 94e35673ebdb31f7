"""NBD exports with their host I/O measured (metrics on).

:class:`MeteredExport` wraps the export one NBD connection attached and
records each read, write, flush, trim and write-zeroes in the storage
system's :class:`~splitmirror.observe.iometer.IoMeter`, like the gRPC host
API does for its calls.  Everything else passes through unchanged.
"""

from __future__ import annotations

import time
from typing import Any

from ..nbd import ExportError
from ..observe.iometer import IoMeter


class MeteredExport:
    """An export (see :class:`splitmirror.nbd.backend.Export`) whose I/O is measured."""

    def __init__(self, export: Any, meter: IoMeter) -> None:
        self._export = export
        self._meter = meter
        self._volume: str = export.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self._export, name)

    @property
    def name(self) -> str:
        return self._volume

    @property
    def size(self) -> int:
        return int(self._export.size)

    @property
    def block_size(self) -> int:
        return int(self._export.block_size)

    def read_only(self) -> bool:
        return bool(self._export.read_only())

    def _failed(self, op: str) -> None:
        self._meter.failed(self._volume, op)

    async def read(self, offset: int, length: int) -> bytes:
        started = time.perf_counter()
        try:
            data: bytes = await self._export.read(offset, length)
        except ExportError:
            self._failed("read")
            raise
        self._meter.record(self._volume, "read", time.perf_counter() - started, len(data))
        return data

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        started = time.perf_counter()
        try:
            await self._export.write(offset, data, fua)
        except ExportError:
            self._failed("write")
            raise
        self._meter.record(self._volume, "write", time.perf_counter() - started, len(data))

    async def flush(self) -> None:
        started = time.perf_counter()
        try:
            await self._export.flush()
        except ExportError:
            self._failed("flush")
            raise
        self._meter.record(self._volume, "flush", time.perf_counter() - started, 0)

    async def trim(self, offset: int, length: int) -> None:
        started = time.perf_counter()
        try:
            await self._export.trim(offset, length)
        except ExportError:
            self._failed("trim")
            raise
        self._meter.record(self._volume, "trim", time.perf_counter() - started, length)

    async def write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        started = time.perf_counter()
        try:
            await self._export.write_zeroes(offset, length, fua)
        except ExportError:
            self._failed("write_zeroes")
            raise
        self._meter.record(self._volume, "write_zeroes", time.perf_counter() - started, length)

    async def allocation(self, offset: int, length: int) -> list[tuple[int, bool]]:
        result: list[tuple[int, bool]] = await self._export.allocation(offset, length)
        return result
