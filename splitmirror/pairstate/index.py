"""The pairs of a storage system, indexed by volume and by peer.

Every write looks up the pairs of the volume it writes, at both ends of a
pair (the write path of the primary, the stream applied at the mirror), so
that lookup must cost what that volume's pairs cost, not what the whole
system holds: a daemon with a thousand pairs writes as fast as one with
one.  :class:`PairIndex` is the mapping of pair names to pairs that the
storage system keeps, with two indexes kept in step with it: the pairs
holding an end on each volume, the remote pairs with each peer, and the
pairs of each consistency group.

A pair's ends may be set after it entered the index (a copy-table load
fills them row by row, a takeover moves its end to the other role): the
pair tells the index, which re-indexes it (see :attr:`Pair.on_ends_changed`).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from .pair import Pair


class PairIndex(MutableMapping[str, Pair]):
    """Pair name -> pair, with the pairs of each volume and of each peer at hand."""

    def __init__(self) -> None:
        self._pairs: dict[str, Pair] = {}
        self._by_volume: dict[str, dict[str, Pair]] = {}
        self._by_peer: dict[int, dict[str, Pair]] = {}
        self._by_group: dict[str, dict[str, Pair]] = {}
        #: Where each pair is indexed now (volume names, peer or None, group or "").
        self._keys: dict[str, tuple[frozenset[str], int | None, str]] = {}
        #: Times every pair was walked (iteration over the whole mapping):
        #: the write path must never add to it (a test pins this).
        self.full_scans = 0

    # -- the mapping ---------------------------------------------------------------
    def __getitem__(self, name: str) -> Pair:
        return self._pairs[name]

    def __setitem__(self, name: str, pair: Pair) -> None:
        if name != pair.name:
            raise ValueError(f"pair {pair.name!r} cannot be indexed as {name!r}")
        old = self._pairs.get(name)
        if old is not None and old is not pair:
            self._unindex(old)
        self._pairs[name] = pair
        pair.on_ends_changed = self._reindex
        self._reindex(pair)

    def __delitem__(self, name: str) -> None:
        pair = self._pairs.pop(name)
        self._unindex(pair)

    def __iter__(self) -> Iterator[str]:
        self.full_scans += 1
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, name: object) -> bool:
        return name in self._pairs

    # -- the indexes -----------------------------------------------------------------
    def of_volume(self, volume: str) -> list[Pair]:
        """The pairs holding an end on ``volume`` here (either end)."""
        return list(self._by_volume.get(volume, {}).values())

    def with_peer(self, peer: int) -> list[Pair]:
        """The remote pairs whose other end is on system ``peer``."""
        return list(self._by_peer.get(peer, {}).values())

    def in_group(self, group: str) -> list[Pair]:
        """The pairs of consistency group ``group`` with an end here."""
        return list(self._by_group.get(group, {}).values()) if group else []

    def _reindex(self, pair: Pair) -> None:
        if self._pairs.get(pair.name) is not pair:
            return  # no longer (or not yet) in this index
        ends = pair.ends
        volumes = frozenset(e.volume.name for e in ends)
        peer = ends[0].row.pair_system_id if ends and ends[0].row.copy_type == "REMOTE" else None
        group = ends[0].row.group if ends else ""
        if self._keys.get(pair.name) == (volumes, peer, group):
            return
        self._unindex(pair)
        for volume in volumes:
            self._by_volume.setdefault(volume, {})[pair.name] = pair
        if peer is not None:
            self._by_peer.setdefault(peer, {})[pair.name] = pair
        if group:
            self._by_group.setdefault(group, {})[pair.name] = pair
        self._keys[pair.name] = (volumes, peer, group)

    def _unindex(self, pair: Pair) -> None:
        volumes, peer, group = self._keys.pop(pair.name, (frozenset(), None, ""))
        for volume in volumes:
            held = self._by_volume.get(volume)
            if held is not None and held.get(pair.name) is pair:
                del held[pair.name]
                if not held:
                    del self._by_volume[volume]
        if peer is not None:
            held = self._by_peer.get(peer)
            if held is not None and held.get(pair.name) is pair:
                del held[pair.name]
                if not held:
                    del self._by_peer[peer]
        held = self._by_group.get(group) if group else None
        if held is not None and held.get(pair.name) is pair:
            del held[pair.name]
            if not held:
                del self._by_group[group]
