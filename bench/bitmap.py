"""Benchmark of TrackBitmap on a 1 TiB volume with 8 KiB tracks (128 Mi tracks).

For each dirty fraction (0.1 % and 10 %) two bitmaps are built from random
runs of 1-16 tracks (seeded, like host writes) and measured:

* memory per bitmap: ``TrackBitmap.memory_bytes()`` (serialized size) and the
  RSS delta of building it (CRoaring allocates with ``malloc``, which
  ``tracemalloc`` does not see, so RSS is the honest process-level figure);
* OR of the two bitmaps, ``len()`` and ``list(runs())``, each best of 3.

Targets (checked at 0.1 % dirty): memory <= 1 MiB per bitmap, and OR + run
iteration <= 100 ms.  Prints PASS/MISS per target; always exits 0.

Run: ``python bench/bitmap.py``
"""

from __future__ import annotations

import gc
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from splitmirror.storage.bitmap import TrackBitmap

T = TypeVar("T")

VOLUME_BYTES = 1 << 40
TRACK_SIZE = 8 << 10
TRACKS = VOLUME_BYTES // TRACK_SIZE  # 128 Mi
MAX_RUN = 16
MEAN_RUN = (1 + MAX_RUN) / 2
REPEAT = 3
SEED = 20240501

MEMORY_TARGET = 1 << 20  # bytes per bitmap at 0.1 %
TIME_TARGET = 0.100  # seconds for OR + run iteration at 0.1 %


@dataclass
class Result:
    fraction: float
    dirty: tuple[int, int]
    build_s: float
    memory_bytes: tuple[int, int]
    rss_delta: tuple[int, int]
    or_s: float
    count_s: float
    runs_s: float
    runs: int
    union: int


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def best_of(fn: Callable[[], T], repeat: int = REPEAT) -> tuple[float, T]:
    """Best wall time of ``repeat`` calls, and the last call's result."""
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def write_runs(rng: random.Random, fraction: float) -> list[tuple[int, int]]:
    """Random (start, length) writes so that about ``fraction`` of tracks end up dirty.

    Runs land independently and may overlap, so n runs of mean length m cover
    1 - exp(-n m / TRACKS) of the volume; solve for n.
    """
    n = round(-math.log1p(-fraction) * TRACKS / MEAN_RUN)
    runs: list[tuple[int, int]] = []
    for _ in range(n):
        length = rng.randint(1, MAX_RUN)
        runs.append((rng.randrange(TRACKS - length + 1), length))
    return runs


def build(runs: list[tuple[int, int]]) -> TrackBitmap:
    bitmap = TrackBitmap(TRACKS)
    add_range = bitmap.add_range
    for start, length in runs:
        add_range(start, start + length)
    return bitmap


def build_measured(rng: random.Random, fraction: float) -> tuple[TrackBitmap, float, int]:
    runs = write_runs(rng, fraction)
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    bitmap = build(runs)
    elapsed = time.perf_counter() - start
    gc.collect()
    delta = rss_bytes() - before
    del runs
    return bitmap, elapsed, max(delta, 0)


def measure(fraction: float, rng: random.Random) -> Result:
    a, build_a, rss_a = build_measured(rng, fraction)
    b, build_b, rss_b = build_measured(rng, fraction)

    or_s, union = best_of(lambda: a | b)
    count_s, _ = best_of(lambda: len(union))
    runs_s, runs = best_of(lambda: list(union.runs()))
    return Result(
        fraction=fraction,
        dirty=(len(a), len(b)),
        build_s=build_a + build_b,
        memory_bytes=(a.memory_bytes(), b.memory_bytes()),
        rss_delta=(rss_a, rss_b),
        or_s=or_s,
        count_s=count_s,
        runs_s=runs_s,
        runs=len(runs),
        union=len(union),
    )


def kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB"


def ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms"


def report(results: list[Result]) -> None:
    print(f"TrackBitmap: {VOLUME_BYTES >> 40} TiB volume, {TRACK_SIZE >> 10} KiB tracks "
          f"({TRACKS:,} tracks), runs of 1-{MAX_RUN} tracks, seed {SEED}, best of {REPEAT}")
    print()
    header = ("dirty", "set bits/bitmap", "memory_bytes", "RSS delta", "OR", "len()", "list(runs())",
              "runs", "build (2 bm)")
    rows = [header]
    for r in results:
        rows.append((
            f"{r.fraction:.1%}",
            f"{max(r.dirty):,}",
            kib(max(r.memory_bytes)),
            kib(max(r.rss_delta)),
            ms(r.or_s),
            ms(r.count_s),
            ms(r.runs_s),
            f"{r.runs:,}",
            ms(r.build_s),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for i, row in enumerate(rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()


def check(results: list[Result]) -> None:
    sparse = next(r for r in results if r.fraction == 0.001)
    checks = [
        ("memory_bytes per bitmap <= 1 MiB", max(sparse.memory_bytes), MEMORY_TARGET, kib),
        ("RSS delta per bitmap <= 1 MiB", max(sparse.rss_delta), MEMORY_TARGET, kib),
        ("OR + list(runs()) <= 100 ms", sparse.or_s + sparse.runs_s, TIME_TARGET, ms),
    ]
    print("targets at 0.1% dirty:")
    for name, value, limit, fmt in checks:
        verdict = "PASS" if value <= limit else "MISS"
        print(f"  {verdict}  {name}: {fmt(value)}")


def main() -> int:
    rng = random.Random(SEED)
    started = time.perf_counter()
    results: list[Result] = []
    for fraction in (0.001, 0.10):
        results.append(measure(fraction, rng))
        gc.collect()
    report(results)
    check(results)
    print(f"\n(total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
