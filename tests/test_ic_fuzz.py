"""The interconnect fuzz campaign, short (``make fuzz`` runs the long one):
generated hostile messages to every interconnect method and to the
replication data port of two running,
peered daemons; 0 crashes, RSS bounded, the guard pair DUPLEX with its data
unchanged (checked inside :class:`tests.ic_fuzz.Campaign`)."""

from __future__ import annotations

from pathlib import Path

from tests.ic_fuzz import DATA_PORT, SERVICE, Campaign


def test_interconnect_fuzz_campaign_short(tmp_path: Path) -> None:
    with Campaign(tmp_path, seed=15) as campaign:
        figures = campaign.run(1500, check_every=500)
    assert figures.inputs == 1500
    assert set(figures.by_method) == {*(m.name for m in SERVICE.methods), DATA_PORT}, figures.by_method
    # Deeper than the front door: some inputs are served, not all refused.
    assert figures.by_code.get("OK", 0) > 50 and figures.by_code.get("INVALID_ARGUMENT", 0) > 50, figures.by_code
    for role, start in figures.rss_start_kib.items():
        assert figures.rss_peak_kib[role] - start < 256 << 10, figures.line()
