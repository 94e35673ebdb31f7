"""Host I/O latency and bytes, per volume and operation, at the cost of a few additions.

The ports (the gRPC host API and the NBD exports) time each host request and
hand it to :meth:`IoMeter.record`: one dictionary lookup, a bisection into
the bucket bounds and four additions, on the event loop thread, without a
lock.  Nothing is formatted or summed until a scrape asks
(:mod:`splitmirror.observe.metrics`), which reads the series on the same
thread.  With metrics off the ports have no meter and pay nothing.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Container, Iterator
from typing import TypeVar

from prometheus_client.utils import floatToGoString

from ..errors import SplitmirrorError

T = TypeVar("T")

#: Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
           2.5, 5.0, 10.0)

BUCKET_LABELS = (*map(floatToGoString, BUCKETS), "+Inf")

#: The operations of host I/O.
OPS = ("read", "write", "flush", "write_zeroes", "trim")


class IoSeries:
    """One (volume, operation): a latency histogram, bytes and errors."""

    __slots__ = ("buckets", "bytes", "count", "errors", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # per bucket, not cumulative; the last is +Inf
        self.count = 0
        self.sum = 0.0
        self.bytes = 0
        self.errors = 0

    def cumulative(self) -> list[tuple[str, int]]:
        out = []
        total = 0
        for bound, n in zip(BUCKET_LABELS, self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class IoMeter:
    """Host I/O series of one storage system."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], IoSeries] = {}

    def record(self, volume: str, op: str, seconds: float, nbytes: int) -> None:
        """A host request that succeeded: ``nbytes`` moved in ``seconds``."""
        series = self._series.get((volume, op))
        if series is None:
            series = self._series[(volume, op)] = IoSeries()
        series.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        series.count += 1
        series.sum += seconds
        series.bytes += nbytes

    def failed(self, volume: str, op: str) -> None:
        """A host request on an existing volume that was refused or failed.

        Callers pass only names of volumes that exist, so that a client
        cannot grow the series without bound by naming volumes that don't.
        """
        series = self._series.get((volume, op))
        if series is None:
            series = self._series[(volume, op)] = IoSeries()
        series.errors += 1

    def series(self) -> Iterator[tuple[str, str, IoSeries]]:
        for (volume, op), series in sorted(self._series.items()):
            yield volume, op, series

    def forget(self, keep: set[str]) -> None:
        """Drop the series of volumes not in ``keep`` (deleted volumes)."""
        for key in [k for k in self._series if k[0] not in keep]:
            del self._series[key]


async def measured(meter: IoMeter | None, volumes: Container[str], volume: str, op: str, nbytes: int,
                   work: Awaitable[T]) -> T:
    """Await ``work`` (host I/O of ``nbytes`` on ``volume``; -1: the length of
    its result) and record it in ``meter``, if any."""
    if meter is None:
        return await work
    started = time.perf_counter()
    try:
        result = await work
    except (SplitmirrorError, OSError):
        if volume in volumes:
            meter.failed(volume, op)
        raise
    meter.record(volume, op, time.perf_counter() - started, nbytes if nbytes >= 0 else len(result))  # type: ignore[arg-type]
    return result
