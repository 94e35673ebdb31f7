"""Shared fixtures: real daemon processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitmirror.testing import Site


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    """A started primaryd (1001) and secondaryd (2001), peered."""
    primary = Site("primary", 1001, tmp_path)
    secondary = Site("secondary", 2001, tmp_path)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()


@pytest.fixture
def manual_sites(tmp_path: Path) -> Iterator[tuple[Site, Site]]:
    """Like ``sites`` but with auto-resync off (operators resync by hand)."""
    primary = Site("primary", 1001, tmp_path, auto_resync=False)
    secondary = Site("secondary", 2001, tmp_path, auto_resync=False)
    primary.peer_with(secondary)
    secondary.start()
    primary.start()
    yield primary, secondary
    for site in (primary, secondary):
        site.kill()
