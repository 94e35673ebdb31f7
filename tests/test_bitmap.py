"""Unit tests of :class:`splitmirror.bitmap.TrackBitmap` against a brute-force set model."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitmirror.storage.bitmap import TrackBitmap

# ---------------------------------------------------------------------- model


def model_runs(tracks: Iterable[int], max_run: int = 0) -> list[tuple[int, int]]:
    """Runs of consecutive tracks computed the slow, obvious way."""
    runs: list[tuple[int, int]] = []
    for t in sorted(set(tracks)):
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    if max_run <= 0:
        return runs
    cut: list[tuple[int, int]] = []
    for start, count in runs:
        pos = start
        while pos < start + count:
            n = min(max_run, start + count - pos)
            cut.append((pos, n))
            pos += n
    return cut


@st.composite
def volume_and_tracks(draw: st.DrawFn) -> tuple[int, set[int]]:
    tracks = draw(st.integers(min_value=1, max_value=300))
    chosen = draw(st.sets(st.integers(min_value=0, max_value=tracks - 1), max_size=tracks))
    if draw(st.booleans()):
        chosen.add(tracks - 1)  # make the last track of the volume common
    return tracks, chosen


# ---------------------------------------------------------------------- building


def test_empty_bitmap() -> None:
    bm = TrackBitmap(100)
    assert len(bm) == 0
    assert not bm
    assert list(bm) == []
    assert list(bm.runs()) == []
    assert list(bm.runs(max_run=4)) == []
    assert 0 not in bm
    assert bm.count_range(0, 100) == 0
    assert bm == TrackBitmap(100)
    assert bm != TrackBitmap(101)


def test_empty_round_trip() -> None:
    bm = TrackBitmap(100)
    data = bm.to_bytes()
    back = TrackBitmap.from_bytes(100, data)
    assert back == bm
    assert len(back) == 0
    assert TrackBitmap.from_bytes(100, b"") == bm


def test_zero_track_volume() -> None:
    bm = TrackBitmap(0)
    bm.set_all()
    assert len(bm) == 0
    assert list(bm.runs()) == []


def test_add_and_contains() -> None:
    bm = TrackBitmap(10)
    bm.add(3)
    bm.add(3)
    bm.add(9)
    assert len(bm) == 2
    assert 3 in bm and 9 in bm and 4 not in bm
    assert list(bm) == [3, 9]
    assert bool(bm)


def test_add_range_is_half_open_and_ignores_empty() -> None:
    bm = TrackBitmap(20)
    bm.add_range(5, 8)
    assert list(bm) == [5, 6, 7]
    bm.add_range(10, 10)
    bm.add_range(12, 11)
    assert list(bm) == [5, 6, 7]


def test_remove_range() -> None:
    bm = TrackBitmap(20)
    bm.add_range(0, 20)
    bm.remove_range(5, 10)
    assert list(bm.runs()) == [(0, 5), (10, 10)]
    bm.remove_range(15, 15)
    bm.remove_range(18, 3)
    assert len(bm) == 15
    bm.remove_range(0, 20)
    assert not bm


def test_set_all_and_clear() -> None:
    bm = TrackBitmap(37)
    bm.set_all()
    assert len(bm) == 37
    assert list(bm.runs()) == [(0, 37)]
    bm.clear()
    assert not bm


def test_mark_bytes_partial_tracks_at_both_ends() -> None:
    ts = 8192
    bm = TrackBitmap(100)
    # Starts in the middle of track 1, ends in the middle of track 3.
    assert bm.mark_bytes(ts + 100, 2 * ts, ts) == 3
    assert list(bm) == [1, 2, 3]
    # Same bytes again: nothing new.
    assert bm.mark_bytes(ts + 100, 2 * ts, ts) == 0
    # Overlaps track 3 (set) and 4 (new).
    assert bm.mark_bytes(3 * ts + ts - 1, 2, ts) == 1
    assert list(bm) == [1, 2, 3, 4]


def test_mark_bytes_exact_track_boundaries() -> None:
    ts = 4096
    bm = TrackBitmap(10)
    assert bm.mark_bytes(2 * ts, ts, ts) == 1
    assert list(bm) == [2]
    # One byte: the track holding it.
    assert bm.mark_bytes(5 * ts - 1, 1, ts) == 1
    assert list(bm) == [2, 4]


def test_mark_bytes_last_track_and_empty_length() -> None:
    ts = 4096
    bm = TrackBitmap(10)
    assert bm.mark_bytes(10 * ts - 1, 1, ts) == 1
    assert list(bm) == [9]
    assert bm.mark_bytes(0, 0, ts) == 0
    assert bm.mark_bytes(0, -5, ts) == 0
    assert list(bm) == [9]


@settings(max_examples=150, deadline=None)
@given(
    ts_shift=st.integers(min_value=9, max_value=13),
    ops=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 15)), max_size=12),
)
def test_mark_bytes_against_model(ts_shift: int, ops: list[tuple[int, int]]) -> None:
    ts = 1 << ts_shift
    bm = TrackBitmap(1 << 20)
    model: set[int] = set()
    for offset, length in ops:
        touched = set(range(offset // ts, (offset + length - 1) // ts + 1)) if length > 0 else set()
        new = len(touched - model)
        model |= touched
        assert bm.mark_bytes(offset, length, ts) == new
    assert set(bm) == model


# ---------------------------------------------------------------------- set algebra


def test_or_update_difference_update() -> None:
    a = TrackBitmap(50, [1, 2, 3, 40])
    b = TrackBitmap(50, [3, 4, 49])
    union = a | b
    assert list(union) == [1, 2, 3, 4, 40, 49]
    assert list(a) == [1, 2, 3, 40]  # operands untouched
    assert list(b) == [3, 4, 49]
    assert union.tracks == 50
    c = a.copy()
    c.update(b)
    assert c == union
    c.difference_update(b)
    assert list(c) == [1, 2, 40]
    assert list(a) == [1, 2, 3, 40]  # copy is independent


def test_or_with_empty() -> None:
    a = TrackBitmap(10, [5])
    e = TrackBitmap(10)
    assert a | e == a
    assert e | a == a
    assert e | e == e
    e.update(a)
    assert e == a
    a.difference_update(TrackBitmap(10))
    assert list(a) == [5]


def test_copy_is_deep() -> None:
    a = TrackBitmap(10, [1])
    b = a.copy()
    b.add(2)
    assert list(a) == [1]
    assert list(b) == [1, 2]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_algebra_against_model(data: st.DataObject) -> None:
    tracks = data.draw(st.integers(1, 500))
    xs = data.draw(st.sets(st.integers(0, tracks - 1)))
    ys = data.draw(st.sets(st.integers(0, tracks - 1)))
    a, b = TrackBitmap(tracks, xs), TrackBitmap(tracks, ys)
    assert set(a | b) == xs | ys
    a.update(b)
    assert set(a) == xs | ys
    a.difference_update(TrackBitmap(tracks, ys))
    assert set(a) == xs - ys
    assert len(a) == len(xs - ys)


# ---------------------------------------------------------------------- runs


def test_runs_examples() -> None:
    bm = TrackBitmap(20, [0, 1, 2, 5, 7, 8, 19])
    assert list(bm.runs()) == [(0, 3), (5, 1), (7, 2), (19, 1)]
    assert list(bm.runs(max_run=2)) == [(0, 2), (2, 1), (5, 1), (7, 2), (19, 1)]
    assert list(bm.runs(max_run=1)) == [(t, 1) for t in [0, 1, 2, 5, 7, 8, 19]]


def test_runs_full_volume_ends_at_last_track() -> None:
    bm = TrackBitmap(16)
    bm.set_all()
    assert list(bm.runs()) == [(0, 16)]
    assert list(bm.runs(max_run=5)) == [(0, 5), (5, 5), (10, 5), (15, 1)]


def test_runs_only_last_track() -> None:
    bm = TrackBitmap(1 << 20, [(1 << 20) - 1])
    assert list(bm.runs()) == [((1 << 20) - 1, 1)]


def test_runs_negative_max_run_means_unlimited() -> None:
    bm = TrackBitmap(10, range(10))
    assert list(bm.runs(max_run=-3)) == [(0, 10)]


@settings(max_examples=300, deadline=None)
@given(vt=volume_and_tracks(), max_run=st.integers(min_value=0, max_value=7))
def test_runs_against_model(vt: tuple[int, set[int]], max_run: int) -> None:
    tracks, chosen = vt
    bm = TrackBitmap(tracks, chosen)
    assert list(bm.runs()) == model_runs(chosen)
    assert list(bm.runs(max_run=max_run)) == model_runs(chosen, max_run)
    assert len(bm) == len(chosen)
    # Runs cover exactly the set and are ordered.
    covered = [t for s, c in bm.runs(max_run=max_run) for t in range(s, s + c)]
    assert covered == sorted(chosen)


@settings(max_examples=100, deadline=None)
@given(vt=volume_and_tracks(), lo=st.integers(0, 300), hi=st.integers(0, 300))
def test_count_range_against_model(vt: tuple[int, set[int]], lo: int, hi: int) -> None:
    tracks, chosen = vt
    bm = TrackBitmap(tracks, chosen)
    assert bm.count_range(lo, hi) == len([t for t in chosen if lo <= t < hi])


@settings(max_examples=100, deadline=None)
@given(
    tracks=st.integers(1, 400),
    ranges=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400), st.booleans()), max_size=10),
)
def test_add_remove_range_against_model(tracks: int, ranges: list[tuple[int, int, bool]]) -> None:
    bm = TrackBitmap(tracks)
    model: set[int] = set()
    for a, b, add in ranges:
        start, stop = min(a, tracks), min(b, tracks)
        if add:
            bm.add_range(start, stop)
            model |= set(range(start, stop))
        else:
            bm.remove_range(start, stop)
            model -= set(range(start, stop))
    assert set(bm) == model
    assert list(bm.runs()) == model_runs(model)


# ---------------------------------------------------------------------- persistence


@settings(max_examples=150, deadline=None)
@given(vt=volume_and_tracks())
def test_bytes_round_trip(vt: tuple[int, set[int]]) -> None:
    tracks, chosen = vt
    bm = TrackBitmap(tracks, chosen)
    data = bm.to_bytes()
    assert isinstance(data, bytes)
    back = TrackBitmap.from_bytes(tracks, data)
    assert back == bm
    assert set(back) == chosen
    assert back.tracks == tracks
    assert list(back.runs()) == model_runs(chosen)


def test_round_trip_large_ranges_and_memory() -> None:
    tracks = 1 << 27
    bm = TrackBitmap(tracks)
    bm.add_range(0, 1 << 20)
    bm.add_range(tracks - 10, tracks)
    assert bm.memory_bytes() < 4096  # runs compress
    back = TrackBitmap.from_bytes(tracks, bm.to_bytes())
    assert back == bm
    assert list(back.runs()) == [(0, 1 << 20), (tracks - 10, 10)]


def test_from_bytes_takes_tracks_from_caller() -> None:
    data = TrackBitmap(10, [1]).to_bytes()
    assert TrackBitmap.from_bytes(20, data).tracks == 20


def test_not_hashable() -> None:
    with pytest.raises(TypeError):
        hash(TrackBitmap(1))
