"""The benches' stage rules (bench/_harness.py) name modules and functions that exist, and put samples
in the right rows: a rule left behind by a move of the code sends its samples to the catch-all row."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def harness() -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "_harness.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_harness"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "bench"))


def alternatives(pattern: str) -> list[str]:
    """``pattern`` split at its top-level ``|``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(pattern):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "|" and depth == 0:
            out.append(pattern[start:i])
            start = i + 1
    return [*out, pattern[start:]]


def functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_rule_names_a_module_and_functions_that_exist() -> None:
    rules = harness()._SOURCE_RULES
    checked = 0
    for suffix, func_re, _stage in rules:
        if "splitmirror/" not in suffix:
            continue  # the standard library's and grpc's files
        path = ROOT / suffix.strip("/")
        assert path.exists(), f"stage rule names {suffix}, which is not in the tree"
        if not func_re:
            continue
        names = functions(path)
        for alt in alternatives(func_re):
            assert any(re.search(alt, name) for name in names), \
                f"stage rule for {suffix}: {alt!r} matches no function there ({sorted(names)})"
        checked += 1
    assert checked >= 10


def frame(func: str, path: str) -> str:
    return f"{func} ({ROOT / path}:1)"


def test_samples_land_in_their_stage() -> None:
    h = harness()
    loop_root = [frame("<module>", "primaryd/__main__.py"), frame("main", "splitmirror/daemon/main.py"),
                 frame("run_loop", "splitmirror/daemon/main.py"), "uv__run_timers (uvloop.so)"]
    # The loop's own work (nothing of ours above the daemon's main) is the event loop, not "host API".
    assert h.classify(loop_root) == "event loop / scheduling"
    # The open-file cache counts for the read that uses it.
    read = [frame("_worker", "/usr/lib/python3.11/concurrent/futures/thread.py"),
            frame("Volume.pread", "splitmirror/storage/volume.py"),
            frame("VolumeFile.use", "splitmirror/storage/files.py")]
    assert h.classify(read, main_thread=False) == "local read (pread)"
    # The mirror's Replicate handler (its reader is a nested function of _replicate).
    handler = [*loop_root, frame("InterconnectServicer._replicate.<locals>.reader",
                                 "splitmirror/ports/interconnect.py")]
    assert h.classify(handler) == "Replicate handler, acks (mirror)"
    # Pending bits set by the write path count for the write path's checks.
    track = [*loop_root, frame("WritePath._track", "splitmirror/datapath/writes.py"),
             frame("TrackBitmap.mark_bytes", "splitmirror/storage/bitmap.py")]
    assert h.classify(track) == "write checks, pair lookups"
    # A generation's checked reads are reads.
    checked = [frame("_read_checked", "splitmirror/procedures/verified_reads.py")]
    assert h.classify(checked, main_thread=False) == "local read (pread)"
