"""Track bitmaps: one bit per track, compressed (Roaring), serializable.

A pending bitmap marks tracks written on one end of a pair and not yet on
the other; the differential set of a resync is the OR of both ends' bitmaps.
Roaring keeps a sparse bitmap of a 1 TiB volume (128 Mi tracks) small and
makes OR, count and run iteration proportional to the dirty part only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pyroaring import BitMap


class TrackBitmap:
    """A set of track numbers of a volume with ``tracks`` tracks."""

    __slots__ = ("_bits", "tracks")

    def __init__(self, tracks: int, bits: Iterable[int] | None = None) -> None:
        self.tracks = tracks
        self._bits = BitMap(bits) if bits is not None else BitMap()

    # -- building ---------------------------------------------------------
    def add(self, track: int) -> None:
        self._bits.add(track)

    def add_range(self, start: int, stop: int) -> None:
        """Add tracks ``start`` (inclusive) to ``stop`` (exclusive)."""
        if stop > start:
            self._bits.add_range(start, stop)

    def remove_range(self, start: int, stop: int) -> None:
        if stop > start:
            self._bits.remove_range(start, stop)

    def mark_bytes(self, offset: int, length: int, track_size: int) -> int:
        """Set the bits of every track touched by a byte range.

        Returns how many bits were newly set (0 means nothing to persist).
        """
        if length <= 0:
            return 0
        start = offset // track_size
        stop = (offset + length + track_size - 1) // track_size
        before = self._bits.range_cardinality(start, stop)
        self._bits.add_range(start, stop)
        return (stop - start) - before

    def set_all(self) -> None:
        self.add_range(0, self.tracks)

    def clear(self) -> None:
        self._bits.clear()

    def update(self, other: TrackBitmap) -> None:
        """In-place OR."""
        self._bits |= other._bits

    def __or__(self, other: TrackBitmap) -> TrackBitmap:
        result = TrackBitmap(self.tracks)
        result._bits = self._bits | other._bits
        return result

    def difference_update(self, other: TrackBitmap) -> None:
        self._bits -= other._bits

    def copy(self) -> TrackBitmap:
        result = TrackBitmap(self.tracks)
        result._bits = self._bits.copy()
        return result

    # -- reading ----------------------------------------------------------
    def __len__(self) -> int:
        return len(self._bits)

    def __bool__(self) -> bool:
        return bool(self._bits)

    def __contains__(self, track: object) -> bool:
        return isinstance(track, int) and track in self._bits

    def __iter__(self) -> Iterator[int]:
        return iter(self._bits)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrackBitmap) and self.tracks == other.tracks and self._bits == other._bits

    def __hash__(self) -> int:  # pragma: no cover - mutable, never hashed
        raise TypeError("TrackBitmap is mutable")

    def count_range(self, start: int, stop: int) -> int:
        return int(self._bits.range_cardinality(start, stop)) if stop > start else 0

    def runs(self, max_run: int = 0) -> Iterator[tuple[int, int]]:
        """Yield ``(first_track, count)`` for each run of consecutive set bits.

        With ``max_run`` > 0 longer runs are cut into pieces of that size.
        Cost grows with the number of runs (and the log of their lengths),
        not with the number of bits.  Bits past ``tracks`` are ignored.
        """
        bits = self._bits
        limit = self.tracks
        if not bits or bits.min() >= limit:
            return
        last = bits.max()
        start = bits.min()
        while start < limit:
            # Gallop to the end of the run, then narrow down.
            stop, step = start + 1, 1
            while stop + step <= limit and bits.contains_range(stop, stop + step):
                stop += step
                step <<= 1
            while step > 1:
                step >>= 1
                if stop + step <= limit and bits.contains_range(stop, stop + step):
                    stop += step
            pos = start
            while pos < stop:
                count = stop - pos if max_run <= 0 else min(max_run, stop - pos)
                yield pos, count
                pos += count
            if stop > last or stop >= limit:
                return
            start = bits.next_set_bit(stop)

    def memory_bytes(self) -> int:
        """Size of the serialized form, a good proxy of memory use."""
        return len(self._bits.serialize())

    # -- persistence ------------------------------------------------------
    def to_bytes(self) -> bytes:
        self._bits.run_optimize()
        return bytes(self._bits.serialize())

    @classmethod
    def from_bytes(cls, tracks: int, data: bytes) -> TrackBitmap:
        """Raises ValueError when ``data`` is not a serialized bitmap."""
        result = cls(tracks)
        if data:
            try:
                result._bits = BitMap.deserialize(data)
            except Exception:  # the library's own words are no message for a peer
                raise ValueError("corrupt track bitmap (not a serialized roaring bitmap)") from None
        return result
