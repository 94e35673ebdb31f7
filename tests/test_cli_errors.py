"""The CLI's mistakes and refusals against real daemons: one line each, in the user's terms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from splitmirror.testing import ROOT, Site

MiB = 1 << 20
START_TIMEOUT = 60


def one_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("splitmirror: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def cli_at(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPLITMIRROR_")}
    return subprocess.run([sys.executable, "-m", "client", "--server", server, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_values_above_the_host_api_limit(sites: tuple[Site, Site]) -> None:
    primary, _ = sites
    line = one_error(primary.cli("volume", "create", "huge", "--size", str(1 << 70), check=False),
                     "--size", "above the limit", str((1 << 64) - 1))
    assert "internal error" not in line
    # Within the protocol but above the server's limit: the server names it (not "internal error").
    line = one_error(primary.cli("volume", "create", "huge", "--size", "100P", check=False), "volume 'huge'",
                     "16 TiB")
    assert "internal error" not in line
    one_error(primary.cli("read", "v", "--offset", "99999999999999999999999", "--length", "1", check=False),
              "--offset 99999999999999999999999", "above the limit")
    assert primary.cli_json("volume", "list") == []


def test_io_past_the_end_speaks_in_the_users_terms(sites: tuple[Site, Site], tmp_path: Path) -> None:
    primary, _ = sites
    primary.cli("volume", "create", "v", "--size", "20M")
    # Many RPCs and windows: the message quotes the request, not a chunk of it.
    result = primary.cli("read", "v", "--offset", "1M", "--length", "20M", check=False)
    one_error(result, "read of 20.0 MiB (20971520 bytes) at offset 1048576 on volume 'v'",
              "holds 20.0 MiB (20971520 bytes)", f"at most {20 * MiB}")
    assert result.stdout == ""
    data = tmp_path / "data"
    data.write_bytes(b"x" * (3 * MiB))
    one_error(primary.cli("write", "v", "--offset", "18M", "--file", str(data), check=False),
              "write of 3.0 MiB (3145728 bytes) at offset 18874368 on volume 'v'", "holds 20.0 MiB")
    assert primary.cli_json("volume", "show", "v")["allocated_bytes"] == 0  # refused before a byte was sent
    one_error(primary.cli("checksum", "v", "--offset", "19M", "--length", "2M", check=False),
              "checksum of 2.0 MiB (2097152 bytes) at offset 19922944")


def test_server_pointed_at_the_wrong_port(tmp_path: Path) -> None:
    site = Site("primary", 1001, tmp_path, nbd=True)
    site.start(timeout=START_TIMEOUT)
    try:
        one_error(cli_at(site.interconnect, "volume", "list"),
                  f"{site.interconnect}: that is the interconnect port of system 1001 (primaryd)", "--listen")
        one_error(cli_at(f"127.0.0.1:{site.nbd_port}", "volume", "list"),
                  f"127.0.0.1:{site.nbd_port} is not a gRPC server", "NBD server")
        assert "Method not found" not in site.log()
    finally:
        site.stop()


def test_restore_abort_with_nothing_running(sites: tuple[Site, Site]) -> None:
    primary, secondary = sites
    primary.cli("volume", "create", "v", "--size", "1M")
    secondary.cli("volume", "create", "v-r", "--size", "1M")
    primary.cli("pair", "create", "p", "--pvol", "v", "--svol", "v-r", "--peer", "2001", "--wait")
    one_error(secondary.cli("restore", "abort", "p", check=False), "no restore of pair 'p'", "nothing to abort")
    assert secondary.pair_row("p")["status"] == "DUPLEX"


def test_sizes_in_binary_units_and_aligned(sites: tuple[Site, Site]) -> None:
    primary, _ = sites
    primary.cli("volume", "create", "small", "--size", "1032K")
    primary.cli("volume", "create", "big", "--size", "1G")
    created = primary.cli("volume", "create", "c", "--size", "1048584K").stdout
    assert created.strip() == "volume c created: 1.0 GiB, tracks of 8.0 KiB"
    lines = primary.cli("volume", "list").stdout.splitlines()
    header, rows = lines[0], lines[2:]
    assert [r.split()[0] for r in rows] == ["big", "c", "small"]
    for row, size in zip(rows, ("1.0 GiB", "1.0 GiB", "1.0 MiB"), strict=True):
        assert size in row and "K " not in row and "M " not in row
        # Right-aligned under its header.
        assert row.index(size) + len(size) == header.index("SIZE") + len("SIZE")
    stats = primary.cli("stats").stdout
    assert "interconnect sent      0 B" in stats
