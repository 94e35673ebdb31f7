"""The NBD fuzz campaign, short (``make fuzz`` runs the long one,
``python -m tests.nbd_fuzz --count 100000``): generated hostile sessions
against the handshake and transmission phases of a running daemon; 0
crashes, RSS bounded, a good client still served, the guard pair DUPLEX with
its data unchanged (all checked inside :class:`tests.nbd_fuzz.Campaign`)."""

from __future__ import annotations

from pathlib import Path

from tests.nbd_fuzz import Campaign, Generator


def test_sessions_are_reproducible_by_seed() -> None:
    assert [Generator(7).session() for _ in range(50)] == [Generator(7).session() for _ in range(50)]
    assert [Generator(7).session() for _ in range(5)] != [Generator(8).session() for _ in range(5)]


def test_nbd_fuzz_campaign_short(tmp_path: Path) -> None:
    with Campaign(tmp_path, seed=15) as campaign:
        figures = campaign.run(800, check_every=200)
    assert figures.inputs == 800
    # Deeper than the greeting: the server answered options and commands, and ended bad sessions itself.
    assert figures.served_bytes > 800 * 18 * 2, figures.line()
    assert figures.rss_peak_kib - figures.rss_start_kib < 256 << 10, figures.line()
